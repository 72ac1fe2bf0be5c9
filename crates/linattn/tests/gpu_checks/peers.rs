//! The error the peers' own arithmetic makes in a 16-bit type, emulated in f64 with
//! their roundings: what the 16-bit checks allow twice of.

use super::{EPSILON, Precision, Sides, relative_error};
use linattn::Tensor;

/// The error the peers make in `P`: PyTorch's linear attention with every tensor in `P`
/// rounds the feature maps, the state (each prefix state in the causal form), the key
/// sums, numerator, denominator and output to `P`, accumulating in f32 or better.
/// Emulated here in f64 with those roundings; the issue allows twice this error.
pub(super) fn peer_error<P: Precision>(
    causal: bool,
    [q, k, v]: [&Tensor<f32>; 3],
    exact: &[f64],
) -> f64 {
    let [batch, len, heads, dim_k] = q.shape();
    let (heads_kv, dim_v) = (k.heads(), v.head_dim());
    let group = heads / heads_kv;
    let feature = |x: f32| {
        let x = P::round(x as f64);
        P::round(if x > 0.0 { x + 1.0 } else { x.exp() })
    };
    let mut out = vec![0.0; batch * len * heads * dim_v];
    for b in 0..batch {
        for h in 0..heads {
            let g = h / group;
            let mut state = vec![0.0; dim_k * dim_v];
            let mut sums = vec![0.0; dim_k];
            let absorb = |t: usize, state: &mut [f64], sums: &mut [f64]| {
                for i in 0..dim_k {
                    let phi = feature(k.at(b, t, g, i));
                    sums[i] += phi;
                    for j in 0..dim_v {
                        state[i * dim_v + j] += phi * P::round(v.at(b, t, g, j) as f64);
                    }
                }
            };
            if !causal {
                for t in 0..len {
                    absorb(t, &mut state, &mut sums);
                }
            }
            for t in 0..len {
                if causal {
                    absorb(t, &mut state, &mut sums);
                }
                let phi_q: Vec<f64> = (0..dim_k).map(|i| feature(q.at(b, t, h, i))).collect();
                let den = P::round(
                    (0..dim_k)
                        .map(|i| phi_q[i] * P::round(sums[i]))
                        .sum::<f64>()
                        + EPSILON,
                );
                for j in 0..dim_v {
                    let num: f64 = (0..dim_k)
                        .map(|i| phi_q[i] * P::round(state[i * dim_v + j]))
                        .sum();
                    out[((b * len + t) * heads + h) * dim_v + j] = P::round(P::round(num) / den);
                }
            }
        }
    }
    relative_error(&out, exact)
}

