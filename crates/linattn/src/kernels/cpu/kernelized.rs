//! The one engine behind every kernelized method (linear, performer, cosformer and the
//! global heads of hybrid): `O = φ(Q) (φ(K)ᵀ V)`, normalised row by row by
//! `φ(qᵢ) · Σⱼ φ(kⱼ)`. The methods differ only in their [`FeatureMap`] and [`Normalizer`].
//!
//! Stabilised maps (FAVOR+) produce key features `φ(kⱼ) = k̂ⱼ·e^{cⱼ−C} + u` where `cⱼ` is
//! the key's own log-scale, `C` the largest log-scale seen so far and `u` a constant. The
//! running state keeps `C` and rescales when it grows, as online softmax does, so a
//! single pass (and the causal form, which may not look ahead) never overflows.

use super::matmul::{MatMut, MatRef, matmul, packing_bytes};
use crate::attention::Problem;
use crate::attention::per_thread;
use crate::softmax::task_list_bytes;
use crate::tensor::{Element, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// How a row's numerator is divided by its denominator `φ(qᵢ)·z`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Normalizer {
    /// `num / (den + ε)`: Linear Transformer.
    AddEpsilon(f64),
    /// `num / den`: Performer (its features are strictly positive).
    Exact,
    /// `num / max(den, ε)`: cosFormer.
    ClampMin(f64),
}

impl Normalizer {
    #[inline]
    fn divisor<T: Element>(self, den: T) -> T {
        match self {
            Normalizer::AddEpsilon(eps) => den + T::of_f64(eps),
            Normalizer::Exact => den,
            Normalizer::ClampMin(eps) => den.max(T::of_f64(eps)),
        }
    }
}

/// A feature map φ applied to blocks of rows of one head.
pub(crate) trait FeatureMap<T: Element>: Sync {
    /// Number of features m.
    fn features(&self) -> usize;

    /// φ of query rows `first..first + rows.rows` into `out` (rows × m, row-major).
    fn queries(&self, rows: MatRef<'_, T>, first: usize, out: &mut [T]);

    /// Key features of rows `first..`, into `out` (rows × m). A stabilised map writes
    /// `k̂ⱼ` and each row's log-scale `cⱼ` into `log_scale`; others leave it alone.
    fn keys(&self, rows: MatRef<'_, T>, first: usize, out: &mut [T], log_scale: &mut [T]);

    /// `Some(u)` for a stabilised map whose key features are `k̂ⱼ·e^{cⱼ−C} + u`.
    fn stabiliser(&self) -> Option<T>;
}

/// The running sums of a kernelized attention over the keys seen so far: everything a
/// recurrent step needs, of constant size m × d_v.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LinearState<T> {
    /// `Σⱼ k̂ⱼ e^{cⱼ−C} vⱼᵀ`, m × d_v row-major.
    pub kv: Vec<T>,
    /// `Σⱼ k̂ⱼ e^{cⱼ−C}`, m.
    pub k_sum: Vec<T>,
    /// C: the largest key log-scale absorbed (−∞ before the first key); 0 when unstabilised.
    pub log_scale: T,
    /// `Σⱼ vⱼ`, for the constant feature u (stabilised maps only).
    pub v_sum: Vec<T>,
    /// Number of keys absorbed.
    pub count: usize,
    dim_v: usize,
}

impl<T: Element> LinearState<T> {
    pub fn new(features: usize, dim_v: usize, stabilised: bool) -> Self {
        Self {
            kv: vec![T::zero(); features * dim_v],
            k_sum: vec![T::zero(); features],
            log_scale: if stabilised {
                T::neg_infinity()
            } else {
                T::zero()
            },
            v_sum: vec![T::zero(); if stabilised { dim_v } else { 0 }],
            count: 0,
            dim_v,
        }
    }

    fn features(&self) -> usize {
        self.k_sum.len()
    }

    fn stabilised(&self) -> bool {
        !self.v_sum.is_empty()
    }

    /// Moves the reference log-scale up to `new` (≥ the current one), rescaling the sums.
    fn rescale_to(&mut self, new: T) {
        if new == self.log_scale {
            return;
        }
        let factor = (self.log_scale - new).exp();
        self.kv.iter_mut().for_each(|x| *x *= factor);
        self.k_sum.iter_mut().for_each(|x| *x *= factor);
        self.log_scale = new;
    }

