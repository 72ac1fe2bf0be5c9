//! CPU kernels: SIMD matrix products through `gemm`, parallel over batch × heads ×
//! blocks with rayon.

pub(crate) mod exact;
pub(crate) mod matmul;
