//! Exact softmax attention: the dense form that materialises the scores, and the tiled
//! online-softmax form of FlashAttention (blocks of keys, running max and sum, O(block)
//! extra memory), both with causal and sliding-window masks.

use super::matmul::matmul;
use crate::base::Problem;
use crate::base::simd;
use crate::base::{Element, Tensor};
use crate::base::{MatMut, MatRef};
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

    /// The queries that see at least one key of `keys`, within `0..len_q`.
    pub fn queries(&self, keys: Range<usize>, len_q: usize) -> Range<usize> {
        // Query i sees keys i − left ..= i + right.
        let lo = self.right.map_or(0, |r| keys.start.saturating_sub(r));
        let hi = self.left.map_or(len_q, |l| {
            (keys.end - 1)
                .saturating_add(l)
                .saturating_add(1)
                .min(len_q)
        });
        lo..hi.max(lo)
    }
}

/// Query rows per task of the tiled kernel.
pub(crate) const TILE_QUERIES: usize = 256;
/// Keys per block of the tiled kernel.
pub(crate) const TILE_KEYS: usize = 256;

/// Turns each row of `scores` (rows × cols) into unnormalised softmax weights over its
/// visible range, zero elsewhere, and writes each row's sum into `sums`.
fn exponentiate_rows<T: Element>(
    scores: &mut [T],
    cols: usize,
    visible: impl Fn(usize) -> Range<usize>,
    sums: &mut [T],
) {
    for (i, row) in scores.chunks_exact_mut(cols).enumerate() {
        let range = visible(i);
        let max = simd::max(&row[range.clone()]);
        row[..range.start].fill(T::zero());
        row[range.end..].fill(T::zero());
        sums[i] = simd::exp_shifted(&mut row[range], max);
    }
}