    /// Adds a block of keys: `features` (L × m, overwritten with the rescaled features)
    /// with their `log_scale`s, and the matching `values`.
    fn absorb(&mut self, features: &mut [T], log_scale: &[T], values: MatRef<'_, T>) {
        let (len, m) = (values.rows, self.features());
        if self.stabilised() {
            let block_max = log_scale[..len]
                .iter()
                .copied()
                .fold(T::neg_infinity(), T::max);
            self.rescale_to(self.log_scale.max(block_max));
            for (row, &c) in features.chunks_exact_mut(m).zip(log_scale) {
                let factor = (c - self.log_scale).exp();
                row.iter_mut().for_each(|x| *x *= factor);
            }
            for i in 0..len {
                add_assign(&mut self.v_sum, values.row(i));
            }
        }
        let features = &features[..len * m];
        for row in features.chunks_exact(m) {
            add_assign(&mut self.k_sum, row);
        }
        matmul(
            MatMut::contiguous(&mut self.kv, m, self.dim_v),
            MatRef::contiguous(features, len, m).t(),
            values,
            true,
            T::one(),
        );
        self.count += len;
    }

    /// Adds another state over a disjoint set of keys.
    fn merge(&mut self, mut other: Self) {
        let top = self.log_scale.max(other.log_scale);
        if top != T::neg_infinity() {
            self.rescale_to(top);
            other.rescale_to(top);
        }
        add_assign(&mut self.kv, &other.kv);
        add_assign(&mut self.k_sum, &other.k_sum);
        add_assign(&mut self.v_sum, &other.v_sum);
        self.count += other.count;
    }
}

#[inline]
fn add_assign<T: Element>(acc: &mut [T], x: &[T]) {
    acc.iter_mut().zip(x).for_each(|(a, &b)| *a += b);
}

#[inline]
fn dot<T: Element>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::zero(), |acc, (&x, &y)| acc + x * y)
}

/// Rows per block when mapping features in the non-causal form.
const FULL_BLOCK: usize = 256;

/// Non-causal kernelized attention for the query heads in `heads`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn full<T: Element, F: FeatureMap<T>>(
    problem: &Problem,
    fmap: &F,
    normalizer: Normalizer,
    q: &Tensor<T>,
    k: &Tensor<T>,
    v: &Tensor<T>,
    out: &mut Tensor<T>,
    heads: Range<usize>,
) {
    let m = fmap.features();
    let stabilised = fmap.stabiliser().is_some();
    let kv_heads: Vec<usize> = {
        let mut needed: Vec<usize> = heads.clone().map(|h| problem.kv_head(h)).collect();
        needed.dedup();
        needed
    };

    // Phase 1: one state per (batch, kv head), each split over the sequence when there are
    // fewer (batch, head) pairs than threads, then merged.
    let parts = rayon::current_num_threads()
        .div_ceil(problem.batch * kv_heads.len())
        .clamp(1, problem.len_k.div_ceil(FULL_BLOCK));
    let span = problem.len_k.div_ceil(parts);
    let tasks: Vec<(usize, usize, usize)> = (0..problem.batch)
        .flat_map(|b| {
            kv_heads
                .iter()
                .flat_map(move |&g| (0..parts).map(move |p| (b, g, p)))
        })
        .collect();
    let partial: Vec<LinearState<T>> = tasks
        .par_iter()
        .map(|&(b, g, part)| {
            let keys = k.head(b, g);
            let values = v.head(b, g);
            let mut state = LinearState::new(m, problem.dim_v, stabilised);
            let mut features = vec![T::zero(); FULL_BLOCK * m];
            let mut log_scale = vec![T::zero(); FULL_BLOCK];
            let end = ((part + 1) * span).min(problem.len_k);
            let mut start = part * span;
            while start < end {
                let len = FULL_BLOCK.min(end - start);
                fmap.keys(
                    keys.rows_range(start, len),
                    start,
                    &mut features,
                    &mut log_scale,
                );
                state.absorb(&mut features, &log_scale, values.rows_range(start, len));
                start += len;
            }
            state
        })
        .collect();
    let mut states: Vec<LinearState<T>> = Vec::with_capacity(problem.batch * kv_heads.len());
    for (index, state) in partial.into_iter().enumerate() {
        if index % parts == 0 {
            states.push(state);
        } else {
            states.last_mut().expect("first part pushed").merge(state);
        }
    }
    let state_of = |b: usize, h: usize| {
        let slot = kv_heads
            .iter()
            .position(|&g| g == problem.kv_head(h))
            .expect("kv head of a requested q head");
        &states[b * kv_heads.len() + slot]
    };

    // Phase 2: every block of query rows reads its head's state.
    let uniform = fmap.stabiliser();
    let out_heads = out.heads_mut();
    let blocks: Vec<(usize, usize, usize)> = (0..problem.batch)
        .flat_map(|b| {
            heads.clone().flat_map(move |h| {
                (0..problem.len_q)
                    .step_by(FULL_BLOCK)
                    .map(move |start| (b, h, start))
            })
        })
        .collect();
    blocks.par_iter().for_each_init(
        || vec![T::zero(); FULL_BLOCK * m],
        |features, &(b, h, start)| {
            let len = FULL_BLOCK.min(problem.len_q - start);
            let state = state_of(b, h);
            fmap.queries(q.head(b, h).rows_range(start, len), start, features);
            let phi = MatRef::contiguous(features, len, m);
            // SAFETY: each (b, h, start) block is visited by exactly one task.
            let mut rows = unsafe { out_heads.block(b, h, start, len) };
            matmul(
                rows.rb(),
                phi,
                MatRef::contiguous(&state.kv, m, problem.dim_v),
                false,
                T::one(),
            );
            for i in 0..len {
                let phi_i = phi.row(i);
                let mut den = dot(phi_i, &state.k_sum);
                let row = rows.row_mut(i);
                if let Some(u) = uniform {
                    let weight = u * phi_i.iter().copied().sum::<T>();
                    den += weight * T::of_f64(state.count as f64);
                    row.iter_mut()
                        .zip(&state.v_sum)
                        .for_each(|(o, &s)| *o += weight * s);
                }
                let inv = T::one() / normalizer.divisor(den);
                row.iter_mut().for_each(|o| *o *= inv);
            }
        },
    );
}

