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
use crate::base::{Error, Result, Tensor};
use crate::methods::gated::reference::recurrence;
use crate::methods::{AttentionMethod, GateInputs, GatedOutput};

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

/// [`Attention::forward_gated`] from the definitions in f64: the recurrence one token at
/// a time. Validates exactly as `forward_gated` does.
///
/// ```
/// use linattn::{Attention, GateInputs, Method, Retention, Tensor, reference};
/// let x = Tensor::<f64>::randn([1, 9, 2, 4], 0)?;
/// let attention = Attention::new(Method::Retention(Retention::default())).causal(true);
/// let fast = attention.forward_gated(&x, &x, &x, &GateInputs::default())?;
/// let exact = reference::forward_gated(&attention, &x, &x, &x, &GateInputs::default())?;
/// assert!(fast.out.as_slice().iter().zip(exact.out.as_slice()).all(|(a, b)| (a - b).abs() < 1e-12));
/// # Ok::<(), linattn::Error>(())
/// ```
pub fn forward_gated(
    attention: &Attention,
    q: &Tensor<f64>,
    k: &Tensor<f64>,
    v: &Tensor<f64>,
    inputs: &GateInputs<'_, f64>,
) -> Result<GatedOutput<f64>> {
    let problem = attention.problem(q.shape(), k.shape(), v.shape())?;
    let rule = attention.method().gated_rule(&problem).ok_or_else(|| {
        Error::Unsupported(format!(
            "{} is not of the gated family",
            attention.method().name()
        ))
    })?;
    recurrence(&rule, &problem, [q, k, v], inputs)
}
