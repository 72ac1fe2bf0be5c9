//! The public API on top: [`Attention`](attention::Attention) for one call on host or
//! GPU tensors ([`DeviceTensor`](device::DeviceTensor)), the
//! [`Decoder`](decode::Decoder) for token-by-token generation, packed variable-length
//! batches, costs and ceilings, and the f64 reference.

pub(crate) mod attention;
pub(crate) mod cost;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "cuda")]
pub(crate) mod cuda_gated;
pub(crate) mod decode;
pub(crate) mod device;
pub(crate) mod plan;
pub mod reference;
pub(crate) mod varlen;