fn divide_rows<T: Element>(mut out: MatMut<'_, T>, sums: &[T]) {
    for (i, &sum) in sums.iter().enumerate().take(out.rows) {
        simd::scale(out.row_mut(i), T::one() / sum);
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

/// Scratch of one tiled task: its queries, the scores of a tile, the running max and
/// sum per row, and the output accumulator.
struct TileScratch<T> {
    queries: Vec<T>,
    scores: Vec<T>,
    max: Vec<T>,
    sum: Vec<T>,
    acc: Vec<T>,
}

/// Keys and values of some kv heads copied head-major, each (batch, head) `len_k`
/// contiguous rows: every query tile reads them again, and contiguous rows are what the
/// matrix products pack fastest.
pub(crate) struct HeadMajor<T> {
    keys: Vec<T>,
    values: Vec<T>,
    heads: Range<usize>,
    len: usize,
    dim: usize,
    dim_v: usize,
}

impl<T: Element> HeadMajor<T> {
    pub fn new(problem: &Problem, k: &Tensor<T>, v: &Tensor<T>, heads: Range<usize>) -> Self {
        let (len, dim, dim_v) = (problem.len_k, problem.dim_qk, problem.dim_v);
        let copy = |x: &Tensor<T>, width: usize| -> Vec<T> {
            let mut out = vec![T::zero(); problem.batch * heads.len() * len * width];
            out.par_chunks_mut(len * width)
                .enumerate()
                .for_each(|(index, dst)| {
                    let (b, g) = (index / heads.len(), heads.start + index % heads.len());
                    let rows = x.head(b, g);
                    for (t, row) in dst.chunks_exact_mut(width).enumerate() {
                        row.copy_from_slice(rows.row(t));
                    }
                });
            out
        };
        Self {
            keys: copy(k, dim),
            values: copy(v, dim_v),
            heads,
            len,
            dim,
            dim_v,
        }
    }

    fn slot(&self, b: usize, g: usize) -> usize {
        b * self.heads.len() + g - self.heads.start
    }

    fn keys(&self, b: usize, g: usize) -> MatRef<'_, T> {
        let size = self.len * self.dim;
        MatRef::contiguous(
            &self.keys[self.slot(b, g) * size..][..size],
            self.len,
            self.dim,
        )
    }

    fn values(&self, b: usize, g: usize) -> MatRef<'_, T> {
        let size = self.len * self.dim_v;
        MatRef::contiguous(
            &self.values[self.slot(b, g) * size..][..size],
            self.len,
            self.dim_v,
        )
    }

    /// Bytes of the copies for `problem`.
    pub fn bytes(problem: &Problem, element: usize) -> u128 {
        (problem.batch
            * problem.heads_kv
            * problem.len_k
            * (problem.dim_qk + problem.dim_v)
            * element) as u128
    }
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
    log_sum_exp: Option<&mut Tensor<T>>,
) {
    let (d, dim_v) = (problem.dim_qk, problem.dim_v);
    let kv = HeadMajor::new(
        problem,
        k,
        v,
        problem.kv_head(heads.start)..problem.kv_head(heads.end - 1) + 1,
    );
    let out_heads = out.heads_mut();
    let lse_heads = log_sum_exp.map(|t| t.heads_mut());
    let tasks = query_blocks(problem, &heads);
    tasks.par_iter().for_each_init(
        || TileScratch {
            queries: vec![T::zero(); TILE_QUERIES * d],
            scores: vec![T::zero(); TILE_QUERIES * TILE_KEYS],
            max: vec![T::zero(); TILE_QUERIES],
            sum: vec![T::zero(); TILE_QUERIES],
            acc: vec![T::zero(); TILE_QUERIES * dim_v],
        },
        |scratch, &(b, h, start)| {
            let g = problem.kv_head(h);
            let rows = TILE_QUERIES.min(problem.len_q - start);
            // The scale goes into the queries once rather than into every tile.
            let source = q.head(b, h);
            for (i, row) in scratch.queries.chunks_exact_mut(d).take(rows).enumerate() {
                row.copy_from_slice(source.row(start + i));
                simd::scale(row, scale);
            }
            let queries = MatRef::contiguous(&scratch.queries, rows, d);
            let (keys, values) = (kv.keys(b, g), kv.values(b, g));
            let acc = &mut scratch.acc[..rows * dim_v];
            acc.fill(T::zero());
            scratch.max[..rows].fill(T::neg_infinity());
            scratch.sum[..rows].fill(T::zero());

            let (first, last) = (
                mask.keys(start, problem.len_k),
                mask.keys(start + rows - 1, problem.len_k),
            );
            for key_start in (first.start..last.end).step_by(TILE_KEYS) {
                let cols = TILE_KEYS.min(last.end - key_start);
                let block = key_start..key_start + cols;
                // Only blocks that cross a mask boundary need the per-row ranges.
                let whole = last.start <= block.start && first.end >= block.end;
                let scores = &mut scratch.scores[..rows * cols];
                matmul(
                    MatMut::contiguous(scores, rows, cols),
                    queries,
                    keys.rows_range(key_start, cols).t(),
                    false,
                    T::one(),
                );
                for (i, row) in scores.chunks_exact_mut(cols).enumerate() {
                    let (lo, hi) = if whole {
                        (0, cols)
                    } else {
                        let visible = mask.keys(start + i, problem.len_k);
                        (
                            visible.start.clamp(block.start, block.end) - block.start,
                            visible.end.clamp(block.start, block.end) - block.start,
                        )
                    };
                    if lo >= hi {
                        row.fill(T::zero());
                        continue;
                    }
                    row[..lo].fill(T::zero());
                    row[hi..].fill(T::zero());
                    let old_max = scratch.max[i];
                    let new_max = old_max.max(simd::max(&row[lo..hi]));
                    let block_sum = simd::exp_shifted(&mut row[lo..hi], new_max);
                    if old_max != new_max {
                        let correction = (old_max - new_max).exp();
                        scratch.sum[i] *= correction;
                        simd::scale(&mut acc[i * dim_v..(i + 1) * dim_v], correction);
                    }
                    scratch.sum[i] += block_sum;
                    scratch.max[i] = new_max;
                }
                matmul(
                    MatMut::contiguous(acc, rows, dim_v),
                    MatRef::contiguous(scores, rows, cols),
                    values.rows_range(key_start, cols),
                    true,
                    T::one(),
                );
            }
            // SAFETY: each (b, h, start) block is one task.
            let mut out_rows = unsafe { out_heads.block(b, h, start, rows) };
            for (i, (row, &sum)) in acc.chunks_exact(dim_v).zip(&scratch.sum).enumerate() {
                let inv = T::one() / sum;
                out_rows
                    .row_mut(i)
                    .iter_mut()
                    .zip(row)
                    .for_each(|(o, &a)| *o = a * inv);
            }
            if let Some(lse_heads) = &lse_heads {
                // SAFETY: as for the output rows.
                let mut lse = unsafe { lse_heads.block(b, h, start, rows) };
                for i in 0..rows {
                    lse.row_mut(i)[0] = scratch.max[i] + scratch.sum[i].ln();
                }
            }
        },
    );
}

