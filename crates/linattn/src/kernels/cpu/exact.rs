//! Exact softmax attention: the dense form that materialises the scores, and the tiled
//! online-softmax form of FlashAttention (blocks of keys, running max and sum, O(block)
//! extra memory), both with causal and sliding-window masks.

use super::matmul::{MatMut, MatRef, matmul};
use crate::attention::Problem;
use crate::tensor::{Element, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// Which keys a query may see: key j is visible from query i when
/// `i − left ≤ j ≤ i + right` (FlashAttention's `window_size`, `None` = unbounded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mask {
    pub left: Option<usize>,
    pub right: Option<usize>,
}

impl Mask {
    pub const NONE: Mask = Mask {
        left: None,
        right: None,
    };
    pub const CAUSAL: Mask = Mask {
        left: None,
        right: Some(0),
    };

    /// The visible keys of query `i`, as a half-open range within `0..len_k`.
    #[inline]
    pub fn keys(&self, i: usize, len_k: usize) -> Range<usize> {
        let lo = self.left.map_or(0, |l| i.saturating_sub(l));
        let hi = self
            .right
            .map_or(len_k, |r| i.saturating_add(r).saturating_add(1).min(len_k));
        lo..hi.max(lo)
    }
}

/// Query rows per task of the tiled kernel.
pub(crate) const TILE_QUERIES: usize = 64;
/// Keys per block of the tiled kernel.
pub(crate) const TILE_KEYS: usize = 128;

/// Softmax of `scores` (rows × cols) in place over each row's visible range, the rest set
/// to zero; returns nothing, leaves unnormalised weights and writes each row's sum.
fn exponentiate_rows<T: Element>(
    scores: &mut [T],
    cols: usize,
    visible: impl Fn(usize) -> Range<usize>,
    sums: &mut [T],
) {
    for (i, row) in scores.chunks_exact_mut(cols).enumerate() {
        let range = visible(i);
        let max = row[range.clone()]
            .iter()
            .copied()
            .fold(T::neg_infinity(), T::max);
        let mut sum = T::zero();
        for (j, x) in row.iter_mut().enumerate() {
            *x = if range.contains(&j) {
                let e = (*x - max).exp();
                sum += e;
                e
            } else {
                T::zero()
            };
        }
        sums[i] = sum;
    }
}

fn divide_rows<T: Element>(mut out: MatMut<'_, T>, sums: &[T]) {
    for (i, &sum) in sums.iter().enumerate().take(out.rows) {
        let inv = T::one() / sum;
        out.row_mut(i).iter_mut().for_each(|o| *o *= inv);
    }
}

/// `softmax(scale · q kᵀ + mask) v` for a block of query rows starting at row `first`,
/// with every score of the block in memory: `rows × keys` elements in `scores`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dense_rows<T: Element>(
    queries: MatRef<'_, T>,
    first: usize,
    keys: MatRef<'_, T>,
    values: MatRef<'_, T>,
    scale: T,
    mask: Mask,
    out: MatMut<'_, T>,
    scores: &mut Vec<T>,
    sums: &mut Vec<T>,
) {
    let (rows, cols) = (queries.rows, keys.rows);
    scores.resize(rows * cols, T::zero());
    sums.resize(rows, T::zero());
    matmul(
        MatMut::contiguous(scores, rows, cols),
        queries,
        keys.t(),
        false,
        scale,
    );
    exponentiate_rows(scores, cols, |i| mask.keys(first + i, cols), sums);
    let mut out = out;
    matmul(
        out.rb(),
        MatRef::contiguous(scores, rows, cols),
        values,
        false,
        T::one(),
    );
    divide_rows(out, sums);
}

/// Naive exact attention: each (batch, head) task holds its whole `len_q × len_k` score
/// matrix.
#[allow(clippy::too_many_arguments)]
pub(crate) fn naive<T: Element>(
    problem: &Problem,
    scale: T,
    mask: Mask,
    q: &Tensor<T>,
    k: &Tensor<T>,
    v: &Tensor<T>,
    out: &mut Tensor<T>,
    heads: Range<usize>,
) {
    let out_heads = out.heads_mut();
    let tasks: Vec<(usize, usize)> = (0..problem.batch)
        .flat_map(|b| heads.clone().map(move |h| (b, h)))
        .collect();
    tasks.par_iter().for_each(|&(b, h)| {
        let g = problem.kv_head(h);
        // SAFETY: each (b, h) is one task.
        let rows = unsafe { out_heads.block(b, h, 0, problem.len_q) };
        dense_rows(
            q.head(b, h),
            0,
            k.head(b, g),
            v.head(b, g),
            scale,
            mask,
            rows,
            &mut Vec::new(),
            &mut Vec::new(),
        );
    });
}

