//! Non-causal kernelized attention: one state `Σⱼ φ(kⱼ) vⱼᵀ` per (batch, kv head), read
//! by every query; and its backward, which needs one more pair of sums over the queries.

use super::{
    FULL_BLOCK, FeatureMap, LinearState, Normalizer, add_assign, dot, merge_parts, numerators,
    scale_rows,
};
use crate::backend::cpu::matmul::matmul;
use crate::base::Problem;
use crate::base::simd;
use crate::base::tensor::block_head;
use crate::base::{Element, Tensor};
use crate::base::{MatMut, MatRef};
use rayon::prelude::*;
use std::ops::Range;

/// The kv heads that the query heads in `heads` read, in order.
fn kv_heads_of(problem: &Problem, heads: &Range<usize>) -> Vec<usize> {
    let mut needed: Vec<usize> = heads.clone().map(|h| problem.kv_head(h)).collect();
    needed.dedup();
    needed
}

/// Pieces each of `pairs` problems is split into so that every thread has work.
fn parts_per_head(pairs: usize, len: usize) -> usize {
    rayon::current_num_threads()
        .div_ceil(pairs)
        .clamp(1, len.div_ceil(FULL_BLOCK))
}

/// One state over all keys for each (batch, kv head in `kv_heads`), batch-major, and
/// whether every key and value was finite. Each task sweeps a part of one batch's
/// sequence for every kv head at once, reading the keys and values in memory order.
fn key_states<T: Element, F: FeatureMap<T>>(
    problem: &Problem,
    fmap: &F,
    k: &Tensor<T>,
    v: &Tensor<T>,
    kv_heads: &[usize],
) -> (Vec<LinearState<T>>, bool) {
    let (m, d, dim_v) = (fmap.features(), problem.dim_qk, problem.dim_v);
    let stabilised = fmap.stabiliser().is_some();
    let heads = kv_heads[0]..kv_heads[kv_heads.len() - 1] + 1;
    let parts = parts_per_head(problem.batch, problem.len_k);
    let span = problem.len_k.div_ceil(parts);
    let tasks: Vec<(usize, usize)> = (0..problem.batch)
        .flat_map(|b| (0..parts).map(move |p| (b, p)))
        .collect();
    let partial: Vec<(Vec<LinearState<T>>, bool)> = tasks
        .par_iter()
        .map(|&(b, part)| {
            let mut finite = true;
            let mut states = vec![LinearState::new(m, dim_v, stabilised); heads.len()];
            let (mut keys, mut values) = (Vec::new(), Vec::new());
            let mut features = vec![T::zero(); FULL_BLOCK * m];
            let mut log_scale = vec![T::zero(); FULL_BLOCK];
            let end = ((part + 1) * span).min(problem.len_k);
            for start in (part * span..end).step_by(FULL_BLOCK) {
                let len = FULL_BLOCK.min(end - start);
                let (key_block, keys_finite) =
                    k.rows_of(b, start..start + len, heads.clone(), &mut keys);
                let (value_block, values_finite) =
                    v.rows_of(b, start..start + len, heads.clone(), &mut values);
                finite &= keys_finite && values_finite;
                for (slot, state) in states.iter_mut().enumerate() {
                    let key_rows = block_head(key_block, len, heads.len(), slot, d);
                    let value_rows = block_head(value_block, len, heads.len(), slot, dim_v);
                    fmap.keys(key_rows, start, &mut features, &mut log_scale);
                    state.absorb(start, &mut features, &log_scale, value_rows);
                }
            }
            (states, finite)
        })
        .collect();
    merge_parts(partial, parts)
}