/// (batch, head, first row) of every block of `TILE_QUERIES` query rows.
fn query_blocks(problem: &Problem, heads: &Range<usize>) -> Vec<(usize, usize, usize)> {
    (0..problem.batch)
        .flat_map(|b| {
            heads.clone().flat_map(move |h| {
                (0..problem.len_q)
                    .step_by(TILE_QUERIES)
                    .map(move |start| (b, h, start))
            })
        })
        .collect()
}

/// Turns a tile of scores (rows `row0..`, keys `col0..`) into probabilities
/// `exp(s − lseᵢ)`, zero where the mask hides the key.
#[allow(clippy::too_many_arguments)]
fn probabilities<T: Element>(
    scores: &mut [T],
    cols: usize,
    row0: usize,
    col0: usize,
    mask: Mask,
    len_k: usize,
    log_sum_exp: impl Fn(usize) -> T,
) {
    for (i, row) in scores.chunks_exact_mut(cols).enumerate() {
        let visible = mask.keys(row0 + i, len_k);
        let lo = visible.start.clamp(col0, col0 + cols) - col0;
        let hi = visible.end.clamp(col0, col0 + cols) - col0;
        row[..lo].fill(T::zero());
        row[hi.max(lo)..].fill(T::zero());
        if lo < hi {
            simd::exp_shifted(&mut row[lo..hi], log_sum_exp(i));
        }
    }
}

/// dS = P ∘ (dP − Δᵢ) in place of dP, where Δᵢ = doᵢ·oᵢ.
fn score_gradients<T: Element>(
    d_probs: &mut [T],
    probs: &[T],
    cols: usize,
    delta: impl Fn(usize) -> T,
) {
    for (i, (ds, p)) in d_probs
        .chunks_exact_mut(cols)
        .zip(probs.chunks_exact(cols))
        .enumerate()
    {
        let delta = delta(i);
        ds.iter_mut()
            .zip(p)
            .for_each(|(ds, &p)| *ds = p * (*ds - delta));
    }
}

/// Δᵢ = doᵢ·oᵢ for every query row of `heads`, as a `[batch, len_q, heads_q, 1]` tensor.
fn output_dot_gradient<T: Element>(
    out: &Tensor<T>,
    d_out: &Tensor<T>,
    problem: &Problem,
    heads: &Range<usize>,
) -> Tensor<T> {
    let mut delta = Tensor::zeros([problem.batch, problem.len_q, problem.heads_q, 1])
        .expect("counted in the workspace");
    for b in 0..problem.batch {
        for h in heads.clone() {
            let (o, g) = (out.head(b, h), d_out.head(b, h));
            for i in 0..problem.len_q {
                let value: T = o.row(i).iter().zip(g.row(i)).map(|(&a, &b)| a * b).sum();
                let index = (b * problem.len_q + i) * problem.heads_q + h;
                delta.as_mut_slice()[index] = value;
            }
        }
    }
    delta
}

