//! Device tensors: the element types, `[B, T, H, D]` tensors, the recurrent state of
//! linear attention, and what training keeps between the forward and backward passes.

use super::device::{Gpu, allocation_error, cuda_error};
use crate::base::{Error, Result, Tensor};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use std::sync::Arc;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// Element types of device tensors: f32, bf16 and f16. Products of bf16 and f16 run on
/// the tensor cores with f32 accumulation; f32 stays f32 throughout.
pub trait GpuElement:
    sealed::Sealed + DeviceRepr + ValidAsZeroBits + Copy + Default + 'static
{
    /// The suffix of this type's kernels.
    const NAME: &'static str;
    /// Rounds an f32 to this type.
    fn from_f32(x: f32) -> Self;
    /// Widens to f32.
    fn to_f32(self) -> f32;
}

impl GpuElement for f32 {
    const NAME: &'static str = "f32";
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl GpuElement for half::bf16 {
    const NAME: &'static str = "bf16";
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

impl GpuElement for half::f16 {
    const NAME: &'static str = "f16";
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// A `[batch, seq, heads, head_dim]` tensor in GPU memory, holding the GPU it is on.
pub struct GpuTensor<T> {
    pub(super) data: CudaSlice<T>,
    pub(super) shape: [usize; 4],
    gpu: Arc<Gpu>,
}

impl<T: GpuElement> GpuTensor<T> {
    /// Copies a host tensor to the GPU, rounding to `T`. NaN, infinity and values beyond
    /// `T`'s range (f16 overflows past 65504) are errors.
    ///
    /// ```no_run
    /// use linattn::{Tensor, cuda::{Gpu, GpuTensor}};
    /// let gpu = Gpu::open(0)?;
    /// let x = GpuTensor::<f32>::upload(&gpu, &Tensor::randn([2, 16, 4, 8], 0)?)?;
    /// assert_eq!(x.shape(), [2, 16, 4, 8]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn upload(gpu: &Gpu, host: &Tensor<f32>) -> Result<Self> {
        // NaN and infinity are refused here, once, so that no kernel has to look for them.
        if let Some((index, value)) = host.first_non_finite() {
            return Err(Error::NonFinite {
                tensor: "a tensor for the GPU",
                index,
                value,
            });
        }
        let values: Vec<T> = host.as_slice().iter().map(|&x| T::from_f32(x)).collect();
        if let Some(position) = values.iter().position(|x| !x.to_f32().is_finite()) {
            return Err(Error::Unsupported(format!(
                "{} at index {position} (flat) is beyond the range of {}",
                host.as_slice()[position],
                T::NAME
            )));
        }
        let data = gpu
            .stream
            .clone_htod(&values)
            .map_err(|e| cuda_error("copying to the GPU", e))?;
        Ok(Self {
            data,
            shape: host.shape(),
            gpu: gpu.handle(),
        })
    }

    /// A tensor of zeros.
    ///
    /// ```no_run
    /// use linattn::cuda::{Gpu, GpuTensor};
    /// let gpu = Gpu::open(0)?;
    /// let x = GpuTensor::<half::bf16>::zeros(&gpu, [1, 8, 2, 4])?;
    /// assert!(x.download()?.as_slice().iter().all(|&v| v == 0.0));
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn zeros(gpu: &Gpu, shape: [usize; 4]) -> Result<Self> {
        Ok(Self {
            data: gpu.alloc(shape.iter().product())?,
            shape,
            gpu: gpu.handle(),
        })
    }

    /// A tensor whose every element the kernel about to run writes: no zeroing.
    pub(crate) fn for_output(gpu: &Gpu, shape: [usize; 4]) -> Result<Self> {
        let count: usize = shape.iter().product();
        // SAFETY: read only after the kernel that receives it has written all of it.
        let data =
            unsafe { gpu.stream.alloc::<T>(count) }.map_err(|e| allocation_error::<T>(count, e))?;
        Ok(Self {
            data,
            shape,
            gpu: gpu.handle(),
        })
    }

    /// Copies the tensor back to the host, widened to f32.
    ///
    /// ```no_run
    /// use linattn::{Tensor, cuda::{Gpu, GpuTensor}};
    /// let gpu = Gpu::open(0)?;
    /// let host = Tensor::<f32>::randn([1, 4, 1, 2], 0)?;
    /// assert_eq!(GpuTensor::<f32>::upload(&gpu, &host)?.download()?, host);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn download(&self) -> Result<Tensor<f32>> {
        let values = self
            .data
            .stream()
            .clone_dtoh(&self.data)
            .map_err(|e| cuda_error("copying from the GPU", e))?;
        Tensor::from_vec(values.into_iter().map(T::to_f32).collect(), self.shape)
    }

    /// The shape, `[batch, seq, heads, head_dim]`.
    ///
    /// ```no_run
    /// use linattn::cuda::{Gpu, GpuTensor};
    /// let gpu = Gpu::open(0)?;
    /// let x = GpuTensor::<f32>::zeros(&gpu, [1, 2, 3, 4])?;
    /// assert_eq!(x.shape(), [1, 2, 3, 4]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// The GPU the tensor is on.
    ///
    /// ```no_run
    /// use linattn::cuda::{Gpu, GpuTensor};
    /// let gpu = Gpu::open(0)?;
    /// let x = GpuTensor::<f32>::zeros(&gpu, [1, 2, 3, 4])?;
    /// assert!(std::sync::Arc::ptr_eq(x.gpu(), &gpu));
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
}

/// What [`Attention::forward_training`](crate::Attention::forward_training)
/// keeps for the backward pass.
pub struct GpuForward {
    /// The attention's output.
    pub out: GpuTensor<half::bf16>,
    /// Each row's denominator, `[B, T, H]`.
    pub(super) den: CudaSlice<f32>,
}

/// Gradients from [`Attention::backward`](crate::Attention::backward) of GPU tensors,
/// each shaped like its input.
pub struct GpuGradients<T> {
    /// ∂loss/∂q.
    pub dq: GpuTensor<T>,
    /// ∂loss/∂k.
    pub dk: GpuTensor<T>,
    /// ∂loss/∂v.
    pub dv: GpuTensor<T>,
}

/// The recurrent state of linear attention on the GPU for every (batch, kv head):
/// `S = Σ φ(k) vᵀ` (`[B, H_kv, D_k, D_v]`) and `z = Σ φ(k)` (`[B, H_kv, D_k]`), f32.
/// Its memory does not grow with the number of tokens seen.
pub struct GpuLinearState {
    pub(super) kv: CudaSlice<f32>,
    pub(super) k_sum: CudaSlice<f32>,
    pub(crate) batch: usize,
    pub(crate) heads_kv: usize,
    pub(crate) dim_k: usize,
    pub(crate) dim_v: usize,
}

impl GpuLinearState {
    /// An empty state (no tokens seen).
    pub(crate) fn zeros(
        gpu: &Gpu,
        batch: usize,
        heads_kv: usize,
        dim_k: usize,
        dim_v: usize,
    ) -> Result<Self> {
        Ok(Self {
            kv: gpu.alloc(batch * heads_kv * dim_k * dim_v)?,
            k_sum: gpu.alloc(batch * heads_kv * dim_k)?,
            batch,
            heads_kv,
            dim_k,
            dim_v,
        })
    }