/// Non-causal kernelized attention for the query heads in `heads`. Each task takes a
/// block of rows of every head, so that queries are read and outputs written in order.
/// Returns whether every input and output was finite.
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
) -> bool {
    let (m, d) = (fmap.features(), problem.dim_qk);
    let kv_heads = kv_heads_of(problem, &heads);
    let (states, keys_finite) = key_states(problem, fmap, k, v, &kv_heads);
    let state_of = |b: usize, h: usize| {
        let slot = problem.kv_head(h) - kv_heads[0];
        &states[b * kv_heads.len() + slot]
    };

    let uniform = fmap.stabiliser();
    let out_heads = out.heads_mut();
    let width = heads.len();
    let blocks: Vec<(usize, usize)> = (0..problem.batch)
        .flat_map(|b| {
            (0..problem.len_q)
                .step_by(FULL_BLOCK)
                .map(move |start| (b, start))
        })
        .collect();
    let rows_finite = blocks.par_iter().map_init(
        || {
            (
                Vec::new(),
                vec![T::zero(); FULL_BLOCK * m],
                vec![T::zero(); FULL_BLOCK],
            )
        },
        |(queries, features, den), &(b, start)| {
            let len = FULL_BLOCK.min(problem.len_q - start);
            let (query_block, mut finite) =
                q.rows_of(b, start..start + len, heads.clone(), queries);
            for (slot, h) in heads.clone().enumerate() {
                let query_rows = block_head(query_block, len, width, slot, d);
                fmap.queries(query_rows, start, features);
                let phi = MatRef::contiguous(features, len, m);
                // The products land in the output tensor itself: no block buffer to copy
                // out afterwards.
                // SAFETY: each (b, start) block of rows is one task, and a task's heads
                // are distinct.
                let mut rows = unsafe { out_heads.block(b, h, start, len) };
                numerators(phi, state_of(b, h), uniform, rows.rb(), den);
                for (i, &den) in den[..len].iter().enumerate() {
                    let row = rows.row_mut(i);
                    simd::scale(row, T::one() / normalizer.divisor(den));
                    finite &= simd::all_finite(row);
                }
            }
            finite
        },
    );
    keys_finite && rows_finite.all(|finite| finite)
}

/// What the keys of one (batch, kv head) need from the queries' side of the backward:
/// `R = Σᵢ φ(qᵢ) dnᵢᵀ`, `h = Σᵢ φ(qᵢ) ddᵢ`, `U = Σᵢ σᵢ dnᵢ` (σᵢ = Σ φ(qᵢ)) and the
/// gradient of the shared stabiliser C.
struct QuerySums<T> {
    r: Vec<T>,
    h: Vec<T>,
    u: Vec<T>,
    d_log_scale: T,
}

impl<T: Element> QuerySums<T> {
    fn new(m: usize, dim_v: usize) -> Self {
        Self {
            r: vec![T::zero(); m * dim_v],
            h: vec![T::zero(); m],
            u: vec![T::zero(); dim_v],
            d_log_scale: T::zero(),
        }
    }

    fn merge(&mut self, other: Self) {
        add_assign(&mut self.r, &other.r);
        add_assign(&mut self.h, &other.h);
        add_assign(&mut self.u, &other.u);
        self.d_log_scale += other.d_log_scale;
    }
}