/// Scratch of one tiled task: the scores of a tile and the running max and sum per row.
struct TileScratch<T> {
    scores: Vec<T>,
    max: Vec<T>,
    sum: Vec<T>,
}

/// Tiled exact attention with online softmax (FlashAttention's algorithm): each task owns
/// `TILE_QUERIES` query rows and walks the visible key blocks, keeping a running max and
/// sum per row and rescaling its output accumulator when the max grows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tiled<T: Element>(
    problem: &Problem,
    scale: T,
    mask: Mask,
    q: &Tensor<T>,
    k: &Tensor<T>,
    v: &Tensor<T>,
    out: &mut Tensor<T>,
    heads: Range<usize>,
) {
    let out_heads = out.heads_mut();
    let tasks: Vec<(usize, usize, usize)> = (0..problem.batch)
        .flat_map(|b| {
            heads.clone().flat_map(move |h| {
                (0..problem.len_q)
                    .step_by(TILE_QUERIES)
                    .map(move |start| (b, h, start))
            })
        })
        .collect();
    tasks.par_iter().for_each_init(
        || TileScratch {
            scores: vec![T::zero(); TILE_QUERIES * TILE_KEYS],
            max: vec![T::zero(); TILE_QUERIES],
            sum: vec![T::zero(); TILE_QUERIES],
        },
        |scratch, &(b, h, start)| {
            let g = problem.kv_head(h);
            let rows = TILE_QUERIES.min(problem.len_q - start);
            let queries = q.head(b, h).rows_range(start, rows);
            let (keys, values) = (k.head(b, g), v.head(b, g));
            // SAFETY: each (b, h, start) block is one task.
            let mut acc = unsafe { out_heads.block(b, h, start, rows) };
            for i in 0..rows {
                acc.row_mut(i).iter_mut().for_each(|o| *o = T::zero());
            }
            scratch.max[..rows].fill(T::neg_infinity());
            scratch.sum[..rows].fill(T::zero());

            let first_visible = mask.keys(start, problem.len_k).start;
            let last_visible = mask.keys(start + rows - 1, problem.len_k).end;
            let mut key_start = first_visible;
            while key_start < last_visible {
                let cols = TILE_KEYS.min(last_visible - key_start);
                let block = key_start..key_start + cols;
                let scores = &mut scratch.scores[..rows * cols];
                matmul(
                    MatMut::contiguous(scores, rows, cols),
                    queries,
                    keys.rows_range(key_start, cols).t(),
                    false,
                    scale,
                );
                for i in 0..rows {
                    let visible = mask.keys(start + i, problem.len_k);
                    let row = &mut scores[i * cols..(i + 1) * cols];
                    let lo = visible.start.clamp(block.start, block.end) - block.start;
                    let hi = visible.end.clamp(block.start, block.end) - block.start;
                    if lo >= hi {
                        row.fill(T::zero());
                        continue;
                    }
                    row[..lo].fill(T::neg_infinity());
                    row[hi..].fill(T::neg_infinity());
                    let block_max = row[lo..hi].iter().copied().fold(T::neg_infinity(), T::max);
                    let old_max = scratch.max[i];
                    let new_max = old_max.max(block_max);
                    let mut block_sum = T::zero();
                    for x in row.iter_mut() {
                        *x = (*x - new_max).exp();
                        block_sum += *x;
                    }
                    if old_max != new_max {
                        let correction = (old_max - new_max).exp();
                        scratch.sum[i] *= correction;
                        acc.row_mut(i).iter_mut().for_each(|o| *o *= correction);
                    }
                    scratch.sum[i] += block_sum;
                    scratch.max[i] = new_max;
                }
                matmul(
                    acc.rb(),
                    MatRef::contiguous(scores, rows, cols),
                    values.rows_range(key_start, cols),
                    true,
                    T::one(),
                );
                key_start += cols;
            }
            divide_rows(acc, &scratch.sum[..rows]);
        },
    );
}
