//! The f64 reference of exact softmax attention, over every key or a window of them
//! (window and hybrid use it too).

use crate::base::Tensor;
use crate::methods::reference::{dot, kv_head, row, weighted_values};

/// Keys visible from query i: `i − left ≤ j ≤ i + right`.
fn visible(i: usize, len_k: usize, left: Option<usize>, right: Option<usize>) -> Vec<usize> {
    (0..len_k)
        .filter(|&j| left.is_none_or(|l| j + l >= i) && right.is_none_or(|r| j <= i + r))
        .collect()
}

/// The output row of query i of head h: `softmax(scale · qᵢ kⱼᵀ) vⱼ` over the visible keys.
#[allow(clippy::too_many_arguments)]
pub(crate) fn softmax_row(
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