/// Gradients of non-causal kernelized attention for the query heads in `heads`, added
/// into `dq`, `dk` and `dv`.
///
/// With `A_ij = φ(qᵢ)·φ(kⱼ)`, `nᵢ = Σⱼ A_ij vⱼ`, `dᵢ = Σⱼ A_ij` and `oᵢ = nᵢ / g(dᵢ)`:
/// `dnᵢ = doᵢ / g(dᵢ)`, `ddᵢ = −(doᵢ·oᵢ) g'(dᵢ) / g(dᵢ)`, then `dφ(qᵢ) = S dnᵢ + z ddᵢ`,
/// `dφ(kⱼ) = R vⱼ + h` and `dvⱼ = Rᵀ φ(kⱼ)`: two passes, never an n × n matrix.
#[allow(clippy::too_many_arguments)]
pub(crate) fn full_backward<T: Element, F: FeatureMap<T>>(
    problem: &Problem,
    fmap: &F,
    normalizer: Normalizer,
    [q, k, v, d_out]: [&Tensor<T>; 4],
    [dq, dk, dv]: [&mut Tensor<T>; 3],
    heads: Range<usize>,
) {
    let (m, d, dim_v) = (fmap.features(), problem.dim_qk, problem.dim_v);
    let uniform = fmap.stabiliser();
    let kv_heads = kv_heads_of(problem, &heads);
    let (states, _) = key_states(problem, fmap, k, v, &kv_heads);

    // Queries: dq, and the sums the keys need, per (batch, kv head) split into parts.
    let parts = parts_per_head(problem.batch * kv_heads.len(), problem.len_q);
    let span = problem.len_q.div_ceil(parts);
    let tasks: Vec<(usize, usize, usize)> = (0..problem.batch)
        .flat_map(|b| {
            (0..kv_heads.len()).flat_map(move |slot| (0..parts).map(move |p| (b, slot, p)))
        })
        .collect();
    let dq_heads = dq.heads_mut();
    let partial: Vec<QuerySums<T>> = tasks
        .par_iter()
        .map(|&(b, slot, part)| {
            let g = kv_heads[slot];
            let state = &states[b * kv_heads.len() + slot];
            let mut sums = QuerySums::new(m, dim_v);
            let mut phi = vec![T::zero(); FULL_BLOCK * m];
            let mut d_phi = vec![T::zero(); FULL_BLOCK * m];
            let mut dn = vec![T::zero(); FULL_BLOCK * dim_v];
            let mut dd = [T::zero(); FULL_BLOCK];
            let mut den = vec![T::zero(); FULL_BLOCK];
            let mut dx = vec![T::zero(); FULL_BLOCK * d];
            let end = ((part + 1) * span).min(problem.len_q);
            for h in heads.clone().filter(|&h| problem.kv_head(h) == g) {
                let mut start = part * span;
                while start < end {
                    let len = FULL_BLOCK.min(end - start);
                    let rows = q.head(b, h).rows_range(start, len);
                    fmap.queries(rows, start, &mut phi);
                    let phi_mat = MatRef::contiguous(&phi[..len * m], len, m);
                    let mut outputs = MatMut::contiguous(&mut dn, len, dim_v);
                    numerators(phi_mat, state, uniform, outputs.rb(), &mut den);
                    // dn and dd from the recomputed output o = n / g(d).
                    let upstream = d_out.head(b, h).rows_range(start, len);
                    for i in 0..len {
                        let divisor = normalizer.divisor(den[i]);
                        let n_i = outputs.row_mut(i);
                        let d_o = upstream.row(i);
                        let o_dot = dot(d_o, n_i) / divisor;
                        dd[i] = -o_dot * normalizer.slope(den[i]) / divisor;
                        n_i.iter_mut().zip(d_o).for_each(|(n, &g)| *n = g / divisor);
                    }
                    let dn_mat = MatRef::contiguous(&dn[..len * dim_v], len, dim_v);
                    // dφ(qᵢ) = S dnᵢ + z ddᵢ.
                    matmul(
                        MatMut::contiguous(&mut d_phi, len, m),
                        dn_mat,
                        MatRef::contiguous(&state.kv, m, dim_v).t(),
                        false,
                        T::one(),
                    );
                    for i in 0..len {
                        let row = &mut d_phi[i * m..(i + 1) * m];
                        row.iter_mut()
                            .zip(&state.k_sum)
                            .for_each(|(x, &z)| *x += z * dd[i]);
                        if let Some(u) = uniform {
                            // C is shared by every key: ∂A_ij/∂C = −(A_ij − u σᵢ).
                            let phi_i = phi_mat.row(i);
                            sums.d_log_scale -= dot(phi_i, row);
                            let sigma = simd::sum(phi_i);
                            let d_sigma = u
                                * (dot(dn_mat.row(i), &state.v_sum)
                                    + dd[i] * T::of_f64(state.count as f64));
                            row.iter_mut().for_each(|x| *x += d_sigma);
                            sums.u
                                .iter_mut()
                                .zip(dn_mat.row(i))
                                .for_each(|(a, &g)| *a += sigma * g);
                        }
                    }
                    matmul(
                        MatMut::contiguous(&mut sums.r, m, dim_v),
                        phi_mat.t(),
                        dn_mat,
                        true,
                        T::one(),
                    );
                    matmul(
                        MatMut::contiguous(&mut sums.h, m, 1),
                        phi_mat.t(),
                        MatRef::contiguous(&dd[..len], len, 1),
                        true,
                        T::one(),
                    );
                    dx[..len * d].fill(T::zero());
                    fmap.queries_backward(rows, start, &mut d_phi[..len * m], &mut dx[..len * d]);
                    // SAFETY: rows start..start+len of q head h belong to this task alone.
                    let mut dq_rows = unsafe { dq_heads.block(b, h, start, len) };
                    for i in 0..len {
                        add_assign(dq_rows.row_mut(i), &dx[i * d..(i + 1) * d]);
                    }
                    start += len;
                }
            }
            sums
        })
        .collect();
    let mut query_sums: Vec<QuerySums<T>> = Vec::with_capacity(states.len());
    for (index, sums) in partial.into_iter().enumerate() {
        if index % parts == 0 {
            query_sums.push(sums);
        } else {
            query_sums
                .last_mut()
                .expect("first part pushed")
                .merge(sums);
        }
    }

    // Keys: dφ(kⱼ) = e^{cⱼ−C}(R vⱼ + h), dvⱼ = e^{cⱼ−C} Rᵀ k̂ⱼ + u U.
    let blocks: Vec<(usize, usize, usize)> = (0..problem.batch)
        .flat_map(|b| {
            (0..kv_heads.len()).flat_map(move |slot| {
                (0..problem.len_k)
                    .step_by(FULL_BLOCK)
                    .map(move |start| (b, slot, start))
            })
        })
        .collect();
    let (dk_heads, dv_heads) = (dk.heads_mut(), dv.heads_mut());
    blocks.par_iter().for_each(|&(b, slot, start)| {
        let g = kv_heads[slot];
        let (state, sums) = (
            &states[b * kv_heads.len() + slot],
            &query_sums[b * kv_heads.len() + slot],
        );
        let len = FULL_BLOCK.min(problem.len_k - start);
        let rows = k.head(b, g).rows_range(start, len);
        let values = v.head(b, g).rows_range(start, len);
        let mut features = vec![T::zero(); len * m];
        let mut log_scale = vec![T::zero(); len];
        fmap.keys(rows, start, &mut features, &mut log_scale);
        let weights: Vec<T> = if uniform.is_some() {
            log_scale
                .iter()
                .map(|&c| (c - state.log_scale).exp())
                .collect()
        } else {
            vec![T::one(); len]
        };
        scale_rows(&mut features, m, weights.iter().copied());
        let r = MatRef::contiguous(&sums.r, m, dim_v);
        // SAFETY: rows start..start+len of kv head g belong to this task alone.
        let mut dv_rows = unsafe { dv_heads.block(b, g, start, len) };
        matmul(
            dv_rows.rb(),
            MatRef::contiguous(&features, len, m),
            r,
            true,
            T::one(),
        );
        if let Some(u) = uniform {
            for i in 0..len {
                dv_rows
                    .row_mut(i)
                    .iter_mut()
                    .zip(&sums.u)
                    .for_each(|(x, &s)| *x += u * s);
            }
        }
        let mut d_features = vec![T::zero(); len * m];
        matmul(
            MatMut::contiguous(&mut d_features, len, m),
            values,
            r.t(),
            false,
            T::one(),
        );
        for (row, &w) in d_features.chunks_exact_mut(m).zip(&weights) {
            row.iter_mut()
                .zip(&sums.h)
                .for_each(|(x, &h)| *x = (*x + h) * w);
        }
        let mut d_log_scale = vec![T::zero(); len];
        if uniform.is_some() && (start..start + len).contains(&state.argmax) {
            d_log_scale[state.argmax - start] = sums.d_log_scale;
        }
        let mut dx = vec![T::zero(); len * d];
        fmap.keys_backward(rows, start, &mut d_features, &d_log_scale, &mut dx);
        // SAFETY: as for dv.
        let mut dk_rows = unsafe { dk_heads.block(b, g, start, len) };
        for i in 0..len {
            add_assign(dk_rows.row_mut(i), &dx[i * d..(i + 1) * d]);
        }
    });
}
