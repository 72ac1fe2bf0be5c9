//! Plain f64 implementations of every method, written from the formulas with no blocking,
//! no reassociation and no shared code with the fast paths: the source of truth the fast
//! paths are tested against. Quadratic in the sequence length; meant for small inputs.
//!
//! ```
//! use linattn::{Attention, Method, Tensor, reference};
//! let x = Tensor::<f64>::randn([1, 7, 2, 4], 0).unwrap();
//! let attention = Attention::new(Method::linear()).causal(true);
//! let fast = attention.forward(&x, &x, &x).unwrap();
//! let exact = reference::forward(&attention, &x, &x, &x).unwrap();
//! for (a, b) in fast.as_slice().iter().zip(exact.as_slice()) {
//!     assert!((a - b).abs() < 1e-12);
//! }
//! ```

use crate::api::attention::Attention;
use crate::base::{Result, Tensor};
use crate::methods::AttentionMethod;

/// The output of `attention` on `q`, `k`, `v`, computed from the definitions in f64.
/// Validates exactly as [`Attention::forward`] does.
pub fn forward(
    attention: &Attention,
    q: &Tensor<f64>,
    k: &Tensor<f64>,
    v: &Tensor<f64>,
) -> Result<Tensor<f64>> {
    let problem = attention.problem(q.shape(), k.shape(), v.shape())?;
    attention.method().reference(&problem, q, k, v)
}
