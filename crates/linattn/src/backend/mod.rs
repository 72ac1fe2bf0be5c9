//! The kernels, one folder per device: they compute on slices, views and device buffers
//! described by the base layer, and know nothing of methods.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