/// Gradients of tiled exact attention (FlashAttention-2's backward), added into `dq`,
/// `dk`, `dv`: the forward is recomputed for its log-sum-exp, then one pass over query
/// blocks gives dq and one over key blocks gives dk and dv, each recomputing its tiles
/// of probabilities. Extra memory is O(n) plus tiles.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tiled_backward<T: Element>(
    problem: &Problem,
    scale: T,
    mask: Mask,
    [q, k, v, d_out]: [&Tensor<T>; 4],
    [dq, dk, dv]: [&mut Tensor<T>; 3],
    heads: Range<usize>,
) {
    let mut out = Tensor::zeros(problem.out_shape()).expect("counted in the workspace");
    let mut lse = Tensor::zeros([problem.batch, problem.len_q, problem.heads_q, 1])
        .expect("counted in the workspace");
    tiled(
        problem,
        scale,
        mask,
        q,
        k,
        v,
        &mut out,
        heads.clone(),
        Some(&mut lse),
    );
    let delta = output_dot_gradient(&out, d_out, problem, &heads);
    drop(out);
    let row_value = |t: &Tensor<T>, b: usize, h: usize, i: usize| t.at(b, i, h, 0);

    // dq: each query block walks its visible keys.
    let dq_heads = dq.heads_mut();
    query_blocks(problem, &heads).par_iter().for_each_init(
        || {
            (
                vec![T::zero(); TILE_QUERIES * TILE_KEYS],
                vec![T::zero(); TILE_QUERIES * TILE_KEYS],
            )
        },
        |(probs, d_probs), &(b, h, start)| {
            let g = problem.kv_head(h);
            let rows = TILE_QUERIES.min(problem.len_q - start);
            let queries = q.head(b, h).rows_range(start, rows);
            let upstream = d_out.head(b, h).rows_range(start, rows);
            let (keys, values) = (k.head(b, g), v.head(b, g));
            // SAFETY: each (b, h, start) block is one task.
            let mut dq_rows = unsafe { dq_heads.block(b, h, start, rows) };
            let visible = mask.keys(start, problem.len_k).start
                ..mask.keys(start + rows - 1, problem.len_k).end;
            for key_start in visible.clone().step_by(TILE_KEYS) {
                let cols = TILE_KEYS.min(visible.end - key_start);
                let block_keys = keys.rows_range(key_start, cols);
                let (p, dp) = (&mut probs[..rows * cols], &mut d_probs[..rows * cols]);
                matmul(
                    MatMut::contiguous(p, rows, cols),
                    queries,
                    block_keys.t(),
                    false,
                    scale,
                );
                probabilities(p, cols, start, key_start, mask, problem.len_k, |i| {
                    row_value(&lse, b, h, start + i)
                });
                let block_values = values.rows_range(key_start, cols);
                matmul(
                    MatMut::contiguous(dp, rows, cols),
                    upstream,
                    block_values.t(),
                    false,
                    T::one(),
                );
                score_gradients(dp, p, cols, |i| row_value(&delta, b, h, start + i));
                matmul(
                    dq_rows.rb(),
                    MatRef::contiguous(dp, rows, cols),
                    block_keys,
                    true,
                    scale,
                );
            }
        },
    );

    // dk, dv: each key block of a kv head walks the queries of its group that see it.
    let mut groups: Vec<usize> = heads.clone().map(|h| problem.kv_head(h)).collect();
    groups.dedup();
    let key_blocks: Vec<(usize, usize, usize)> = (0..problem.batch)
        .flat_map(|b| {
            groups.iter().flat_map(move |&g| {
                (0..problem.len_k)
                    .step_by(TILE_KEYS)
                    .map(move |start| (b, g, start))
            })
        })
        .collect();
    let (dk_heads, dv_heads) = (dk.heads_mut(), dv.heads_mut());
    key_blocks.par_iter().for_each_init(
        || {
            (
                vec![T::zero(); TILE_QUERIES * TILE_KEYS],
                vec![T::zero(); TILE_QUERIES * TILE_KEYS],
            )
        },
        |(probs, d_probs), &(b, g, key_start)| {
            let cols = TILE_KEYS.min(problem.len_k - key_start);
            let block_keys = k.head(b, g).rows_range(key_start, cols);
            let block_values = v.head(b, g).rows_range(key_start, cols);
            // SAFETY: each (b, g, key_start) block is one task.
            let (mut dk_rows, mut dv_rows) = unsafe {
                (
                    dk_heads.block(b, g, key_start, cols),
                    dv_heads.block(b, g, key_start, cols),
                )
            };
            let seen_by = mask.queries(key_start..key_start + cols, problem.len_q);
            for h in heads.clone().filter(|&h| problem.kv_head(h) == g) {
                for start in seen_by.clone().step_by(TILE_QUERIES) {
                    let rows = TILE_QUERIES.min(seen_by.end - start);
                    let queries = q.head(b, h).rows_range(start, rows);
                    let upstream = d_out.head(b, h).rows_range(start, rows);
                    let (p, dp) = (&mut probs[..rows * cols], &mut d_probs[..rows * cols]);
                    matmul(
                        MatMut::contiguous(p, rows, cols),
                        queries,
                        block_keys.t(),
                        false,
                        scale,
                    );
                    probabilities(p, cols, start, key_start, mask, problem.len_k, |i| {
                        row_value(&lse, b, h, start + i)
                    });
                    let p_mat = MatRef::contiguous(p, rows, cols);
                    matmul(dv_rows.rb(), p_mat.t(), upstream, true, T::one());
                    matmul(
                        MatMut::contiguous(dp, rows, cols),
                        upstream,
                        block_values.t(),
                        false,
                        T::one(),
                    );
                    score_gradients(dp, p, cols, |i| row_value(&delta, b, h, start + i));
                    matmul(
                        dk_rows.rb(),
                        MatRef::contiguous(dp, rows, cols).t(),
                        queries,
                        true,
                        scale,
                    );
                }
            }
        },
    );
}