/// The error performer-pytorch makes in `P` (non-causal): its `softmax_kernel` with ω,
/// x·d^(-1/4), the projection, |x'|²/2, the shifted exponent and the features each
/// rounded to `P`, then `linear_attention` rounding the key sums, the context kᵀv, the
/// inverse denominators and the output; products accumulate in f32 or better. Emulated
/// in f64 with those roundings.
pub(super) fn performer_peer_error<P: Precision>(
    features: usize,
    seed: u64,
    [q, k, v]: [&Tensor<f32>; 3],
    exact: &[f64],
) -> f64 {
    let [batch, len, heads, dim] = q.shape();
    let (heads_kv, dim_v) = (k.heads(), v.head_dim());
    let group = heads / heads_kv;
    let omega: Vec<f64> = linattn::orthogonal_random_features(features, dim, seed)
        .into_iter()
        .map(P::round)
        .collect();
    let normalizer = (dim as f64).powf(-0.25);
    let ratio = (features as f64).powf(-0.5);
    // Projections and half norms of one row of x.
    let project = |row: &[f64]| -> (Vec<f64>, f64) {
        let scaled: Vec<f64> = row.iter().map(|&x| P::round(x * normalizer)).collect();
        let projection = omega
            .chunks_exact(dim)
            .map(|w| P::round(w.iter().zip(&scaled).map(|(a, b)| a * b).sum()))
            .collect();
        let squares: f64 = row.iter().map(|&x| P::round(x * x)).sum();
        let diag = P::round(P::round(P::round(squares) / 2.0) * normalizer * normalizer);
        (projection, diag)
    };
    let feature = |p: f64, diag: f64, top: f64| {
        let shifted = P::round(P::round(p - diag) - top);
        P::round(ratio * P::round(P::round(shifted.exp()) + 1e-4))
    };
    let row = |x: &Tensor<f32>, b, t, h| -> Vec<f64> {
        (0..x.head_dim())
            .map(|i| P::round(x.at(b, t, h, i) as f64))
            .collect()
    };
    let mut out = vec![0.0; batch * len * heads * dim_v];
    for b in 0..batch {
        for g in 0..heads_kv {
            let projected: Vec<(Vec<f64>, f64)> =
                (0..len).map(|t| project(&row(k, b, t, g))).collect();
            let top = projected
                .iter()
                .flat_map(|(p, _)| p.iter().copied())
                .fold(f64::NEG_INFINITY, f64::max);
            let mut context = vec![0.0; features * dim_v];
            let mut sums = vec![0.0; features];
            for (t, (p, diag)) in projected.iter().enumerate() {
                let values = row(v, b, t, g);
                for f in 0..features {
                    let phi = feature(p[f], *diag, top);
                    sums[f] += phi;
                    for (c, value) in values.iter().enumerate() {
                        context[f * dim_v + c] += phi * value;
                    }
                }
            }
            let context: Vec<f64> = context.into_iter().map(P::round).collect();
            let sums: Vec<f64> = sums.into_iter().map(P::round).collect();
            for h in (g * group)..((g + 1) * group) {
                for t in 0..len {
                    let (p, diag) = project(&row(q, b, t, h));
                    let top = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let phi: Vec<f64> = p.iter().map(|&x| feature(x, diag, top)).collect();
                    let inverse =
                        P::round(1.0 / P::round(phi.iter().zip(&sums).map(|(a, b)| a * b).sum()));
                    for c in 0..dim_v {
                        let num: f64 = (0..features).map(|f| phi[f] * context[f * dim_v + c]).sum();
                        out[((b * len + t) * heads + h) * dim_v + c] = P::round(num * inverse);
                    }
                }
            }
        }
    }
    relative_error(&out, exact)
}

/// Twice the peers' error, capped at eight roundings of `P`: where the peers' own
/// arithmetic breaks down (PyTorch's f16 denominator overflows past a few thousand
/// tokens) the cap keeps the check able to fail.
pub(super) fn peer_tolerance<P: Precision>(peer_error: f64) -> f64 {
    (2.0 * peer_error).min(8.0 * P::UNIT_ROUNDOFF)
}

/// The error PyTorch's SDPA makes in `P` (its FlashAttention kernel): scores and
/// their softmax in f32 from inputs in `P`, the probabilities rounded to `P` before they
/// multiply V, the output rounded to `P`. Emulated in f64; the issue allows twice this.
pub(super) fn exact_peer_error<P: Precision>(
    (left, right): Sides,
    [q, k, v]: [&Tensor<f32>; 3],
    exact: &[f64],
) -> f64 {
    let [batch, len_q, heads, dim] = q.shape();
    let (len_k, heads_kv) = (k.seq_len(), k.heads());
    let scale = 1.0 / (dim as f64).sqrt();
    let round = |x: f32| P::round(x as f64);
    let mut out = vec![0.0; exact.len()];
    for b in 0..batch {
        for h in 0..heads {
            let g = h / (heads / heads_kv);
            for i in 0..len_q {
                let visible: Vec<usize> = (0..len_k)
                    .filter(|&j| {
                        left.is_none_or(|l| j + l >= i) && right.is_none_or(|r| j <= i + r)
                    })
                    .collect();
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        scale
                            * (0..dim)
                                .map(|d| round(q.at(b, i, h, d)) * round(k.at(b, j, g, d)))
                                .sum::<f64>()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..v.head_dim() {
                    let sum: f64 = visible
                        .iter()
                        .zip(&weights)
                        .map(|(&j, &w)| P::round(w) * round(v.at(b, j, g, d)))
                        .sum();
                    out[((b * len_q + i) * heads + h) * v.head_dim() + d] = P::round(sum / total);
                }
            }
        }
    }
    relative_error(&out, exact)
}