    /// Bytes of GPU memory the state holds: the same after every step.
    ///
    /// ```no_run
    /// use linattn::{Attention, Method, cuda::{Gpu, GpuDecoder}};
    /// let gpu = Gpu::open(0)?;
    /// let attention = Attention::new(Method::linear());
    /// let decoder = GpuDecoder::<f32>::new(&gpu, &attention, 32, 16, 16, 128, 128)?;
    /// assert_eq!(decoder.linear_state().unwrap().bytes(), 32 * 16 * (128 * 128 + 128) * 4);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn bytes(&self) -> usize {
        (self.kv.len() + self.k_sum.len()) * size_of::<f32>()
    }

    /// `S` and `z` copied to the host, in the layouts above.
    ///
    /// ```no_run
    /// use linattn::{Attention, Method, cuda::{Gpu, GpuDecoder}};
    /// let gpu = Gpu::open(0)?;
    /// let attention = Attention::new(Method::linear());
    /// let decoder = GpuDecoder::<f32>::new(&gpu, &attention, 1, 2, 2, 4, 3)?;
    /// let (kv, k_sum) = decoder.linear_state().unwrap().download()?;
    /// assert_eq!((kv.len(), k_sum.len()), (24, 8));
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn download(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let stream = self.kv.stream();
        let kv = stream
            .clone_dtoh(&self.kv)
            .map_err(|e| cuda_error("copying from the GPU", e))?;
        let k_sum = stream
            .clone_dtoh(&self.k_sum)
            .map_err(|e| cuda_error("copying from the GPU", e))?;
        Ok((kv, k_sum))
    }
}