/// Causal kernelized attention by chunks of `chunk` tokens: exact masked products inside
/// a chunk, the running [`LinearState`] across chunks (flash-linear-attention's chunk
/// algorithm). Memory is O(chunk² + m·d_v) per task, never O(n²).
#[allow(clippy::too_many_arguments)]
pub(crate) fn causal_chunked<T: Element, F: FeatureMap<T>>(
    problem: &Problem,
    fmap: &F,
    normalizer: Normalizer,
    chunk: usize,
    q: &Tensor<T>,
    k: &Tensor<T>,
    v: &Tensor<T>,
    out: &mut Tensor<T>,
    heads: Range<usize>,
) {
    let m = fmap.features();
    let dim_v = problem.dim_v;
    let uniform = fmap.stabiliser();
    let out_heads = out.heads_mut();
    let tasks: Vec<(usize, usize)> = (0..problem.batch)
        .flat_map(|b| heads.clone().map(move |h| (b, h)))
        .collect();
    tasks.par_iter().for_each(|&(b, h)| {
        let g = problem.kv_head(h);
        let (queries, keys, values) = (q.head(b, h), k.head(b, g), v.head(b, g));
        let mut state = LinearState::new(m, dim_v, uniform.is_some());
        let mut phi_q = vec![T::zero(); chunk * m];
        let mut phi_k = vec![T::zero(); chunk * m];
        let mut key_scale = vec![T::zero(); chunk];
        let mut row_scale = vec![T::zero(); chunk];
        let mut scores = vec![T::zero(); chunk * chunk];
        let mut den = vec![T::zero(); chunk];
        let mut phi_sum = vec![T::zero(); chunk];
        let mut v_prefix = vec![T::zero(); dim_v];
        let mut start = 0;
        while start < problem.len_q {
            let len = chunk.min(problem.len_q - start);
            fmap.queries(queries.rows_range(start, len), start, &mut phi_q);
            fmap.keys(
                keys.rows_range(start, len),
                start,
                &mut phi_k,
                &mut key_scale,
            );
            let block_values = values.rows_range(start, len);
            // SAFETY: each (b, h) is one task, and its chunks are visited in turn.
            let mut rows = unsafe { out_heads.block(b, h, start, len) };

            // Query i sees keys up to i, so its stabiliser is the running maximum there.
            if uniform.is_some() {
                let mut running: T = state.log_scale;
                for i in 0..len {
                    running = running.max(key_scale[i]);
                    row_scale[i] = running;
                }
            }

            let scores_mat = MatMut::contiguous(&mut scores, len, len);
            matmul(
                scores_mat,
                MatRef::contiguous(&phi_q, len, m),
                MatRef::contiguous(&phi_k, len, m).t(),
                false,
                T::one(),
            );
            for i in 0..len {
                let row = &mut scores[i * len..(i + 1) * len];
                if uniform.is_some() {
                    for j in 0..=i {
                        row[j] *= (key_scale[j] - row_scale[i]).exp();
                    }
                }
                row[i + 1..].iter_mut().for_each(|x| *x = T::zero());
                den[i] = row.iter().copied().sum();
            }
            matmul(
                rows.rb(),
                MatRef::contiguous(&scores, len, len),
                block_values,
                false,
                T::one(),
            );

            // Earlier chunks, through the state (rescaled to each row's stabiliser).
            if uniform.is_some() {
                for i in 0..len {
                    let phi_i = &mut phi_q[i * m..(i + 1) * m];
                    phi_sum[i] = phi_i.iter().copied().sum();
                    let factor = (state.log_scale - row_scale[i]).exp();
                    phi_i.iter_mut().for_each(|x| *x *= factor);
                }
            }
            let phi = MatRef::contiguous(&phi_q, len, m);
            for (i, den) in den[..len].iter_mut().enumerate() {
                *den += dot(phi.row(i), &state.k_sum);
            }
            matmul(
                rows.rb(),
                phi,
                MatRef::contiguous(&state.kv, m, dim_v),
                true,
                T::one(),
            );
            if let Some(u) = uniform {
                // The constant feature u weighs every value so far alike.
                v_prefix.copy_from_slice(&state.v_sum);
                for i in 0..len {
                    add_assign(&mut v_prefix, block_values.row(i));
                    let weight = u * phi_sum[i];
                    den[i] += weight * T::of_f64((state.count + i + 1) as f64);
                    rows.row_mut(i)
                        .iter_mut()
                        .zip(&v_prefix)
                        .for_each(|(o, &s)| *o += weight * s);
                }
            }
            for (i, &den) in den[..len].iter().enumerate() {
                let inv = T::one() / normalizer.divisor(den);
                rows.row_mut(i).iter_mut().for_each(|o| *o *= inv);
            }

            state.absorb(&mut phi_k, &key_scale, block_values);
            start += len;
        }
    });
}

