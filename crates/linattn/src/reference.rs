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

use crate::attention::{Attention, Method};
use crate::cosformer::COSFORMER_EPSILON;
use crate::error::Result;
use crate::feature_map::{FAVOR_EPSILON, cosformer_angle};
use crate::hybrid::GlobalHeads;
use crate::linear::LINEAR_EPSILON;
use crate::softmax::resolve_scale;
use crate::tensor::Tensor;

/// The output of `attention` on `q`, `k`, `v`, computed from the definitions in f64.
/// Validates exactly as [`Attention::forward`] does.
pub fn forward(
    attention: &Attention,
    q: &Tensor<f64>,
    k: &Tensor<f64>,
    v: &Tensor<f64>,
) -> Result<Tensor<f64>> {
    let out_shape = attention.output_shape(q.shape(), k.shape(), v.shape())?;
    let causal = attention.is_causal();
    let heads = 0..q.heads();
    let mut out = vec![0.0; out_shape.iter().product()];
    let mut write = |b: usize, i: usize, h: usize, row: &[f64]| {
        let [_, len, nh, dv] = out_shape;
        let start = ((b * len + i) * nh + h) * dv;
        out[start..start + dv].copy_from_slice(row);
    };
    match attention.method() {
        Method::Softmax(m) => {
            let scale = resolve_scale(m.scale, q.head_dim())?;
            let right = causal.then_some(0);
            for_each_query(q, heads, |b, h, i| {
                write(b, i, h, &softmax_row(q, k, v, b, h, i, scale, None, right))
            });
        }
        Method::Window(m) => {
            let scale = resolve_scale(m.scale, q.head_dim())?;
            let right = if causal { Some(0) } else { m.right };
            for_each_query(q, heads, |b, h, i| {
                write(
                    b,
                    i,
                    h,
                    &softmax_row(q, k, v, b, h, i, scale, m.left, right),
                )
            });
        }
        Method::Linear(_) => for_each_query(q, heads, |b, h, i| {
            write(b, i, h, &linear_row(q, k, v, b, h, i, causal))
        }),
        Method::Performer(m) => {
            let omega = m.omega(q.head_dim())?;
            for_each_query(q, heads, |b, h, i| {
                write(b, i, h, &performer_row(q, k, v, &omega, b, h, i, causal))
            });
        }
        Method::Cosformer(m) => {
            let max_len = m.reweighting_length(q.seq_len().max(k.seq_len()));
            for_each_query(q, heads, |b, h, i| {
                write(b, i, h, &cosformer_row(q, k, v, max_len, b, h, i, causal))
            });
        }
        Method::Linformer(m) => {
            let (e, f) = m.projections()?;
            let scale = resolve_scale(m.scale, q.head_dim())?;
            for_each_query(q, heads, |b, h, i| {
                write(
                    b,
                    i,
                    h,
                    &linformer_row(q, k, v, &e, &f, m.k, scale, b, h, i),
                )
            });
        }
        Method::Fnet(_) => return Ok(fnet(v)),
        Method::Hybrid(m) => {
            let scale = resolve_scale(m.window.scale, q.head_dim())?;
            let right = if causal { Some(0) } else { m.window.right };
            for_each_query(q, 0..m.local_heads, |b, h, i| {
                write(
                    b,
                    i,
                    h,
                    &softmax_row(q, k, v, b, h, i, scale, m.window.left, right),
                )
            });
            let global = m.local_heads..q.heads();
            match &m.global {
                GlobalHeads::Linear(_) => for_each_query(q, global, |b, h, i| {
                    write(b, i, h, &linear_row(q, k, v, b, h, i, causal))
                }),
                GlobalHeads::Performer(p) => {
                    let omega = p.omega(q.head_dim())?;
                    for_each_query(q, global, |b, h, i| {
                        write(b, i, h, &performer_row(q, k, v, &omega, b, h, i, causal))
                    });
                }
            }
        }
    }
    Tensor::from_vec(out, out_shape)
}

fn for_each_query(
    q: &Tensor<f64>,
    heads: std::ops::Range<usize>,
    mut f: impl FnMut(usize, usize, usize),
) {
    for b in 0..q.batch() {
        for h in heads.clone() {
            for i in 0..q.seq_len() {
                f(b, h, i);
            }
        }
    }
}

/// Row `t` of head `h` (a q head for q; the shared k/v head for k and v).
fn row(x: &Tensor<f64>, b: usize, t: usize, h: usize) -> Vec<f64> {
    (0..x.head_dim()).map(|d| x.at(b, t, h, d)).collect()
}

