//! The CUDA backend: device tensors in the CPU's `[B, T, H, D]` layout and the kernels
//! that run on them, compiled by NVRTC at first use for the GPU that is present.
//!
//! Nothing here needs CUDA at build time: the driver and NVRTC are loaded when a [`Gpu`]
//! is opened, and opening one on a machine without them is an [`Error::Cuda`].
//!
//! ```no_run
//! use linattn::cuda::{Gpu, GpuTensor};
//! use linattn::{Attention, Method, Tensor};
//! let gpu = Gpu::open(0)?;
//! let x = Tensor::<f32>::randn([1, 4096, 8, 64], 0)?;
//! let x = GpuTensor::<half::bf16>::upload(&gpu, &x)?;
//! let out = Attention::new(Method::linear()).causal(true).forward_cuda(&gpu, &x, &x, &x)?;
//! assert_eq!(out.download()?.shape(), [1, 4096, 8, 64]);
//! # Ok::<(), linattn::Error>(())
//! ```

use crate::api::attention::Attention;
use crate::base::Problem;
use crate::base::Tensor;
use crate::base::{Error, Result};
use crate::methods::{Method, resolve_scale};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The kernel sources (CUDA C++), each after the helpers they share.
const LINEAR_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("linear.cu"));
const LINEAR_BACKWARD_SOURCE: &str = concat!(
    include_str!("common.cuh"),
    include_str!("linear.cu"),
    include_str!("linear_backward.cu")
);
const PERFORMER_SOURCE: &str = concat!(
    "#define LINATTN_HELPERS_ONLY\n",
    include_str!("common.cuh"),
    include_str!("linear.cu"),
    include_str!("performer.cu")
);
const SOFTMAX_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("softmax.cu"));
/// Query rows per block and threads per block of the exact-attention kernel (`ROWS`,
/// `THREADS` in softmax.cu).
const FLASH_ROWS: usize = 64;
const FLASH_THREADS: u32 = 128;
/// The same for the general exact kernel (`general::ROWS`, `general::THREADS`, and
/// `general::KEYS` per tile), and the largest head dim it holds in registers (4 x
/// `COLUMNS`).
const GENERAL_EXACT_ROWS: usize = 32;
const GENERAL_EXACT_THREADS: u32 = 128;
const GENERAL_EXACT_KEYS: usize = 32;
const GENERAL_EXACT_MAX_DIM: usize = 256;
/// Tokens per chunk in the kernels (`CHUNK` in the source).
const CHUNK: usize = 64;
/// Warps of the causal tensor-core kernel that load, map and score chunks for the
/// `D / 16` warps that own the state (`PRODUCER_WARPS` in linear.cu).
const CAUSAL_PRODUCER_WARPS: usize = 8;
/// Threads per block of every kernel (their `__launch_bounds__`).
const THREADS: u32 = 256;
/// Query heads one decode block serves at a time (`DECODE_HEADS` in the source), and the
/// widest values each decode kernel takes: 32 lanes of 4 columns, or of 8 (`_wide`).
const DECODE_HEADS: usize = 4;
const DECODE_NARROW_DIM: usize = 128;
const DECODE_WIDE_DIM: usize = 256;
/// Rows each block of the non-causal passes covers: enough that the state each block
/// loads is read once per 512 queries, few enough that every multiprocessor has work.
const FULL_SPAN: usize = 512;
/// The linear method's epsilon (as on the CPU).
const LINEAR_EPSILON: f32 = 1e-6;

fn cuda_error(what: &str, error: impl std::fmt::Display) -> Error {
    Error::Cuda(format!("{what}: {error}"))
}

fn allocation_error<T>(count: usize, error: impl std::fmt::Display) -> Error {
    let bytes = crate::ByteSize((count * size_of::<T>()) as u128);
    cuda_error(&format!("allocating {bytes} on the GPU"), error)
}

/// Lets the device's stream-ordered memory pool keep what is freed for the next
/// allocation, as a caching allocator does. By default the pool hands it back to the
/// driver at every synchronisation, and mapping a call's buffers again (the output, the
/// causal form's segment sums) took longer than the kernels of a call.
fn keep_freed_memory_pooled(context: &CudaContext) -> Result<()> {
    use cudarc::driver::sys;
    let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
    let mut threshold = u64::MAX;
    // SAFETY: the device handle is the open context's; the attribute takes a u64.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), context.cu_device())
            .result()
            .and_then(|()| {
                sys::cuMemPoolSetAttribute(
                    pool.assume_init(),
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                )
                .result()
            })
    }
    .map_err(|e| cuda_error("configuring the GPU's memory pool", e))
}

/// One GPU: its context, the stream every call runs on, and the kernels compiled for it.
pub struct Gpu {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Compiled sources, by file name.
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Kernels loaded so far, their shared-memory limit already raised.
    kernels: Mutex<HashMap<String, CudaFunction>>,
    processors: usize,
    shared_limit: usize,
}

