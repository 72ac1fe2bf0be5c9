//! The CUDA backend: device tensors in the CPU's `[B, T, H, D]` layout and the kernels
//! that run on them, compiled by NVRTC at first use for the GPU that is present.
//!
//! Nothing here needs CUDA at build time: the driver and NVRTC are loaded when a [`Gpu`]
//! is opened, and opening one on a machine without them is an [`Error::Cuda`](crate::Error::Cuda).
//!
//! ```no_run
//! use linattn::cuda::{Gpu, GpuTensor};
//! use linattn::{Attention, Method, Tensor};
//! let gpu = Gpu::open(0)?;
//! let x = Tensor::<f32>::randn([1, 4096, 8, 64], 0)?;
//! let x = GpuTensor::<half::bf16>::upload(&gpu, &x)?;
//! let out = Attention::new(Method::linear()).causal(true).forward(&x, &x, &x)?;
//! assert_eq!(out.download()?.shape(), [1, 4096, 8, 64]);
//! # Ok::<(), linattn::Error>(())
//! ```

// The files: `device` (the GPU, its memory pool, launches, NVRTC and the compiled
// modules), `ptx_cache` (compiled modules on disk), `kv_cache` (exact attention's keys
// and values while decoding), `tiles` (the tile constants host and kernels share),
// `tensor` (device tensors and states), and one file of launches beside each kernel
// family: `linear` (linear.cu: helpers and CUDA-core kernels; linear_mma.cu: the
// tensor-core kernels; linear_entry.cu: their entry points), `linear_backward`
// (linear_backward.cu), `performer` (performer.cu), `softmax` (softmax.cu), `gated`
// (the gated and delta-rule family: gated.cu on the CUDA cores and its decode step,
// gated_mma.cu on the tensor cores); common.cuh holds what every source
// shares. They take shapes, scales, masks and constants, never a method: api/cuda.rs and
// api/cuda_gated.rs read the method when `Attention` is called with GPU tensors.

mod device;
mod gated;
mod kv_cache;
mod linear;
mod linear_backward;
mod performer;
mod ptx_cache;
mod softmax;
#[cfg(test)]
mod struct_layout;
mod tensor;
mod tiles;

pub use device::Gpu;
#[doc(hidden)]
pub use device::compile_all_kernels;
pub use tensor::{GpuElement, GpuForward, GpuGradients, GpuLinearState, GpuTensor};

pub(crate) use gated::{GatedInputs, GatedRule, OutOfRange, gated_decode, gated_forward};
pub(crate) use kv_cache::GpuKvCache;
pub(crate) use linear::{linear_causal, linear_decode, linear_full, linear_prefill};
pub(crate) use linear_backward::{linear_backward, linear_forward_training};
pub(crate) use performer::{PerformerOmega, performer_full, performer_supported};
pub(crate) use softmax::{ExactMask, softmax_forward, softmax_supported};