fn kv_head(q: &Tensor<f64>, k: &Tensor<f64>, h: usize) -> usize {
    h / (q.heads() / k.heads())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `Σⱼ wⱼ vⱼ / divisor` over the keys with a weight.
fn weighted_values(
    v: &Tensor<f64>,
    b: usize,
    g: usize,
    weights: &[(usize, f64)],
    divisor: f64,
) -> Vec<f64> {
    let mut out = vec![0.0; v.head_dim()];
    for &(j, w) in weights {
        for (d, o) in out.iter_mut().enumerate() {
            *o += w * v.at(b, j, g, d);
        }
    }
    out.iter_mut().for_each(|o| *o /= divisor);
    out
}

/// Keys visible from query i: `i − left ≤ j ≤ i + right`, and j ≤ i when causal.
fn visible(i: usize, len_k: usize, left: Option<usize>, right: Option<usize>) -> Vec<usize> {
    (0..len_k)
        .filter(|&j| left.is_none_or(|l| j + l >= i) && right.is_none_or(|r| j <= i + r))
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn softmax_row(
    q: &Tensor<f64>,
    k: &Tensor<f64>,
    v: &Tensor<f64>,
    b: usize,
    h: usize,
    i: usize,
    scale: f64,
    left: Option<usize>,
    right: Option<usize>,
) -> Vec<f64> {
    let g = kv_head(q, k, h);
    let qi = row(q, b, i, h);
    let scores: Vec<(usize, f64)> = visible(i, k.seq_len(), left, right)
        .into_iter()
        .map(|j| (j, scale * dot(&qi, &row(k, b, j, g))))
        .collect();
    let max = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<(usize, f64)> = scores.iter().map(|&(j, s)| (j, (s - max).exp())).collect();
    let total: f64 = weights.iter().map(|w| w.1).sum();
    weighted_values(v, b, g, &weights, total)
}

fn keys_seen(i: usize, len_k: usize, causal: bool) -> std::ops::Range<usize> {
    0..if causal { i + 1 } else { len_k }
}

fn elu_plus_one(x: &[f64]) -> Vec<f64> {
    x.iter()
        .map(|&x| if x > 0.0 { x + 1.0 } else { x.exp() })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn linear_row(
    q: &Tensor<f64>,
    k: &Tensor<f64>,
    v: &Tensor<f64>,
    b: usize,
    h: usize,
    i: usize,
    causal: bool,
) -> Vec<f64> {
    let g = kv_head(q, k, h);
    let phi_q = elu_plus_one(&row(q, b, i, h));
    let weights: Vec<(usize, f64)> = keys_seen(i, k.seq_len(), causal)
        .map(|j| (j, dot(&phi_q, &elu_plus_one(&row(k, b, j, g)))))
        .collect();
    let total: f64 = weights.iter().map(|w| w.1).sum();
    weighted_values(v, b, g, &weights, total + LINEAR_EPSILON)
}

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

fn max_of(x: &[f64]) -> f64 {
    x.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

#[allow(clippy::too_many_arguments)]
fn performer_row(
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

#[allow(clippy::too_many_arguments)]
fn cosformer_row(
    q: &Tensor<f64>,
    k: &Tensor<f64>,
    v: &Tensor<f64>,
    max_len: usize,
    b: usize,
    h: usize,
    i: usize,
    causal: bool,
) -> Vec<f64> {
    let g = kv_head(q, k, h);
    let relu = |x: Vec<f64>| -> Vec<f64> { x.into_iter().map(|x| x.max(0.0)).collect() };
    let qi = relu(row(q, b, i, h));
    let weights: Vec<(usize, f64)> = keys_seen(i, k.seq_len(), causal)
        .map(|j| {
            let angle = cosformer_angle(i, max_len) - cosformer_angle(j, max_len);
            (j, dot(&qi, &relu(row(k, b, j, g))) * angle.cos())
        })
        .collect();
    let total: f64 = weights.iter().map(|w| w.1).sum();
    weighted_values(v, b, g, &weights, total.max(COSFORMER_EPSILON))
}

#[allow(clippy::too_many_arguments)]
fn linformer_row(
    q: &Tensor<f64>,
    k: &Tensor<f64>,
    v: &Tensor<f64>,
    e: &[f64],
    f: &[f64],
    projected: usize,
    scale: f64,
    b: usize,
    h: usize,
    i: usize,
) -> Vec<f64> {
    let g = kv_head(q, k, h);
    let n = k.seq_len();
    // Column c of Eᵀ K: Σₜ E[t, c] kₜ.
    let project = |x: &Tensor<f64>, p: &[f64], c: usize| -> Vec<f64> {
        let mut acc = vec![0.0; x.head_dim()];
        for t in 0..n {
            for (d, a) in acc.iter_mut().enumerate() {
                *a += p[t * projected + c] * x.at(b, t, g, d);
            }
        }
        acc
    };
    let qi = row(q, b, i, h);
    let scores: Vec<f64> = (0..projected)
        .map(|c| scale * dot(&qi, &project(k, e, c)))
        .collect();
    let max = max_of(&scores);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut out = vec![0.0; v.head_dim()];
    for (c, w) in weights.iter().enumerate() {
        for (o, x) in out.iter_mut().zip(project(v, f, c)) {
            *o += w * x / total;
        }
    }
    out
}

/// `Re(DFT₂(v))` over (sequence, heads·head_dim) by the direct double sum.
fn fnet(v: &Tensor<f64>) -> Tensor<f64> {
    let [batch, seq, heads, dim] = v.shape();
    let hidden = heads * dim;
    let data = v.as_slice();
    let mut out = vec![0.0; data.len()];
    for b in 0..batch {
        let plane = &data[b * seq * hidden..(b + 1) * seq * hidden];
        for k1 in 0..seq {
            for k2 in 0..hidden {
                let mut acc = 0.0;
                for n1 in 0..seq {
                    for n2 in 0..hidden {
                        // Integer phase first, so the angle stays exact for long inputs.
                        let phase = ((k1 * n1) % seq) as f64 / seq as f64
                            + ((k2 * n2) % hidden) as f64 / hidden as f64;
                        acc += plane[n1 * hidden + n2] * (2.0 * std::f64::consts::PI * phase).cos();
                    }
                }
                out[(b * seq + k1) * hidden + k2] = acc;
            }
        }
    }
    Tensor::from_vec(out, v.shape()).expect("same shape as v")
}