impl Gpu {
    /// Opens GPU `ordinal` (0 is the first).
    ///
    /// ```no_run
    /// let gpu = linattn::cuda::Gpu::open(0)?;
    /// println!("{}", gpu.name());
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn open(ordinal: usize) -> Result<Self> {
        // SAFETY: only tries to load the libraries, as opening them below would.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "no CUDA driver found (libcuda.so): is there an NVIDIA GPU and its driver?".into(),
            ));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "NVRTC not found (libnvrtc.so): install the CUDA toolkit's runtime compiler".into(),
            ));
        }
        let context = CudaContext::new(ordinal).map_err(|e| cuda_error("opening the GPU", e))?;
        if context.has_async_alloc() {
            keep_freed_memory_pooled(&context)?;
        }
        let stream = context.default_stream();
        let attribute = |attribute, what: &str| {
            context
                .attribute(attribute)
                .map(|value| value as usize)
                .map_err(|e| cuda_error(&format!("reading the {what}"), e))
        };
        use cudarc::driver::sys::CUdevice_attribute as Attribute;
        let processors = attribute(
            Attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            "multiprocessor count",
        )?;
        let shared_limit = attribute(
            Attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "shared-memory limit",
        )?;
        Ok(Self {
            context,
            stream,
            modules: Mutex::new(HashMap::new()),
            kernels: Mutex::new(HashMap::new()),
            processors,
            shared_limit,
        })
    }

    /// The device's name, as the driver reports it.
    ///
    /// ```no_run
    /// assert!(linattn::cuda::Gpu::open(0)?.name().contains("NVIDIA"));
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn name(&self) -> String {
        self.context.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    /// Waits until every call issued so far has finished.
    ///
    /// ```no_run
    /// linattn::cuda::Gpu::open(0)?.synchronize()?;
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_error("synchronizing", e))
    }

    /// Milliseconds the GPU spent on the work `work` issues, timed with device events
    /// around it (host time to issue it does not count unless the GPU waits for it).
    ///
    /// ```no_run
    /// let gpu = linattn::cuda::Gpu::open(0)?;
    /// let ms = gpu.elapsed_ms(|| Ok(()))?;
    /// assert!(ms >= 0.0);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn elapsed_ms(&self, work: impl FnOnce() -> Result<()>) -> Result<f64> {
        let event = || {
            self.context
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| cuda_error("creating an event", e))
        };
        let (start, end) = (event()?, event()?);
        start
            .record(&self.stream)
            .map_err(|e| cuda_error("recording an event", e))?;
        work()?;
        end.record(&self.stream)
            .map_err(|e| cuda_error("recording an event", e))?;
        end.synchronize()
            .map_err(|e| cuda_error("waiting for an event", e))?;
        start
            .elapsed_ms(&end)
            .map(f64::from)
            .map_err(|e| cuda_error("reading an event", e))
    }

    /// Milliseconds the GPU spent on each of `runs` calls of `work`, measured as
    /// `triton.testing.do_bench` measures the peers: device events around each run, the
    /// L2 cache flushed (a 256 MiB buffer zeroed) before each, and the runs issued back to
    /// back with one synchronisation at the end, so that the host's time to issue a run
    /// hides behind the GPU's work on the one before (as in a model's forward pass).
    ///
    /// ```no_run
    /// let gpu = linattn::cuda::Gpu::open(0)?;
    /// let times = gpu.elapsed_runs_ms(5, || Ok(()))?;
    /// assert_eq!(times.len(), 5);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn elapsed_runs_ms(
        &self,
        runs: usize,
        mut work: impl FnMut() -> Result<()>,
    ) -> Result<Vec<f64>> {
        const FLUSH_BYTES: usize = 256 << 20;
        let mut flush: CudaSlice<u8> = self.alloc(FLUSH_BYTES)?;
        let record = || {
            self.stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| cuda_error("recording an event", e))
        };
        let mut events = Vec::with_capacity(runs);
        for _ in 0..runs {
            self.stream
                .memset_zeros(&mut flush)
                .map_err(|e| cuda_error("flushing the L2 cache", e))?;
            let start = record()?;
            work()?;
            events.push((start, record()?));
        }
        self.synchronize()?;
        events
            .iter()
            .map(|(start, end)| {
                start
                    .elapsed_ms(end)
                    .map(f64::from)
                    .map_err(|e| cuda_error("reading an event", e))
            })
            .collect()
    }

    /// Device-to-device copy bandwidth in bytes per second (read + written), the best of
    /// several copies of 1 GiB: the ceiling of memory-bound kernels.
    ///
    /// ```no_run
    /// let gpu = linattn::cuda::Gpu::open(0)?;
    /// assert!(gpu.copy_bandwidth()? > 1e11);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn copy_bandwidth(&self) -> Result<f64> {
        const BYTES: usize = 1 << 30;
        let source: CudaSlice<u8> = self.alloc(BYTES)?;
        let mut target: CudaSlice<u8> = self.alloc(BYTES)?;
        let mut best = f64::INFINITY;
        for _ in 0..6 {
            let ms = self.elapsed_ms(|| {
                self.stream
                    .memcpy_dtod(&source, &mut target)
                    .map_err(|e| cuda_error("copying on the GPU", e))
            })?;
            best = best.min(ms);
        }
        Ok(2.0 * BYTES as f64 / (best * 1e-3))
    }

    /// The architecture NVRTC compiles for: `sm_90a` on Hopper, so that its own
    /// instructions are available, `sm_XY` elsewhere.
    fn architecture(&self) -> Result<String> {
        let (major, minor) = self
            .context
            .compute_capability()
            .map_err(|e| cuda_error("reading the compute capability", e))?;
        if major < 8 {
            return Err(Error::Cuda(format!(
                "compute capability {major}.{minor}: the kernels need 8.0 (Ampere) or later"
            )));
        }
        let suffix = if major == 9 && minor == 0 { "a" } else { "" };
        Ok(format!("sm_{major}{minor}{suffix}"))
    }

    /// Kernel `name` of the module compiled from `source` (compiled on first use).
    fn function(&self, source: Source, name: &str) -> Result<CudaFunction> {
        let (code, file) = match source {
            Source::Linear => (LINEAR_SOURCE, "linear.cu"),
            Source::LinearBackward => (LINEAR_BACKWARD_SOURCE, "linear_backward.cu"),
            Source::Performer => (PERFORMER_SOURCE, "performer.cu"),
            Source::Softmax => (SOFTMAX_SOURCE, "softmax.cu"),
        };
        let mut modules = self
            .modules
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let module = match modules.get(file) {
            Some(module) => module.clone(),
            None => {
                let module = self.compile(code, file)?;
                modules.insert(file, module.clone());
                module
            }
        };
        module
            .load_function(name)
            .map_err(|e| cuda_error(&format!("loading kernel {name}"), e))
    }

    fn compile(&self, source: &str, name: &str) -> Result<Arc<CudaModule>> {
        let include = cuda_include_dir();
        let options = cudarc::nvrtc::CompileOptions {
            options: vec![
                format!("--gpu-architecture={}", self.architecture()?),
                "--std=c++17".to_string(),
            ],
            include_paths: vec![include.clone(), format!("{include}/cccl")],
            name: Some(name.to_string()),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, options)
            .map_err(|e| cuda_error(&format!("compiling {name}"), e))?;
        self.context
            .load_module(ptx)
            .map_err(|e| cuda_error(&format!("loading {name}"), e))
    }

    fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, count: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(count)
            .map_err(|e| allocation_error::<T>(count, e))
    }

    /// Linear-attention kernel `name`, checked to fit `shared_bytes` of dynamic shared
    /// memory.
    fn kernel(&self, name: &str, shared_bytes: u32) -> Result<CudaFunction> {
        self.kernel_of(Source::Linear, name, shared_bytes)
    }

    /// Kernel `name` of `source`, checked to fit `shared_bytes` of dynamic shared memory.
    fn kernel_of(&self, source: Source, name: &str, shared_bytes: u32) -> Result<CudaFunction> {
        if shared_bytes as usize > self.shared_limit {
            return Err(Error::Unsupported(format!(
                "{name} needs {} of shared memory per block for this head dim, the GPU allows {}",
                crate::ByteSize(shared_bytes as u128),
                crate::ByteSize(self.shared_limit as u128)
            )));
        }
        let mut kernels = self
            .kernels
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(function) = kernels.get(name) {
            return Ok(function.clone());
        }
        let function = self.function(source, name)?;
        function
            .set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                self.shared_limit as i32,
            )
            .map_err(|e| cuda_error(&format!("raising {name}'s shared-memory limit"), e))?;
        kernels.insert(name.to_string(), function.clone());
        Ok(function)
    }
}

/// The kernel sources.
#[derive(Clone, Copy)]
enum Source {
    Linear,
    /// The linear kernels again with the backward pass's (compiled only when asked for).
    LinearBackward,
    /// FAVOR+ kernels, built on the linear kernels' helpers.
    Performer,
    Softmax,
}

/// Launches with the arguments pushed, mapping a failure to [`Error::Cuda`].
///
/// # Safety
/// The arguments must be those of the kernel, in order, with buffers sized for the
/// shape they carry.
unsafe fn launch(
    mut args: cudarc::driver::LaunchArgs<'_>,
    config: LaunchConfig,
    name: &str,
) -> Result<()> {
    // SAFETY: the caller's promise.
    unsafe { args.launch(config) }
        .map(|_| ())
        .map_err(|e| cuda_error(&format!("launching {name}"), e))
}

/// Where CUDA's headers are: `$CUDA_HOME/include`, `$CUDA_PATH/include`, or the usual
/// `/usr/local/cuda/include`.
fn cuda_include_dir() -> String {
    ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .find_map(|var| std::env::var(var).ok())
        .map_or_else(
            || "/usr/local/cuda/include".to_string(),
            |root| format!("{root}/include"),
        )
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// Element types of device tensors: f32, bf16 and f16. Products of bf16 and f16 run on
/// the tensor cores with f32 accumulation; f32 stays f32 throughout.
pub trait GpuElement: sealed::Sealed + DeviceRepr + ValidAsZeroBits + Copy + Default {
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

/// A `[batch, seq, heads, head_dim]` tensor in GPU memory.
pub struct GpuTensor<T> {
    data: CudaSlice<T>,
    shape: [usize; 4],
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
        })
    }

    /// A tensor whose every element the kernel about to run writes: no zeroing.
    fn for_output(gpu: &Gpu, shape: [usize; 4]) -> Result<Self> {
        let count: usize = shape.iter().product();
        // SAFETY: read only after the kernel that receives it has written all of it.
        let data =
            unsafe { gpu.stream.alloc::<T>(count) }.map_err(|e| allocation_error::<T>(count, e))?;
        Ok(Self { data, shape })
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
    /// let x = GpuTensor::<f32>::zeros(&Gpu::open(0)?, [1, 2, 3, 4])?;
    /// assert_eq!(x.shape(), [1, 2, 3, 4]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
}

/// What [`Attention::forward_training_cuda`] keeps for the backward pass.
pub struct GpuForward {
    /// The attention's output.
    pub out: GpuTensor<half::bf16>,
    /// Each row's denominator, `[B, T, H]`.
    den: CudaSlice<f32>,
}

/// Gradients from [`Attention::backward_cuda`], each shaped like its input.
pub struct GpuGradients {
    /// ∂loss/∂q.
    pub dq: GpuTensor<half::bf16>,
    /// ∂loss/∂k.
    pub dk: GpuTensor<half::bf16>,
    /// ∂loss/∂v.
    pub dv: GpuTensor<half::bf16>,
}

/// The recurrent state of linear attention on the GPU for every (batch, kv head):
/// `S = Σ φ(k) vᵀ` (`[B, H_kv, D_k, D_v]`) and `z = Σ φ(k)` (`[B, H_kv, D_k]`), f32.
/// Its memory does not grow with the number of tokens seen.
pub struct GpuLinearState {
    kv: CudaSlice<f32>,
    k_sum: CudaSlice<f32>,
    batch: usize,
    heads_kv: usize,
    dim_k: usize,
    dim_v: usize,
}

impl GpuLinearState {
    /// An empty state (no tokens seen).
    ///
    /// ```no_run
    /// use linattn::cuda::{Gpu, GpuLinearState};
    /// let state = GpuLinearState::zeros(&Gpu::open(0)?, 32, 16, 128, 128)?;
    /// assert_eq!(state.bytes(), 32 * 16 * (128 * 128 + 128) * 4);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn zeros(
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
    /// use linattn::cuda::{Gpu, GpuLinearState};
    /// let state = GpuLinearState::zeros(&Gpu::open(0)?, 1, 1, 4, 2)?;
    /// assert_eq!(state.bytes(), (4 * 2 + 4) * 4);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn bytes(&self) -> usize {
        (self.kv.len() + self.k_sum.len()) * size_of::<f32>()
    }

    /// `S` and `z` copied to the host, in the layouts above.
    ///
    /// ```no_run
    /// use linattn::cuda::{Gpu, GpuLinearState};
    /// let (kv, k_sum) = GpuLinearState::zeros(&Gpu::open(0)?, 1, 2, 4, 3)?.download()?;
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

/// The kernels' view of a problem (`linattn::Shape` in the source).
#[repr(C)]
#[derive(Clone, Copy)]
struct KernelShape {
    batch: i32,
    len: i32,
    heads_q: i32,
    heads_kv: i32,
    dim_k: i32,
    dim_v: i32,
    value_block: i32,
}

