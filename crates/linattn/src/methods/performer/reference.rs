//! The f64 reference of FAVOR+ (hybrid's performer heads use it too).

use crate::base::Tensor;
use crate::engine::feature_map::FAVOR_EPSILON;
use crate::methods::reference::{dot, keys_seen, kv_head, max_of, row, weighted_values};

/// ω·x' with x' = x·d^(−1/4), and |x'|²/2.
fn favor_projection(omega: &[f64], x: &[f64]) -> (Vec<f64>, f64) {
    let d = x.len();
    let normalizer = (d as f64).powf(-0.25);
    let scaled: Vec<f64> = x.iter().map(|v| v * normalizer).collect();
    let projection = omega.chunks_exact(d).map(|w| dot(w, &scaled)).collect();
    (projection, dot(&scaled, &scaled) / 2.0)
}

/// m^(−1/2)·(exp(ω·x' − |x'|²/2 − c) + 1e-4).
fn favor_features(projection: &[f64], half_norm: f64, stabiliser: f64) -> Vec<f64> {
    let ratio = 1.0 / (projection.len() as f64).sqrt();
    projection
        .iter()
        .map(|p| ratio * ((p - half_norm - stabiliser).exp() + FAVOR_EPSILON))
        .collect()
}

/// The output row of query i of head h under FAVOR+ with projection `omega`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn performer_row(
    q: &Tensor<f64>,
    k: &Tensor<f64>,
    v: &Tensor<f64>,
    omega: &[f64],
    b: usize,
    h: usize,
    i: usize,
    causal: bool,
) -> Vec<f64> {
    let g = kv_head(q, k, h);
    let (q_proj, q_half) = favor_projection(omega, &row(q, b, i, h));
    let phi_q = favor_features(&q_proj, q_half, max_of(&q_proj));
    let keys: Vec<(Vec<f64>, f64)> = keys_seen(i, k.seq_len(), causal)
        .map(|j| favor_projection(omega, &row(k, b, j, g)))
        .collect();
    // The key stabiliser: the max of ω·k' over every key this query sees.
    let stabiliser = keys
        .iter()
        .map(|(p, _)| max_of(p))
        .fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<(usize, f64)> = keys
        .iter()
        .enumerate()
        .map(|(j, (p, half))| (j, dot(&phi_q, &favor_features(p, *half, stabiliser))))
        .collect();
    let total: f64 = weights.iter().map(|w| w.1).sum();
    weighted_values(v, b, g, &weights, total)
}