/// Upper bound of the scratch [`full`] or [`causal_chunked`] allocates, in bytes, for a
/// map of `features` features that projects through a `projection_dim`-wide product
/// (FAVOR+; 0 for maps without one).
pub(crate) fn workspace_bytes(
    problem: &Problem,
    features: usize,
    projection_dim: usize,
    chunk: usize,
    element: usize,
) -> u128 {
    let (m, dim_v) = (features, problem.dim_v);
    let state = m * dim_v + m + dim_v;
    if problem.causal {
        let c = chunk;
        let buffers = (2 * c * m + c * c + 4 * c + 2 * dim_v + state) * element;
        let packing = packing_bytes(
            element,
            &[
                (c, c, m),
                (c, dim_v, c),
                (c, dim_v, m),
                (m, dim_v, c),
                (c, m, projection_dim),
            ],
        );
        let tasks = problem.batch * problem.heads_q;
        per_thread(tasks, buffers as u128 + packing) + task_list_bytes(tasks)
    } else {
        let threads = rayon::current_num_threads();
        // Up to `threads` partial states per (batch, kv head), plus the merged ones.
        let states = problem.batch * problem.heads_kv * (threads + 1) * state;
        let block = FULL_BLOCK * (m + 1);
        let packing = packing_bytes(
            element,
            &[
                (m, dim_v, FULL_BLOCK),
                (FULL_BLOCK, m, projection_dim),
                (FULL_BLOCK, dim_v, m),
            ],
        );
        let tasks = problem.batch
            * (problem.heads_q * problem.len_q.div_ceil(FULL_BLOCK) + problem.heads_kv * threads);
        ((states + threads * block) * element) as u128
            + threads as u128 * packing
            + task_list_bytes(tasks)
    }
}