// SAFETY: plain old data with the layout of the kernels' struct.
unsafe impl DeviceRepr for KernelShape {}

impl KernelShape {
    fn of(problem: &Problem, value_block: usize) -> Result<Self> {
        let int = |x: usize, what: &str| {
            i32::try_from(x).map_err(|_| {
                Error::Unsupported(format!("{what} {x} is too large for the GPU kernels"))
            })
        };
        Ok(Self {
            batch: int(problem.batch, "batch")?,
            len: int(problem.len_q, "sequence length")?,
            heads_q: int(problem.heads_q, "query heads")?,
            heads_kv: int(problem.heads_kv, "kv heads")?,
            dim_k: int(problem.dim_qk, "head dim")?,
            dim_v: int(problem.dim_v, "value dim")?,
            value_block: value_block as i32,
        })
    }
}

fn round16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// Value columns one block of the chunk kernels handles: a tensor-core tile multiple, at
/// most 64 (every block maps and scores the whole queries and keys, so narrower blocks
/// repeat that work).
fn value_block(dim_v: usize) -> usize {
    round16(dim_v).min(64)
}

/// Segments the causal form splits each sequence into, so that the grid fills the GPU in
/// one wave (the chunk kernels run one block per multiprocessor): each block walks its
/// segment's chunks in order. Returns (segments, rows per segment).
fn causal_segments(processors: usize, len: usize, blocks_per_segment: usize) -> (usize, usize) {
    /// Fewer rows than this per segment and the extra pass over the keys costs more than
    /// the parallelism brings.
    const MIN_SPAN: usize = 8 * CHUNK;
    let wanted = processors / blocks_per_segment;
    let segments = wanted.min(len.div_ceil(MIN_SPAN)).max(1);
    let span = len.div_ceil(segments).next_multiple_of(CHUNK);
    (len.div_ceil(span), span)
}

/// Pieces each segment's sums are split into for the pass that computes them: the most
/// that divide its chunks evenly (the pass walks each piece's chunks in order, as the
/// causal pass does) while the `summed` segments' pieces all run at once on the
/// `resident` blocks the GPU holds. A second, partial wave costs a whole piece's time
/// again: on an H100 at B=4, T=8192 (two segments), eight pieces (512 blocks, 264
/// resident: two per multiprocessor, as their registers allow) took 66 µs, four 56 µs.
fn segment_parts(resident: usize, span: usize, summed: usize) -> usize {
    let wanted = (resident / summed.max(1)).max(1);
    let chunks = span / CHUNK;
    (1..=wanted.min(chunks))
        .rev()
        .find(|parts| chunks.is_multiple_of(*parts))
        .unwrap_or(1)
}

/// Shared memory of the chunk kernels, as `ChunkSmem::carve` lays it out.
fn chunk_shared_bytes(dim_k: usize, value_block: usize, element: usize) -> usize {
    let (dkp, dvp) = (round16(dim_k), value_block);
    let (ldk, ldv, ldc, lds, ldo) = (dkp + PAD, dvp + PAD, CHUNK + PAD, dvp + PAD, dvp + PAD);
    let mut arrays = vec![
        (CHUNK * ldk, element),
        (CHUNK * ldk, element),
        (CHUNK * ldv, element),
        (CHUNK * ldc, 4),
        (dkp * lds, 4),
        (CHUNK * ldo, 4),
        (dkp, 4),
        (CHUNK, 4),
    ];
    if element != 4 {
        arrays.extend([(CHUNK * ldc, element), (dkp * lds, element)]);
    }
    carved_bytes(&arrays)
}

/// Padding of shared-memory rows (`PAD` in common.cuh).
const PAD: usize = 8;

/// Bytes of arrays of `(count, element size)` carved one after another as the kernels'
/// `Carver` does (each rounded up to 128 bytes).
fn carved_bytes(arrays: &[(usize, usize)]) -> usize {
    arrays
        .iter()
        .map(|&(count, size)| (count * size).div_ceil(128) * 128)
        .sum()
}

/// The three passes of linear attention on the GPU.
#[derive(Clone, Copy)]
enum Pass {
    /// The chunked causal forward.
    Causal,
    /// `S` and `z` over spans of the keys.
    State,
    /// The non-causal output from a finished state.
    Apply,
}

/// Which kernels a linear call runs and how they are launched. 16-bit elements with
/// `D_k = D_v` in {64, 128} take the tensor-core kernels (mma.sync, a block of `D / 16`
/// warps per head and segment, the state in registers); everything else the general
/// ones (a block of 256 threads per 64 value columns, WMMA or f32 CUDA cores).
struct LinearPlan {
    shape: KernelShape,
    /// `Some(D)` for the tensor-core kernels.
    tensor_core_dim: Option<usize>,
    element: usize,
    suffix: &'static str,
}

impl LinearPlan {
    fn new<T: GpuElement>(problem: &Problem) -> Result<Self> {
        let element = size_of::<T>();
        let tensor_core_dim =
            (element == 2 && problem.dim_qk == problem.dim_v && matches!(problem.dim_qk, 64 | 128))
                .then_some(problem.dim_qk);
        let width = tensor_core_dim.unwrap_or_else(|| value_block(problem.dim_v));
        Ok(Self {
            shape: KernelShape::of(problem, width)?,
            tensor_core_dim,
            element,
            suffix: T::NAME,
        })
    }

    /// Blocks per (head, segment or span).
    fn value_blocks(&self) -> usize {
        (self.shape.dim_v as usize).div_ceil(self.shape.value_block as usize)
    }

    fn name(&self, pass: Pass) -> String {
        match (self.tensor_core_dim, pass) {
            (Some(dim), Pass::Causal) => format!("linear_causal_mma_{}_d{dim}", self.suffix),
            (Some(dim), Pass::State) => format!("linear_state_mma_{}_d{dim}", self.suffix),
            (Some(dim), Pass::Apply) => format!("linear_apply_mma_{}_d{dim}", self.suffix),
            (None, Pass::Causal) => format!("linear_causal_{}", self.suffix),
            (None, Pass::State) => format!("linear_full_state_{}", self.suffix),
            (None, Pass::Apply) => format!("linear_full_apply_{}", self.suffix),
        }
    }

    /// The launch of `pass` over `units` segments or spans of `heads` heads each.
    fn config(&self, pass: Pass, units: usize, heads: usize) -> Result<LaunchConfig> {
        let batch = self.shape.batch as usize;
        let Some(dim) = self.tensor_core_dim else {
            return Ok(LaunchConfig {
                grid_dim: grid(self.value_blocks(), heads, batch * units)?,
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: chunk_shared_bytes(
                    self.shape.dim_k as usize,
                    self.shape.value_block as usize,
                    self.element,
                ) as u32,
            });
        };
        // As the kernels carve it: tiles of CHUNK rows padded by 8 elements (a ring of
        // three stages of q, k, v for the causal pass, two of k, v for the state, two of q
        // to apply it), then the causal pass's scores by parity and its f32 vectors
        // (denominators, row sums per key block and key sums, each by parity); the apply
        // pass's denominators and key sums.
        let tile = CHUNK * (dim + PAD) * self.element;
        let (shared, warps) = match pass {
            Pass::Causal => (
                9 * tile
                    + 2 * CHUNK * (CHUNK + PAD) * self.element
                    + (2 * CHUNK + 2 * CHUNK / 16 * CHUNK + 2 * dim) * 4,
                CAUSAL_PRODUCER_WARPS + dim / 16,
            ),
            Pass::State => (4 * tile, dim / 16),
            Pass::Apply => (2 * tile + (CHUNK + dim) * 4, dim / 16),
        };
        Ok(LaunchConfig {
            grid_dim: grid(units, heads, batch)?,
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        })
    }
}

fn grid(x: usize, y: usize, z: usize) -> Result<(u32, u32, u32)> {
    let fits = |n: usize, limit: u32| u32::try_from(n).ok().filter(|&n| n <= limit);
    match (fits(x, i32::MAX as u32), fits(y, 65535), fits(z, 65535)) {
        (Some(x), Some(y), Some(z)) => Ok((x, y, z)),
        _ => Err(Error::Unsupported(format!(
            "a grid of {x} x {y} x {z} blocks is beyond the GPU's limits"
        ))),
    }
}

