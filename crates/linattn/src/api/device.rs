//! One API for both devices: [`Attention`]'s calls take host [`Tensor`]s or, with the
//! `cuda` feature, [`GpuTensor`](crate::cuda::GpuTensor)s, and run where their inputs
//! are. Each kind of tensor says which decoder and gradients it comes with.

use crate::api::attention::{Attention, Gradients};
use crate::api::decode::Decoder;
use crate::base::{Element, Result, Tensor};
use crate::methods::Device;

mod sealed {
    pub trait Sealed {}
    impl<T: crate::Element> Sealed for crate::Tensor<T> {}
    #[cfg(feature = "cuda")]
    impl<T: crate::cuda::GpuElement> Sealed for crate::cuda::GpuTensor<T> {}
}

/// A `[batch, seq, heads, head_dim]` tensor that knows its device: what
/// [`Attention::forward`], [`Attention::backward`] and [`Attention::prefill`] take.
///
/// ```
/// use linattn::{Attention, Device, DeviceTensor, Method, Tensor};
/// fn causal_linear<X: DeviceTensor>(x: &X) -> linattn::Result<X> {
///     Attention::new(Method::linear()).causal(true).forward(x, x, x)
/// }
/// let x = Tensor::<f32>::randn([1, 50, 2, 16], 0)?;
/// assert_eq!(x.device(), Device::Cpu);
/// assert_eq!(causal_linear(&x)?.shape(), [1, 50, 2, 16]);
/// # Ok::<(), linattn::Error>(())
/// ```
pub trait DeviceTensor: sealed::Sealed + Sized {
    /// What [`Attention::prefill`] continues with: [`Decoder`] on the host,
    /// [`GpuDecoder`](crate::cuda::GpuDecoder) on the GPU.
    type Decoder;
    /// What [`Attention::backward`] returns: [`Gradients`] on the host,
    /// [`GpuGradients`](crate::cuda::GpuGradients) on the GPU.
    type Gradients;

    /// The shape, `[batch, seq, heads, head_dim]`.
    fn shape(&self) -> [usize; 4];

    /// Where the tensor is.
    fn device(&self) -> Device;

    #[doc(hidden)]
    fn forward(attention: &Attention, q: &Self, k: &Self, v: &Self) -> Result<Self>;

    #[doc(hidden)]
    fn backward(
        attention: &Attention,
        q: &Self,
        k: &Self,
        v: &Self,
        d_out: &Self,
    ) -> Result<Self::Gradients>;

    #[doc(hidden)]
    fn prefill(
        attention: &Attention,
        q: &Self,
        k: &Self,
        v: &Self,
    ) -> Result<(Self, Self::Decoder)>;
}

impl<T: Element> DeviceTensor for Tensor<T> {
    type Decoder = Decoder<T>;
    type Gradients = Gradients<T>;

    fn shape(&self) -> [usize; 4] {
        Tensor::shape(self)
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn forward(attention: &Attention, q: &Self, k: &Self, v: &Self) -> Result<Self> {
        attention.forward_with_states(q, k, v).map(|(out, _)| out)
    }

    fn backward(
        attention: &Attention,
        q: &Self,
        k: &Self,
        v: &Self,
        d_out: &Self,
    ) -> Result<Gradients<T>> {
        attention.backward_on_host(q, k, v, d_out)
    }

    fn prefill(attention: &Attention, q: &Self, k: &Self, v: &Self) -> Result<(Self, Decoder<T>)> {
        attention.prefill_on_host(q, k, v)
    }
}
