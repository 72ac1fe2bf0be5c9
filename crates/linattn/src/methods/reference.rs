//! What every method's f64 reference is written with: rows of q, k and v, and the output
//! filled query row by query row. No blocking, no reassociation, no code shared with the
//! fast paths.

use crate::base::{Problem, Result, Tensor};

/// The output of a reference, filled row by row.
pub(crate) struct Rows {
    shape: [usize; 4],
    data: Vec<f64>,
}

impl Rows {
    /// Zeros of the output's shape.
    pub fn new(shape: [usize; 4]) -> Self {
        Self {
            shape,
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// Sets the output row of every query of the query heads `heads` to `row(b, h, i)`.
    pub fn fill(
        &mut self,
        problem: &Problem,
        heads: std::ops::Range<usize>,
        mut row: impl FnMut(usize, usize, usize) -> Vec<f64>,
    ) -> &mut Self {
        let [_, len, nh, dv] = self.shape;
        for b in 0..problem.batch {
            for h in heads.clone() {
                for i in 0..problem.len_q {
                    let start = ((b * len + i) * nh + h) * dv;
                    self.data[start..start + dv].copy_from_slice(&row(b, h, i));
                }
            }
        }
        self
    }

    pub fn finish(&mut self) -> Result<Tensor<f64>> {
        Tensor::from_vec(std::mem::take(&mut self.data), self.shape)
    }
}

/// Row `t` of head `h` (a q head for q; the shared k/v head for k and v).
pub(crate) fn row(x: &Tensor<f64>, b: usize, t: usize, h: usize) -> Vec<f64> {
    (0..x.head_dim()).map(|d| x.at(b, t, h, d)).collect()
}

/// The k/v head query head `h` reads.
pub(crate) fn kv_head(q: &Tensor<f64>, k: &Tensor<f64>, h: usize) -> usize {
    h / (q.heads() / k.heads())
}

pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub(crate) fn max_of(x: &[f64]) -> f64 {
    x.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// `Σⱼ wⱼ vⱼ / divisor` over the keys with a weight.
pub(crate) fn weighted_values(
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

/// The keys query i sees: all of them, or j ≤ i when causal.
pub(crate) fn keys_seen(i: usize, len_k: usize, causal: bool) -> std::ops::Range<usize> {
    0..if causal { i + 1 } else { len_k }
}