impl Attention {
    /// [`Attention::forward`] on the GPU, for tensors already there. Runs `linear`
    /// attention (full, and causal in the chunked form), non-causal `performer` (head
    /// dims multiples of 16 up to 128, up to 256 features) and exact attention
    /// (`softmax`, `window`: full, causal or windowed, head dims up to 256); other
    /// methods and forms are [`Error::Unsupported`] on the GPU for now.
    ///
    /// ```no_run
    /// use linattn::{Attention, Method, Tensor, cuda::{Gpu, GpuTensor}};
    /// let gpu = Gpu::open(0)?;
    /// let x = GpuTensor::<f32>::upload(&gpu, &Tensor::randn([1, 100, 2, 16], 0)?)?;
    /// let out = Attention::new(Method::linear()).forward_cuda(&gpu, &x, &x, &x)?;
    /// assert_eq!(out.shape(), [1, 100, 2, 16]);
    /// let x = GpuTensor::<half::bf16>::upload(&gpu, &Tensor::randn([1, 100, 2, 64], 0)?)?;
    /// let out = Attention::new(Method::softmax()).causal(true).forward_cuda(&gpu, &x, &x, &x)?;
    /// assert_eq!(out.shape(), [1, 100, 2, 64]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn forward_cuda<T: GpuElement>(
        &self,
        gpu: &Gpu,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
    ) -> Result<GpuTensor<T>> {
        let problem = self.problem(q.shape, k.shape, v.shape)?;
        if let Method::Performer(performer) = &self.method {
            return performer_full(gpu, &problem, performer, [q, k, v]);
        }
        let exact = |scale, left, right| ExactMask { scale, left, right };
        let mask = match &self.method {
            Method::Linear(_) => None,
            Method::Softmax(m) => Some(exact(m.scale, None, problem.causal.then_some(0))),
            Method::Window(m) => Some(exact(
                m.scale,
                m.left,
                if problem.causal { Some(0) } else { m.right },
            )),
            other => {
                return Err(Error::Unsupported(format!(
                    "{} does not run on the GPU yet (linear, performer, softmax and window do)",
                    other.name()
                )));
            }
        };
        let problem = match mask {
            Some(_) => problem,
            None => self.linear_problem(problem)?,
        };
        let mut out = GpuTensor::for_output(gpu, problem.out_shape())?;
        match mask {
            Some(mask) => softmax_forward(gpu, &problem, mask, [q, k, v], &mut out)?,
            None if problem.causal => {
                linear_causal(gpu, &problem, [q, k, v], &mut out, None, None, None)?
            }
            None => linear_full(gpu, &problem, q, k, v, &mut out)?,
        }
        Ok(out)
    }

    /// The causal forward on the GPU that also starts from `state` (the tokens before
    /// these) and leaves in it the state after them: prefill for
    /// [`Attention::decode_step_cuda`].
    ///
    /// ```no_run
    /// use linattn::{Attention, Method, Tensor, cuda::{Gpu, GpuLinearState, GpuTensor}};
    /// let gpu = Gpu::open(0)?;
    /// let x = GpuTensor::<f32>::upload(&gpu, &Tensor::randn([1, 100, 2, 16], 0)?)?;
    /// let mut state = GpuLinearState::zeros(&gpu, 1, 2, 16, 16)?;
    /// let attention = Attention::new(Method::linear()).causal(true);
    /// let out = attention.prefill_cuda(&gpu, &x, &x, &x, &mut state)?;
    /// assert_eq!(out.shape(), [1, 100, 2, 16]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn prefill_cuda<T: GpuElement>(
        &self,
        gpu: &Gpu,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
        state: &mut GpuLinearState,
    ) -> Result<GpuTensor<T>> {
        let problem = self.gpu_problem(q, k, v)?;
        if !problem.causal {
            return Err(Error::InvalidConfig(
                "prefill needs a causal attention".into(),
            ));
        }
        check_state(state, &problem)?;
        let mut out = GpuTensor::for_output(gpu, problem.out_shape())?;
        // The kernel's blocks of one kv head read its start while others may already
        // write its end (GQA): the start is a copy.
        let copy = |slice: &CudaSlice<f32>| {
            slice
                .try_clone()
                .map_err(|e| cuda_error("copying the state on the GPU", e))
        };
        let (previous, previous_sum) = (copy(&state.kv)?, copy(&state.k_sum)?);
        linear_causal(
            gpu,
            &problem,
            [q, k, v],
            &mut out,
            Some((&previous, &previous_sum)),
            Some((&mut state.kv, &mut state.k_sum)),
            None,
        )?;
        Ok(out)
    }

    /// One recurrent step on the GPU for a batch of single tokens (`[B, 1, H, D]`):
    /// absorbs k and v into `state` in place and returns each query's output. Memory
    /// and time per step do not grow with the tokens seen.
    ///
    /// ```no_run
    /// use linattn::{Attention, Method, Tensor, cuda::{Gpu, GpuLinearState, GpuTensor}};
    /// let gpu = Gpu::open(0)?;
    /// let token = GpuTensor::<f32>::upload(&gpu, &Tensor::randn([32, 1, 16, 128], 0)?)?;
    /// let mut state = GpuLinearState::zeros(&gpu, 32, 16, 128, 128)?;
    /// let attention = Attention::new(Method::linear()).causal(true);
    /// let out = attention.decode_step_cuda(&gpu, &token, &token, &token, &mut state)?;
    /// assert_eq!(out.shape(), [32, 1, 16, 128]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn decode_step_cuda<T: GpuElement>(
        &self,
        gpu: &Gpu,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
        state: &mut GpuLinearState,
    ) -> Result<GpuTensor<T>> {
        let problem = self.gpu_problem(q, k, v)?;
        if problem.len_q != 1 {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "a decode step takes one token per sequence, not {}",
                    problem.len_q
                ),
            });
        }
        if problem.dim_v > DECODE_WIDE_DIM {
            return Err(Error::Unsupported(format!(
                "decode on the GPU takes value dims up to {DECODE_WIDE_DIM}, not {}",
                problem.dim_v
            )));
        }
        check_state(state, &problem)?;
        let mut out = GpuTensor::for_output(gpu, problem.out_shape())?;
        let warps = THREADS as usize / 32;
        let floats = problem.dim_qk * (2 + DECODE_HEADS)
            + problem.dim_v
            + DECODE_HEADS
            + warps * DECODE_HEADS * problem.dim_v;
        let config = LaunchConfig {
            grid_dim: grid(problem.heads_kv, problem.batch, 1)?,
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: (floats * 4) as u32,
        };
        let shape = KernelShape::of(&problem, 0)?;
        let width = if problem.dim_v <= DECODE_NARROW_DIM {
            ""
        } else {
            "wide_"
        };
        let name = format!("linear_decode_{width}{}", T::NAME);
        let function = gpu.kernel(&name, config.shared_mem_bytes)?;
        let mut args = gpu.stream.launch_builder(&function);
        args.arg(&q.data)
            .arg(&k.data)
            .arg(&v.data)
            .arg(&mut out.data)
            .arg(&shape)
            .arg(&LINEAR_EPSILON)
            .arg(&mut state.kv)
            .arg(&mut state.k_sum);
        // SAFETY: linear_decode's arguments; the state was checked against the shape.
        unsafe { launch(args, config, &name) }?;
        Ok(out)
    }

    /// Causal linear attention on the GPU as [`forward_cuda`](Self::forward_cuda), keeping
    /// what [`backward_cuda`](Self::backward_cuda) needs: the output and each row's
    /// denominator (4 bytes per row and head). Takes what `backward_cuda` takes.
    ///
    /// ```no_run
    /// use half::bf16;
    /// use linattn::{Attention, Method, Tensor, cuda::{Gpu, GpuTensor}};
    /// let gpu = Gpu::open(0)?;
    /// let x = GpuTensor::<bf16>::upload(&gpu, &Tensor::randn([1, 256, 2, 64], 0)?)?;
    /// let attention = Attention::new(Method::linear()).causal(true);
    /// let forward = attention.forward_training_cuda(&gpu, &x, &x, &x)?;
    /// assert_eq!(forward.out.shape(), [1, 256, 2, 64]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn forward_training_cuda(
        &self,
        gpu: &Gpu,
        q: &GpuTensor<half::bf16>,
        k: &GpuTensor<half::bf16>,
        v: &GpuTensor<half::bf16>,
    ) -> Result<GpuForward> {
        let problem = self.backward_problem(q, k, v)?;
        let mut out = GpuTensor::for_output(gpu, problem.out_shape())?;
        let rows = problem.batch * problem.len_q * problem.heads_q;
        // SAFETY: the causal kernel writes every row's denominator.
        let mut den = unsafe { gpu.stream.alloc::<f32>(rows) }
            .map_err(|e| allocation_error::<f32>(rows, e))?;
        linear_causal(
            gpu,
            &problem,
            [q, k, v],
            &mut out,
            None,
            None,
            Some(&mut den),
        )?;
        Ok(GpuForward { out, den })
    }

    /// Gradients of causal linear attention on the GPU: ∂loss/∂q, ∂loss/∂k, ∂loss/∂v
    /// from ∂loss/∂out and what [`forward_training_cuda`](Self::forward_training_cuda)
    /// kept of the same call, for bf16 heads with `D_k = D_v` in {64, 128} and as many
    /// kv heads as query heads (other cases are refused with [`Error::Unsupported`]; the
    /// CPU's [`Attention::backward`] takes them all). The gradients are three passes of
    /// the causal tensor-core kernel without feature map or denominator (one causal, two
    /// walking the sequence backwards) and prefix sums for the denominator's terms.
    ///
    /// ```no_run
    /// use half::bf16;
    /// use linattn::{Attention, Method, Tensor, cuda::{Gpu, GpuTensor}};
    /// let gpu = Gpu::open(0)?;
    /// let x = GpuTensor::<bf16>::upload(&gpu, &Tensor::randn([1, 256, 2, 64], 0)?)?;
    /// let attention = Attention::new(Method::linear()).causal(true);
    /// let forward = attention.forward_training_cuda(&gpu, &x, &x, &x)?;
    /// let gradients = attention.backward_cuda(&gpu, &x, &x, &x, &forward, &x)?;
    /// assert_eq!(gradients.dq.shape(), [1, 256, 2, 64]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn backward_cuda(
        &self,
        gpu: &Gpu,
        q: &GpuTensor<half::bf16>,
        k: &GpuTensor<half::bf16>,
        v: &GpuTensor<half::bf16>,
        forward: &GpuForward,
        d_out: &GpuTensor<half::bf16>,
    ) -> Result<GpuGradients> {
        let problem = self.backward_problem(q, k, v)?;
        for (what, shape) in [
            ("output gradient", d_out.shape),
            ("saved output", forward.out.shape),
        ] {
            if shape != problem.out_shape() {
                return Err(Error::ShapeMismatch {
                    detail: format!(
                        "the {what} has shape {shape:?} but the output has shape {:?}",
                        problem.out_shape()
                    ),
                });
            }
        }
        let (out, den) = (&forward.out, &forward.den);
        let shape = problem.out_shape();
        let rows = problem.batch * problem.len_q * problem.heads_q;
        // SAFETY (the allocations below): each buffer is written in full by the kernel
        // that produces it before any kernel reads it.
        let floats = |count: usize| {
            unsafe { gpu.stream.alloc::<f32>(count) }.map_err(|e| allocation_error::<f32>(count, e))
        };
        let tensor = || GpuTensor::<half::bf16>::for_output(gpu, shape);

        let dim = problem.dim_qk;
        let shape_arg = KernelShape::of(&problem, dim)?;
        let (mut g, mut phi_q, mut phi_k) = (tensor()?, tensor()?, tensor()?);
        let mut h = floats(rows)?;
        // The prepare kernel gives each row dim/4 threads of 256 per block.
        const THREADS: usize = 256;
        let name = format!("linear_backward_prepare_bf16_d{dim}");
        let function = gpu.kernel_of(Source::LinearBackward, &name, 0)?;
        let config = LaunchConfig {
            grid_dim: grid((rows * dim / 4).div_ceil(THREADS), 1, 1)?,
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let row_count = rows as i64;
        let mut args = gpu.stream.launch_builder(&function);
        args.arg(&q.data)
            .arg(&k.data)
            .arg(&out.data)
            .arg(&d_out.data)
            .arg(den)
            .arg(&mut g.data)
            .arg(&mut h)
            .arg(&mut phi_q.data)
            .arg(&mut phi_k.data)
            .arg(&row_count);
        // SAFETY: the prepare kernel's arguments, each [B, T, H, D] or [B, T, H].
        unsafe { launch(args, config, &name) }?;

        // The first terms of dφ(q) and dφ(k) nearly cancel what the prefix sums add to
        // them (g_i · v_j + h_i = g_i · (v_j − o_i)): they stay in f32.
        let (mut a, mut bk) = (
            GpuTensor::<f32>::for_output(gpu, shape)?,
            GpuTensor::<f32>::for_output(gpu, shape)?,
        );
        let mut dv = tensor()?;
        linear_plain(gpu, &problem, [&g, v, &phi_k], &mut a, false)?;
        linear_plain(gpu, &problem, [v, &g, &phi_q], &mut bk, true)?;
        linear_plain(gpu, &problem, [&phi_k, &phi_q, &g], &mut dv, true)?;

        let chunks = problem.len_q.div_ceil(CHUNK);
        let sums = problem.batch * problem.heads_q * chunks * dim;
        let (mut key_sums, mut query_sums) = (floats(sums)?, floats(sums)?);
        let per_chunk = LaunchConfig {
            grid_dim: grid(chunks, problem.heads_q, problem.batch)?,
            block_dim: (dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let name = format!("linear_backward_chunk_sums_bf16_d{dim}");
        let function = gpu.kernel_of(Source::LinearBackward, &name, 0)?;
        let mut args = gpu.stream.launch_builder(&function);
        args.arg(&phi_q.data)
            .arg(&phi_k.data)
            .arg(&h)
            .arg(&shape_arg)
            .arg(&mut key_sums)
            .arg(&mut query_sums);
        // SAFETY: the chunk-sums kernel's arguments, sized for its grid.
        unsafe { launch(args, per_chunk, &name) }?;

        let name = format!("linear_backward_scan_bf16_d{dim}");
        let function = gpu.kernel_of(Source::LinearBackward, &name, 0)?;
        let per_head = LaunchConfig {
            grid_dim: grid(problem.heads_q, problem.batch, 1)?,
            block_dim: (dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let chunk_count = chunks as i32;
        let mut args = gpu.stream.launch_builder(&function);
        args.arg(&shape_arg)
            .arg(&chunk_count)
            .arg(&mut key_sums)
            .arg(&mut query_sums);
        // SAFETY: the scan kernel's arguments, the sums as the chunk-sums kernel wrote them.
        unsafe { launch(args, per_head, &name) }?;

        let (mut dq, mut dk) = (tensor()?, tensor()?);
        let name = format!("linear_backward_finish_bf16_d{dim}");
        let function = gpu.kernel_of(Source::LinearBackward, &name, 0)?;
        let mut args = gpu.stream.launch_builder(&function);
        args.arg(&q.data)
            .arg(&k.data)
            .arg(&h)
            .arg(&a.data)
            .arg(&bk.data)
            .arg(&key_sums)
            .arg(&query_sums)
            .arg(&shape_arg)
            .arg(&mut dq.data)
            .arg(&mut dk.data);
        let two_columns_per_thread = LaunchConfig {
            block_dim: (dim as u32 / 2, 1, 1),
            ..per_chunk
        };
        // SAFETY: the finishing kernel's arguments, all [B, T, H, D], [B, T, H] or the
        // scanned sums.
        unsafe { launch(args, two_columns_per_thread, &name) }?;
        Ok(GpuGradients { dq, dk, dv })
    }

    /// The problem of a training call on the GPU, and whether the backward kernels take it.
    fn backward_problem(
        &self,
        q: &GpuTensor<half::bf16>,
        k: &GpuTensor<half::bf16>,
        v: &GpuTensor<half::bf16>,
    ) -> Result<Problem> {
        let problem = self.gpu_problem(q, k, v)?;
        let supported = problem.causal
            && problem.heads_q == problem.heads_kv
            && problem.dim_qk == problem.dim_v
            && matches!(problem.dim_qk, 64 | 128);
        if !supported {
            return Err(Error::Unsupported(format!(
                "the GPU backward takes causal linear attention with head dims 64 or 128 (k's = \
                 v's) and as many kv heads as query heads, not causal = {}, dims {} and {}, \
                 {} query and {} kv heads; Attention::backward on the CPU takes it",
                problem.causal, problem.dim_qk, problem.dim_v, problem.heads_q, problem.heads_kv
            )));
        }
        Ok(problem)
    }

    /// The problem of a linear call on the GPU: shapes checked as on the CPU, then what
    /// the linear kernels take (lengths of k and v equal to q's).
    fn gpu_problem<T: GpuElement>(
        &self,
        q: &GpuTensor<T>,
        k: &GpuTensor<T>,
        v: &GpuTensor<T>,
    ) -> Result<Problem> {
        self.linear_problem(self.problem(q.shape, k.shape, v.shape)?)
    }

    /// `problem` (checked as on the CPU) if the linear kernels take it.
    fn linear_problem(&self, problem: Problem) -> Result<Problem> {
        if !matches!(self.method, Method::Linear(_)) {
            return Err(Error::Unsupported(format!(
                "{} has no recurrent form on the GPU (linear does)",
                self.method.name()
            )));
        }
        if problem.len_q != problem.len_k {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "on the GPU q and k must have the same length, not {} and {}",
                    problem.len_q, problem.len_k
                ),
            });
        }
        Ok(problem)
    }
}

fn check_state(state: &GpuLinearState, problem: &Problem) -> Result<()> {
    let expected = (
        problem.batch,
        problem.heads_kv,
        problem.dim_qk,
        problem.dim_v,
    );
    let actual = (state.batch, state.heads_kv, state.dim_k, state.dim_v);
    if expected != actual {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "the state is for (batch, kv heads, dim k, dim v) = {actual:?}, the tokens need {expected:?}"
            ),
        });
    }
    Ok(())
}