/// Gradients of naive exact attention, added into `dq`, `dk`, `dv`: per (batch, kv head)
/// the full probability matrix of each of its query heads, and its gradient.
#[allow(clippy::too_many_arguments)]
pub(crate) fn naive_backward<T: Element>(
    problem: &Problem,
    scale: T,
    mask: Mask,
    [q, k, v, d_out]: [&Tensor<T>; 4],
    [dq, dk, dv]: [&mut Tensor<T>; 3],
    heads: Range<usize>,
) {
    let (lq, lk) = (problem.len_q, problem.len_k);
    let mut groups: Vec<usize> = heads.clone().map(|h| problem.kv_head(h)).collect();
    groups.dedup();
    let tasks: Vec<(usize, usize)> = (0..problem.batch)
        .flat_map(|b| groups.iter().map(move |&g| (b, g)))
        .collect();
    let (dq_heads, dk_heads, dv_heads) = (dq.heads_mut(), dk.heads_mut(), dv.heads_mut());
    tasks.par_iter().for_each(|&(b, g)| {
        let (keys, values) = (k.head(b, g), v.head(b, g));
        // SAFETY: each (b, g) is one task, and so are the q heads of its group.
        let (mut dk_rows, mut dv_rows) =
            unsafe { (dk_heads.block(b, g, 0, lk), dv_heads.block(b, g, 0, lk)) };
        let mut probs = vec![T::zero(); lq * lk];
        let mut d_probs = vec![T::zero(); lq * lk];
        let mut sums = vec![T::zero(); lq];
        for h in heads.clone().filter(|&h| problem.kv_head(h) == g) {
            let (queries, upstream) = (q.head(b, h), d_out.head(b, h));
            matmul(
                MatMut::contiguous(&mut probs, lq, lk),
                queries,
                keys.t(),
                false,
                scale,
            );
            exponentiate_rows(&mut probs, lk, |i| mask.keys(i, lk), &mut sums);
            for (row, &sum) in probs.chunks_exact_mut(lk).zip(&sums) {
                let inv = T::one() / sum;
                row.iter_mut().for_each(|p| *p *= inv);
            }
            let p_mat = MatRef::contiguous(&probs, lq, lk);
            matmul(dv_rows.rb(), p_mat.t(), upstream, true, T::one());
            matmul(
                MatMut::contiguous(&mut d_probs, lq, lk),
                upstream,
                values.t(),
                false,
                T::one(),
            );
            // Δᵢ = Σⱼ Pᵢⱼ dPᵢⱼ = doᵢ·oᵢ.
            for (dp, p) in d_probs.chunks_exact_mut(lk).zip(probs.chunks_exact(lk)) {
                let delta: T = dp.iter().zip(p).map(|(&a, &b)| a * b).sum();
                dp.iter_mut()
                    .zip(p)
                    .for_each(|(ds, &p)| *ds = p * (*ds - delta));
            }
            let ds = MatRef::contiguous(&d_probs, lq, lk);
            let mut dq_rows = unsafe { dq_heads.block(b, h, 0, lq) };
            matmul(dq_rows.rb(), ds, keys, true, scale);
            matmul(dk_rows.rb(), ds.t(), queries, true, scale);
        }
    });
}