type StateRef<'a> = (&'a CudaSlice<f32>, &'a CudaSlice<f32>);
type StateMut<'a> = (&'a mut CudaSlice<f32>, &'a mut CudaSlice<f32>);

/// How the causal passes split each sequence (`causal_segments`), and the sums over every
/// segment but the last that give each segment its start: `parts` pieces per segment,
/// stored apart, so that this pass fills the GPU too. `state_kernel` is the state pass
/// matching the causal kernel (mapped or plain, forwards or backwards).
struct Segments {
    span: usize,
    count: usize,
    parts: usize,
    /// `[B, H_kv, (count - 1) parts, D_k, D_v]` and `[B, H_kv, (count - 1) parts, D_k]`.
    sums: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
}

impl Segments {
    fn of<T: GpuElement>(
        gpu: &Gpu,
        problem: &Problem,
        plan: &LinearPlan,
        [k, v]: [&GpuTensor<T>; 2],
        state_kernel: (Source, &str),
    ) -> Result<Self> {
        let (count, span) = causal_segments(
            gpu.processors,
            problem.len_q,
            plan.value_blocks() * problem.heads_q * problem.batch,
        );
        if count == 1 {
            return Ok(Self {
                span,
                count,
                parts: 1,
                sums: None,
            });
        }
        let (source, name) = state_kernel;
        let one_block = plan.config(Pass::State, 1, 1)?;
        let per_processor = gpu
            .kernel_of(source, name, one_block.shared_mem_bytes)?
            .occupancy_max_active_blocks_per_multiprocessor(
                one_block.block_dim.0,
                one_block.shared_mem_bytes as usize,
                None,
            )
            .map_err(|e| cuda_error(&format!("asking how many {name} blocks fit"), e))?;
        let parts = segment_parts(
            gpu.processors * per_processor.max(1) as usize,
            span,
            (count - 1) * problem.batch * problem.heads_kv,
        );
        let summed = (count - 1) * parts;
        let per_head = problem.batch * problem.heads_kv * summed * problem.dim_qk;
        // SAFETY: the state pass stores every element (one piece per block) before the
        // causal pass reads them.
        let (mut kv, mut sums) = unsafe {
            let count = per_head * problem.dim_v;
            let kv = gpu.stream.alloc::<f32>(count);
            let sums = gpu.stream.alloc::<f32>(per_head);
            (
                kv.map_err(|e| allocation_error::<f32>(count, e))?,
                sums.map_err(|e| allocation_error::<f32>(per_head, e))?,
            )
        };
        let config = plan.config(Pass::State, summed, problem.heads_kv)?;
        key_sums(
            gpu,
            plan,
            state_kernel,
            [k, v],
            config,
            span / parts,
            true,
            [&mut kv, &mut sums],
        )?;
        Ok(Self {
            span,
            count,
            parts,
            sums: Some((kv, sums)),
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn linear_causal<T: GpuElement>(
    gpu: &Gpu,
    problem: &Problem,
    [q, k, v]: [&GpuTensor<T>; 3],
    out: &mut GpuTensor<T>,
    state_in: Option<StateRef<'_>>,
    state_out: Option<StateMut<'_>>,
    den_out: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    let plan = LinearPlan::new::<T>(problem)?;
    let state_name = plan.name(Pass::State);
    let segments = Segments::of(gpu, problem, &plan, [k, v], (Source::Linear, &state_name))?;
    let config = plan.config(Pass::Causal, segments.count, problem.heads_q)?;
    // Absent states are null pointers, which the kernel checks; the guards order the
    // buffers' use on the stream and must outlive the launch.
    let stream = &gpu.stream;
    let (kv_in, _kv_in_guard) = state_in.map(|(kv, _)| kv.device_ptr(stream)).unzip();
    let (k_sum_in, _k_sum_in_guard) = state_in.map(|(_, sum)| sum.device_ptr(stream)).unzip();
    let (state_out, sum_out) = state_out.unzip();
    let (kv_out, _kv_out_guard) = state_out.map(|kv| kv.device_ptr_mut(stream)).unzip();
    let (k_sum_out, _k_sum_out_guard) = sum_out.map(|sum| sum.device_ptr_mut(stream)).unzip();
    let (segment_kv, _segment_kv_guard) = segments
        .sums
        .as_ref()
        .map(|(kv, _)| kv.device_ptr(stream))
        .unzip();
    let (segment_sum, _segment_sum_guard) = segments
        .sums
        .as_ref()
        .map(|(_, sum)| sum.device_ptr(stream))
        .unzip();
    let (den, _den_guard) = den_out.map(|den| den.device_ptr_mut(stream)).unzip();
    let [
        kv_in,
        k_sum_in,
        kv_out,
        k_sum_out,
        segment_kv,
        segment_sum,
        den,
    ] = [
        kv_in,
        k_sum_in,
        kv_out,
        k_sum_out,
        segment_kv,
        segment_sum,
        den,
    ]
    .map(|ptr| ptr.unwrap_or(0));
    let (span, parts) = (segments.span as i32, segments.parts as i32);
    let name = plan.name(Pass::Causal);
    let function = gpu.kernel(&name, config.shared_mem_bytes)?;
    let mut args = gpu.stream.launch_builder(&function);
    args.arg(&q.data)
        .arg(&k.data)
        .arg(&v.data)
        .arg(&mut out.data)
        .arg(&plan.shape)
        .arg(&LINEAR_EPSILON)
        .arg(&kv_in)
        .arg(&k_sum_in)
        .arg(&kv_out)
        .arg(&k_sum_out)
        .arg(&span)
        .arg(&parts)
        .arg(&segment_kv)
        .arg(&segment_sum)
        .arg(&den);
    // SAFETY: linear_causal's arguments; states, when present, were checked, and the
    // denominators hold a row per query row and head.
    unsafe { launch(args, config, &name) }
}

/// `Σ_{j ≤ i} (q_i · k_j) v_j` for every row i, or `Σ_{j ≥ i}` when `reverse`: linear
/// attention without feature map or denominator, the terms of the backward pass, on the
/// causal tensor-core kernel (bf16 operands, `D_k = D_v` in {64, 128}), into `out` in
/// f32 or bf16 (the instances linear_backward.cu has).
fn linear_plain<O: GpuElement>(
    gpu: &Gpu,
    problem: &Problem,
    [q, k, v]: [&GpuTensor<half::bf16>; 3],
    out: &mut GpuTensor<O>,
    reverse: bool,
) -> Result<()> {
    let plan = LinearPlan::new::<half::bf16>(problem)?;
    let dim = plan.tensor_core_dim.ok_or_else(|| {
        Error::Unsupported("the plain passes take bf16 head dims of 64 or 128".into())
    })?;
    let direction = if reverse { "anticausal_" } else { "" };
    let state_name = format!("linear_{direction}state_plain_bf16_d{dim}");
    let segments = Segments::of(
        gpu,
        problem,
        &plan,
        [k, v],
        (Source::LinearBackward, &state_name),
    )?;
    let config = plan.config(Pass::Causal, segments.count, problem.heads_q)?;
    let stream = &gpu.stream;
    let (segment_kv, _segment_kv_guard) = segments
        .sums
        .as_ref()
        .map(|(kv, _)| kv.device_ptr(stream))
        .unzip();
    let segment_kv = segment_kv.unwrap_or(0);
    let (span, parts) = (segments.span as i32, segments.parts as i32);
    let causality = if reverse { "anticausal" } else { "causal" };
    let name = format!("linear_{causality}_plain_bf16_{}_d{dim}", O::NAME);
    let function = gpu.kernel_of(Source::LinearBackward, &name, config.shared_mem_bytes)?;
    let mut args = gpu.stream.launch_builder(&function);
    args.arg(&q.data)
        .arg(&k.data)
        .arg(&v.data)
        .arg(&mut out.data)
        .arg(&plan.shape)
        .arg(&span)
        .arg(&parts)
        .arg(&segment_kv);
    // SAFETY: the plain kernel's arguments; the segment sums cover its segments.
    unsafe { launch(args, config, &name) }
}

/// `S = Σ φ(k) vᵀ` and `z = Σ φ(k)` over the spans of `span` rows that `config`'s grid covers:
/// each span's sums stored apart when `per_span` (the causal form's segments), else
/// added into one zeroed state per head (the non-causal form's first pass).
#[allow(clippy::too_many_arguments)]
fn key_sums<T: GpuElement>(
    gpu: &Gpu,
    plan: &LinearPlan,
    (source, name): (Source, &str),
    [k, v]: [&GpuTensor<T>; 2],
    config: LaunchConfig,
    span: usize,
    per_span: bool,
    [kv, k_sum]: [&mut CudaSlice<f32>; 2],
) -> Result<()> {
    let function = gpu.kernel_of(source, name, config.shared_mem_bytes)?;
    let mut args = gpu.stream.launch_builder(&function);
    let (span, per_span) = (span as i32, i32::from(per_span));
    args.arg(&k.data)
        .arg(&v.data)
        .arg(&plan.shape)
        .arg(&span)
        .arg(kv)
        .arg(k_sum)
        .arg(&per_span);
    // SAFETY: linear_full_state's arguments; the caller sized the sums for the spans.
    unsafe { launch(args, config, name) }
}

fn linear_full<T: GpuElement>(
    gpu: &Gpu,
    problem: &Problem,
    q: &GpuTensor<T>,
    k: &GpuTensor<T>,
    v: &GpuTensor<T>,
    out: &mut GpuTensor<T>,
) -> Result<()> {
    let plan = LinearPlan::new::<T>(problem)?;
    let mut state = GpuLinearState::zeros(
        gpu,
        problem.batch,
        problem.heads_kv,
        problem.dim_qk,
        problem.dim_v,
    )?;
    let spans = problem.len_q.div_ceil(FULL_SPAN);
    let config = plan.config(Pass::State, spans, problem.heads_kv)?;
    key_sums(
        gpu,
        &plan,
        (Source::Linear, &plan.name(Pass::State)),
        [k, v],
        config,
        FULL_SPAN,
        false,
        [&mut state.kv, &mut state.k_sum],
    )?;
    let config = plan.config(Pass::Apply, spans, problem.heads_q)?;
    let name = plan.name(Pass::Apply);
    let function = gpu.kernel(&name, config.shared_mem_bytes)?;
    let mut args = gpu.stream.launch_builder(&function);
    let span = FULL_SPAN as i32;
    args.arg(&q.data)
        .arg(&mut out.data)
        .arg(&plan.shape)
        .arg(&span)
        .arg(&LINEAR_EPSILON)
        .arg(&state.kv)
        .arg(&state.k_sum);
    // SAFETY: the apply kernel's arguments and the state the first pass filled.
    unsafe { launch(args, config, &name) }
}

/// Most random features and widest heads the FAVOR+ kernels hold (`MAX_FEATURES` in
/// performer.cu; the projection's rows in shared memory).
const PERFORMER_MAX_FEATURES: usize = 256;
const PERFORMER_MAX_DIM: usize = 128;
/// Threads per block of the FAVOR+ kernels.
const PERFORMER_THREADS: u32 = 256;

/// [`carved_bytes`] as a launch's dynamic shared memory.
fn shared_bytes(arrays: &[(usize, usize)]) -> Result<u32> {
    u32::try_from(carved_bytes(arrays))
        .map_err(|_| Error::Unsupported("shared memory beyond 4 GiB".into()))
}

/// Non-causal Performer (FAVOR+) on the GPU: the key pass per span, the merge of the
/// spans, the query pass, each mapping its rows itself.
fn performer_full<T: GpuElement>(
    gpu: &Gpu,
    problem: &Problem,
    performer: &crate::Performer,
    [q, k, v]: [&GpuTensor<T>; 3],
) -> Result<GpuTensor<T>> {
    if problem.causal {
        return Err(Error::Unsupported(
            "performer's causal form does not run on the GPU yet (its non-causal form does)".into(),
        ));
    }
    if problem.len_q != problem.len_k {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "on the GPU q and k must have the same length, not {} and {}",
                problem.len_q, problem.len_k
            ),
        });
    }
    let (dim, features, dim_v) = (problem.dim_qk, performer.num_features(), problem.dim_v);
    if !dim.is_multiple_of(16)
        || dim > PERFORMER_MAX_DIM
        || !features.is_multiple_of(16)
        || features > PERFORMER_MAX_FEATURES
    {
        return Err(Error::Unsupported(format!(
            "performer on the GPU takes head dims and feature counts that are multiples of 16, \
             up to {PERFORMER_MAX_DIM} and {PERFORMER_MAX_FEATURES}, not {dim} and {features}"
        )));
    }
    // x' = x d^(-1/4) folded into omega, rounded once to the inputs' type.
    let scale = (dim as f64).powf(-0.25);
    let omega: Vec<T> = performer
        .omega(dim)?
        .iter()
        .map(|&w| T::from_f32((w * scale) as f32))
        .collect();
    let omega = gpu
        .stream
        .clone_htod(&omega)
        .map_err(|e| cuda_error("copying omega to the GPU", e))?;
    let element = size_of::<T>();
    let block = value_block(dim_v);
    let shape = KernelShape::of(problem, block)?;
    let (batch, heads_kv) = (problem.batch, problem.heads_kv);
    let spans = problem.len_k.div_ceil(FULL_SPAN);
    let head_spans = batch * heads_kv * spans;
    let mut states = gpu.alloc::<f32>(head_spans * features * dim_v)?;
    let mut k_sums = gpu.alloc::<f32>(head_spans * features)?;
    let mut v_sums = gpu.alloc::<f32>(head_spans * dim_v)?;
    let mut maxima = gpu.alloc::<f32>(head_spans)?;
    let ratio = (features as f32).powf(-0.5);
    let (features_arg, span) = (features as i32, FULL_SPAN as i32);

    let shared = shared_bytes(&[
        (CHUNK * (dim + PAD), element),
        (CHUNK * (features + PAD), 4),
        (CHUNK * (block + PAD), element),
        (features * (block + PAD), 4),
        (features, 4),
        (block, 4),
        (CHUNK, 4),
        (32, 4),
    ])?;
    let name = format!("performer_keys_{}", T::NAME);
    let function = gpu.kernel_of(Source::Performer, &name, shared)?;
    let config = LaunchConfig {
        grid_dim: grid(dim_v.div_ceil(block), heads_kv, batch * spans)?,
        block_dim: (PERFORMER_THREADS, 1, 1),
        shared_mem_bytes: shared,
    };
    let mut args = gpu.stream.launch_builder(&function);
    args.arg(&k.data)
        .arg(&v.data)
        .arg(&omega)
        .arg(&shape)
        .arg(&features_arg)
        .arg(&span)
        .arg(&ratio)
        .arg(&mut states)
        .arg(&mut k_sums)
        .arg(&mut v_sums)
        .arg(&mut maxima);
    // SAFETY: the key pass's arguments; the span sums sized for its grid.
    unsafe { launch(args, config, &name) }?;

    let mut state = gpu.alloc::<f32>(batch * heads_kv * features * dim_v)?;
    let mut k_sum = gpu.alloc::<f32>(batch * heads_kv * features)?;
    let function = gpu.kernel_of(Source::Performer, "performer_merge", 0)?;
    let config = LaunchConfig {
        grid_dim: grid(heads_kv, batch, 1)?,
        block_dim: (PERFORMER_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (span_count, constant) = (
        spans as i32,
        ratio * crate::engine::feature_map::FAVOR_EPSILON as f32,
    );
    let mut args = gpu.stream.launch_builder(&function);
    args.arg(&shape)
        .arg(&features_arg)
        .arg(&span_count)
        .arg(&constant)
        .arg(&states)
        .arg(&k_sums)
        .arg(&v_sums)
        .arg(&maxima)
        .arg(&mut state)
        .arg(&mut k_sum);
    // SAFETY: the merge's arguments, the span sums the key pass wrote.
    unsafe { launch(args, config, "performer_merge") }?;

    let mut out = GpuTensor::for_output(gpu, problem.out_shape())?;
    let shared = shared_bytes(&[
        (CHUNK * (dim + PAD), element),
        (CHUNK * (features + PAD), 4),
        (features * (block + PAD), element),
        (CHUNK * (block + PAD), 4),
        (features, 4),
        (CHUNK, 4),
        (CHUNK, 4),
    ])?;
    let name = format!("performer_apply_{}", T::NAME);
    let function = gpu.kernel_of(Source::Performer, &name, shared)?;
    let config = LaunchConfig {
        grid_dim: grid(dim_v.div_ceil(block), problem.heads_q, batch * spans)?,
        block_dim: (PERFORMER_THREADS, 1, 1),
        shared_mem_bytes: shared,
    };
    let eps = crate::engine::feature_map::FAVOR_EPSILON as f32;
    let mut args = gpu.stream.launch_builder(&function);
    args.arg(&q.data)
        .arg(&omega)
        .arg(&mut out.data)
        .arg(&shape)
        .arg(&features_arg)
        .arg(&span)
        .arg(&ratio)
        .arg(&eps)
        .arg(&state)
        .arg(&k_sum);
    // SAFETY: the query pass's arguments and the merged state.
    unsafe { launch(args, config, &name) }?;
    Ok(out)
}

/// Which keys exact attention sees, and its scale, as the CPU method says.
#[derive(Clone, Copy)]
struct ExactMask {
    scale: Option<f64>,
    left: Option<usize>,
    right: Option<usize>,
}

/// The exact kernel's view of a problem (`linattn::flash::Problem` in the source).
#[repr(C)]
#[derive(Clone, Copy)]
struct FlashProblem {
    batch: i32,
    len_q: i32,
    len_k: i32,
    heads_q: i32,
    heads_kv: i32,
    left: i32,
    right: i32,
    scale_log2: f32,
}

// SAFETY: plain old data with the layout of the kernel's struct.
unsafe impl DeviceRepr for FlashProblem {}

impl FlashProblem {
    /// The kernels' arguments for `problem` with `mask`, or why they do not take it.
    fn of(problem: &Problem, mask: ExactMask) -> Result<Self> {
        let dim = problem.dim_qk;
        if dim.max(problem.dim_v) > GENERAL_EXACT_MAX_DIM {
            return Err(Error::Unsupported(format!(
                "exact attention on the GPU takes head dims up to {GENERAL_EXACT_MAX_DIM}, \
                 not {dim} and {}",
                problem.dim_v
            )));
        }
        let scale = resolve_scale(mask.scale, dim)?;
        let int = |x: usize, what: &str| {
            i32::try_from(x).map_err(|_| {
                Error::Unsupported(format!("{what} {x} is too large for the GPU kernels"))
            })
        };
        let (len_q, len_k) = (
            int(problem.len_q, "query length")?,
            int(problem.len_k, "key length")?,
        );
        // Windows as wide as the sequences are no windows: -1, which the kernel reads as
        // unbounded (and which keeps its index arithmetic within i32).
        let longest = len_q.max(len_k) as usize;
        let bound = |side: Option<usize>| side.filter(|&x| x < longest).map_or(-1, |x| x as i32);
        Ok(Self {
            batch: int(problem.batch, "batch")?,
            len_q,
            len_k,
            heads_q: int(problem.heads_q, "query heads")?,
            heads_kv: int(problem.heads_kv, "kv heads")?,
            left: bound(mask.left),
            right: bound(mask.right),
            scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
        })
    }
}

/// Exact softmax attention: on the tensor cores for 16-bit tensors with head dims of 64
/// or 128 (a block per 64 query rows, head and batch), on the CUDA cores otherwise (a
/// block per 32 rows; f32 stays f32 throughout).
fn softmax_forward<T: GpuElement>(
    gpu: &Gpu,
    problem: &Problem,
    mask: ExactMask,
    [q, k, v]: [&GpuTensor<T>; 3],
    out: &mut GpuTensor<T>,
) -> Result<()> {
    let arguments = FlashProblem::of(problem, mask)?;
    let (dim_k, dim_v) = (problem.dim_qk, problem.dim_v);
    let blocks = |rows| problem.len_q.div_ceil(rows);
    if size_of::<T>() == 2 && dim_k == dim_v && matches!(dim_k, 64 | 128) {
        // The query tile and two stages of key and value tiles, rows padded by 8 elements.
        let shared = 5 * FLASH_ROWS * (dim_k + 8) * size_of::<T>();
        let config = LaunchConfig {
            grid_dim: grid(blocks(FLASH_ROWS), problem.heads_q, problem.batch)?,
            block_dim: (FLASH_THREADS, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let name = format!("softmax_forward_{}_d{dim_k}", T::NAME);
        let function = gpu.kernel_of(Source::Softmax, &name, config.shared_mem_bytes)?;
        let mut args = gpu.stream.launch_builder(&function);
        args.arg(&q.data)
            .arg(&k.data)
            .arg(&v.data)
            .arg(&mut out.data)
            .arg(&arguments);
        // SAFETY: the tensor-core kernel's arguments; `problem` checked the shapes.
        return unsafe { launch(args, config, &name) };
    }
    // A tile of keys and one of values, f32.
    let shared = GENERAL_EXACT_KEYS * (dim_k + dim_v) * 4;
    let config = LaunchConfig {
        grid_dim: grid(blocks(GENERAL_EXACT_ROWS), problem.heads_q, problem.batch)?,
        block_dim: (GENERAL_EXACT_THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    let name = format!("softmax_forward_general_{}", T::NAME);
    let function = gpu.kernel_of(Source::Softmax, &name, config.shared_mem_bytes)?;
    let mut args = gpu.stream.launch_builder(&function);
    let (dim_k, dim_v) = (dim_k as i32, dim_v as i32);
    args.arg(&q.data)
        .arg(&k.data)
        .arg(&v.data)
        .arg(&mut out.data)
        .arg(&arguments)
        .arg(&dim_k)
        .arg(&dim_v);
    // SAFETY: the general kernel's arguments; `problem` checked the shapes.
    unsafe { launch(args, config, &name) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_parts_divide_the_span_and_fill_the_gpu() {
        // H100 (two state blocks per multiprocessor), B=4, H=16, two segments of 4096
        // rows: four pieces (256 blocks) fit and divide the 64 chunks.
        assert_eq!(segment_parts(264, 4096, 64), 4);
        // 1M tokens, 16 heads, 8 segments: two pieces fit and divide 2048 chunks.
        assert_eq!(segment_parts(264, 131_072, 7 * 16), 2);
        // Six would fit; 96 chunks divide into six.
        assert_eq!(segment_parts(396, 96 * CHUNK, 64), 6);
        for (span, summed) in [(640, 1), (64, 3), (1 << 14, 500), (192, 2)] {
            let parts = segment_parts(264, span, summed);
            assert!(
                parts >= 1 && (span / CHUNK).is_multiple_of(parts),
                "{span} {summed}: {parts}"
            );
            assert!(
                parts == 1 || summed * parts <= 264,
                "{span} {summed}: {parts}"
            );
        }
    }

    #[test]
    fn segments_cover_the_sequence_in_whole_chunks() {
        for (processors, len, blocks) in [
            (132, 8192, 128),
            (132, 1 << 20, 32),
            (132, 100, 1),
            (8, 5000, 1),
        ] {
            let (segments, span) = causal_segments(processors, len, blocks);
            assert_eq!(span % CHUNK, 0);
            assert!(
                segments * span >= len && (segments - 1) * span < len,
                "{len}: {segments} x {span}"
            );
            assert!(segments == 1 || span >= 8 * CHUNK);
        }
        // A grid that already fills the GPU is not split.
        assert_eq!(causal_segments(132, 8192, 256).0, 1);
        // B=1, H=16 at 1M tokens: as many segments as one wave holds.
        let (segments, _) = causal_segments(132, 1 << 20, 16);
        assert!(
            segments * 16 <= 132 && (segments + 1) * 16 > 132,
            "{segments}"
        );
    }

    #[test]
    fn chunk_kernels_fit_hoppers_shared_memory_up_to_head_dim_128() {
        const HOPPER_OPT_IN: usize = 227 << 10;
        for element in [2, 4] {
            assert!(
                chunk_shared_bytes(128, 64, element) <= HOPPER_OPT_IN,
                "{element}-byte"
            );
        }
        // Head dim 256 in f32 does not fit: the launch refuses it with a typed error.
        assert!(chunk_shared_bytes(256, 64, 4) > HOPPER_OPT_IN);
    }

    #[test]
    fn exact_kernel_arguments_follow_the_cpu_method() {
        // Causal attention takes as many queries as keys; full attention any.
        let problem = |causal, dim_v| {
            let len_q = if causal { 300 } else { 100 };
            Attention::new(Method::softmax())
                .causal(causal)
                .problem([2, len_q, 4, 64], [2, 300, 2, 64], [2, 300, 2, dim_v])
                .unwrap()
        };
        let mask = |left, right| ExactMask {
            scale: None,
            left,
            right,
        };
        let args = FlashProblem::of(&problem(false, 64), mask(Some(7), Some(300))).unwrap();
        assert_eq!(
            (args.len_q, args.len_k, args.heads_q, args.heads_kv),
            (100, 300, 4, 2)
        );
        // 7 keys back; 300 forward reach past every key, so they are no bound.
        assert_eq!((args.left, args.right), (7, -1));
        assert!((args.scale_log2 - std::f32::consts::LOG2_E / 8.0).abs() < 1e-6);
        let scaled = ExactMask {
            scale: Some(0.5),
            ..mask(None, Some(0))
        };
        let args = FlashProblem::of(&problem(true, 64), scaled).unwrap();
        assert_eq!((args.left, args.right), (-1, 0));
        assert!((args.scale_log2 - 0.5 * std::f32::consts::LOG2_E).abs() < 1e-6);
        // Value dims unlike the keys' are taken; dims past what a thread holds are refused.
        assert!(FlashProblem::of(&problem(false, 200), mask(None, None)).is_ok());
        let error = FlashProblem::of(&problem(false, 300), mask(None, None))
            .err()
            .unwrap();
        assert!(
            matches!(&error, Error::Unsupported(m) if m.contains("up to 256")),
            "{error}"
        );
    }

    #[test]
    fn tensor_cores_take_16_bit_square_heads_of_64_and_128() {
        const HOPPER_OPT_IN: usize = 227 << 10;
        let problem = |dim_k, dim_v| {
            let attention = Attention::new(Method::linear()).causal(true);
            attention
                .problem([2, 300, 4, dim_k], [2, 300, 2, dim_k], [2, 300, 2, dim_v])
                .unwrap()
        };
        for dim in [64, 128] {
            let plan = LinearPlan::new::<half::bf16>(&problem(dim, dim)).unwrap();
            assert_eq!(plan.tensor_core_dim, Some(dim));
            assert_eq!(plan.value_blocks(), 1);
            assert_eq!(
                plan.name(Pass::Causal),
                format!("linear_causal_mma_bf16_d{dim}")
            );
            for pass in [Pass::Causal, Pass::State, Pass::Apply] {
                let config = plan.config(pass, 3, 4).unwrap();
                assert_eq!(config.grid_dim, (3, 4, 2));
                let producers = match pass {
                    Pass::Causal => 32 * CAUSAL_PRODUCER_WARPS,
                    _ => 0,
                };
                assert_eq!(config.block_dim.0 as usize, producers + 2 * dim);
                assert!(config.shared_mem_bytes as usize <= HOPPER_OPT_IN);
            }
        }
        // f32, unequal or other dims: the general kernels, a block per 64 value columns.
        for plan in [
            LinearPlan::new::<f32>(&problem(128, 128)).unwrap(),
            LinearPlan::new::<half::f16>(&problem(128, 96)).unwrap(),
            LinearPlan::new::<half::f16>(&problem(32, 32)).unwrap(),
        ] {
            assert_eq!(plan.tensor_core_dim, None);
            assert!(!plan.name(Pass::State).contains("mma"));
        }
        let general = LinearPlan::new::<f32>(&problem(128, 128)).unwrap();
        assert_eq!(general.value_blocks(), 2);
        assert_eq!(
            general.config(Pass::Apply, 3, 4).unwrap().grid_dim,
            (2, 4, 6)
        );
    }
}
