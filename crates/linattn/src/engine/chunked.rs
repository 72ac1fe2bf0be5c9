//! Causal kernelized attention by chunks of C tokens (flash-linear-attention's chunk
//! algorithm): exact masked products inside a chunk, the running [`LinearState`] across
//! chunks; and its backward, a forward sweep for dq and a reverse sweep for dk and dv.
//! Memory is O(C² + m·d_v) per task forward and O(n·d_v) backward, never O(n²).

use super::{FeatureMap, KernelPass, LinearState, Normalizer, Start, add_assign, dot, scale_rows};
use crate::backend::cpu::matmul::matmul;
use crate::base::Problem;
use crate::base::simd;
use crate::base::tensor::block_head;
use crate::base::{Element, Tensor};
use crate::base::{MatMut, MatRef};
use rayon::prelude::*;
use std::ops::Range;

/// Scratch for one chunk of one head, and what the forward leaves there for the backward.
struct Chunk<T> {
    m: usize,
    len: usize,
    /// φ(qᵢ), len × m.
    phi_q: Vec<T>,
    /// φ(qᵢ)·e^{C_state − Cᵢ}: the queries as the state sees them (stabilised maps).
    carried: Vec<T>,
    stabilised: bool,
    /// k̂ⱼ, len × m.
    phi_k: Vec<T>,
    /// cⱼ of each key (stabilised maps).
    key_scale: Vec<T>,
    /// Cᵢ: query i's stabiliser, the running max of the key log-scales up to i.
    row_scale: Vec<T>,
    /// Position of the key holding Cᵢ.
    row_argmax: Vec<usize>,
    /// A_ij = φ(qᵢ)·k̂ⱼ e^{cⱼ−Cᵢ} for j ≤ i, else 0 (len × len).
    scores: Vec<T>,
    /// σᵢ = Σ φ(qᵢ).
    phi_sum: Vec<T>,
    den: Vec<T>,
}

impl<T: Element> Chunk<T> {
    fn new(chunk: usize, m: usize) -> Self {
        Self {
            m,
            len: 0,
            phi_q: vec![T::zero(); chunk * m],
            carried: vec![T::zero(); chunk * m],
            stabilised: false,
            phi_k: vec![T::zero(); chunk * m],
            key_scale: vec![T::zero(); chunk],
            row_scale: vec![T::zero(); chunk],
            row_argmax: vec![0; chunk],
            scores: vec![T::zero(); chunk * chunk],
            phi_sum: vec![T::zero(); chunk],
            den: vec![T::zero(); chunk],
        }
    }

    /// Maps the features of rows `start..start + len` and forms the masked scores,
    /// with each query's stabiliser taken from `state` and the keys up to it.
    fn prepare<F: FeatureMap<T>>(
        &mut self,
        fmap: &F,
        state: &LinearState<T>,
        queries: MatRef<'_, T>,
        keys: MatRef<'_, T>,
        start: usize,
    ) {
        self.prepare_keys(fmap, state, keys, start);
        self.prepare_queries(fmap, state, queries, start);
    }

    /// The key half of [`Chunk::prepare`], shared by every query head of a kv head.
    fn prepare_keys<F: FeatureMap<T>>(
        &mut self,
        fmap: &F,
        state: &LinearState<T>,
        keys: MatRef<'_, T>,
        start: usize,
    ) {
        let len = keys.rows;
        self.len = len;
        fmap.keys(keys, start, &mut self.phi_k, &mut self.key_scale);
        if fmap.stabiliser().is_some() {
            let (mut running, mut argmax) = (state.log_scale, state.argmax);
            for i in 0..len {
                if self.key_scale[i] > running {
                    running = self.key_scale[i];
                    argmax = start + i;
                }
                self.row_scale[i] = running;
                self.row_argmax[i] = argmax;
            }
        }
    }

    /// The query half of [`Chunk::prepare`], after [`Chunk::prepare_keys`].
    fn prepare_queries<F: FeatureMap<T>>(
        &mut self,
        fmap: &F,
        state: &LinearState<T>,
        queries: MatRef<'_, T>,
        start: usize,
    ) {
        let (len, m) = (self.len, self.m);
        let stabilised = fmap.stabiliser().is_some();
        self.stabilised = stabilised;
        fmap.queries(queries, start, &mut self.phi_q);
        if stabilised {
            for i in 0..len {
                self.phi_sum[i] = simd::sum(&self.phi_q[i * m..(i + 1) * m]);
            }
            self.carried[..len * m].copy_from_slice(&self.phi_q[..len * m]);
            let carry = (0..len).map(|i| (state.log_scale - self.row_scale[i]).exp());
            scale_rows(&mut self.carried[..len * m], m, carry);
        }
        self.scores_from_features(stabilised);
    }

    /// A into `scores` from the current features: masked, and scaled by e^{cⱼ−Cᵢ}.
    fn scores_from_features(&mut self, stabilised: bool) {
        let (len, m) = (self.len, self.m);
        let (queries, keys) = (
            MatRef::contiguous(&self.phi_q, len, m),
            MatRef::contiguous(&self.phi_k, len, m),
        );
        for (first, end) in sub_chunks(len) {
            matmul(
                MatMut::strided(&mut self.scores[first * len..], end - first, end, len),
                queries.rows_range(first, end - first),
                keys.rows_range(0, end).t(),
                false,
                T::one(),
            );
        }
        // Zeroes what the sub-chunks skipped above the diagonal too.
        mask_and_scale(
            &mut self.scores[..len * len],
            len,
            stabilised.then_some((&self.key_scale[..len], &self.row_scale[..len])),
        );
    }

    /// Unnormalised numerators into `rows` and denominators into `den`: this chunk's
    /// keys through the scores, earlier ones through the state.
    fn numerators(
        &mut self,
        state: &LinearState<T>,
        values: MatRef<'_, T>,
        mut rows: MatMut<'_, T>,
        uniform: Option<T>,
    ) {
        let (len, m, dim_v) = (self.len, self.m, values.cols);
        for (first, end) in sub_chunks(len) {
            matmul(
                rows.rows_mut(first, end - first),
                MatRef::strided(&self.scores[first * len..], end - first, end, len, 1),
                values.rows_range(0, end),
                false,
                T::one(),
            );
        }
        // Without a stabiliser the state sees the queries as they are.
        let carried = if self.stabilised {
            MatRef::contiguous(&self.carried, len, m)
        } else {
            MatRef::contiguous(&self.phi_q, len, m)
        };
        matmul(
            rows.rb(),
            carried,
            MatRef::contiguous(&state.kv, m, dim_v),
            true,
            T::one(),
        );
        for i in 0..len {
            let own = simd::sum(&self.scores[i * len..i * len + i + 1]);
            self.den[i] = own + dot(carried.row(i), &state.k_sum);
        }
        if let Some(u) = uniform {
            // The constant feature u weighs every value so far alike.
            let mut v_prefix = state.v_sum.clone();
            for i in 0..len {
                add_assign(&mut v_prefix, values.row(i));
                let weight = u * self.phi_sum[i];
                self.den[i] += weight * T::of_f64((state.count + i + 1) as f64);
                rows.row_mut(i)
                    .iter_mut()
                    .zip(&v_prefix)
                    .for_each(|(o, &s)| *o += weight * s);
            }
        }
    }
}

/// Query rows per product inside a chunk. Products are formed only for the blocks on or
/// below the diagonal, as flash-linear-attention splits its chunks into sub-chunks: about
/// 5/8 of the intra-chunk work of a 64-token chunk.
const SUB_CHUNK: usize = 16;

/// The (first, end) rows of each sub-chunk of a chunk of `len` rows.
fn sub_chunks(len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(SUB_CHUNK)
        .map(move |first| (first, (first + SUB_CHUNK).min(len)))
}

/// Zeroes the scores above the diagonal and, for stabilised maps, scales the others by
/// e^{cⱼ−Cᵢ} (at most 1, since Cᵢ is the running max up to i).
fn mask_and_scale<T: Element>(scores: &mut [T], len: usize, scales: Option<(&[T], &[T])>) {
    for (i, row) in scores.chunks_exact_mut(len).enumerate() {
        if let Some((key_scale, row_scale)) = scales {
            for j in 0..=i {
                row[j] *= (key_scale[j] - row_scale[i]).fast_exp();
            }
        }
        row[i + 1..].fill(T::zero());
    }
}

/// The work units of the chunked forward: a batch, a range of kv heads, and the query
/// heads (of `heads`) among theirs that the unit computes. kv heads are split between
/// units so every thread has one; a single kv head with many query heads is split by
/// query heads, each part then recomputing the keys it shares.
fn head_groups(
    problem: &Problem,
    heads: &Range<usize>,
) -> Vec<(usize, Range<usize>, Range<usize>)> {
    let kv = problem.kv_head(heads.start)..problem.kv_head(heads.end - 1) + 1;
    let threads = rayon::current_num_threads();
    let wanted = threads.div_ceil(problem.batch).max(1);
    let kv_groups = wanted.min(kv.len());
    let per_group = kv.len().div_ceil(kv_groups);
    let mut units = Vec::new();
    for b in 0..problem.batch {
        for first in kv.clone().step_by(per_group) {
            let kv_range = first..(first + per_group).min(kv.end);
            let group_heads = kv_range.start * problem.heads_q / problem.heads_kv
                ..kv_range.end * problem.heads_q / problem.heads_kv;
            let q_range = group_heads.start.max(heads.start)..group_heads.end.min(heads.end);
            // One kv head per unit and still too few units: split its query heads.
            let splits = if kv_range.len() == 1 && kv_groups < wanted {
                wanted.div_ceil(kv_groups).min(q_range.len())
            } else {
                1
            };
            let per_split = q_range.len().div_ceil(splits);
            for q_first in q_range.clone().step_by(per_split) {
                units.push((
                    b,
                    kv_range.clone(),
                    q_first..(q_first + per_split).min(q_range.end),
                ));
            }
        }
    }
    units
}

/// What a unit of the chunked forward ends with.
struct UnitEnd<T> {
    b: usize,
    kv_range: Range<usize>,
    states: Vec<LinearState<T>>,
    finite: bool,
}

/// Causal kernelized attention for the query heads in `heads`, from empty states at
/// position 0 or from `start`'s. Each unit of work reads the rows of its heads chunk by
/// chunk in memory order, computes the key side of a chunk once per kv head and shares
/// it among that head's queries.
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
    start: Option<&Start<'_, T>>,
) -> KernelPass<T> {
    let (m, d, dim_v) = (fmap.features(), problem.dim_qk, problem.dim_v);
    let uniform = fmap.stabiliser();
    let out_heads = out.heads_mut();
    let units = head_groups(problem, &heads);
    let finished: Vec<UnitEnd<T>> = units
        .par_iter()
        .map(|(b, kv_range, q_range)| {
            let b = *b;
            let (mut states, offset) = match start {
                Some(start) => (
                    kv_range
                        .clone()
                        .map(|g| start.states[b * problem.heads_kv + g].clone())
                        .collect(),
                    start.positions[b],
                ),
                None => (
                    vec![LinearState::new(m, dim_v, uniform.is_some()); kv_range.len()],
                    0,
                ),
            };
            let mut scratch = Chunk::new(chunk, m);
            let mut queries = vec![T::zero(); q_range.len() * chunk * d];
            let mut keys = vec![T::zero(); kv_range.len() * chunk * d];
            let mut values = vec![T::zero(); kv_range.len() * chunk * dim_v];
            let mut finite = true;
            for start in (0..problem.len_q).step_by(chunk) {
                let len = chunk.min(problem.len_q - start);
                let rows = start..start + len;
                finite &= q.gather(b, rows.clone(), q_range.clone(), &mut queries);
                finite &= k.gather(b, rows.clone(), kv_range.clone(), &mut keys);
                finite &= v.gather(b, rows.clone(), kv_range.clone(), &mut values);
                for (slot, state) in states.iter_mut().enumerate() {
                    let g = kv_range.start + slot;
                    let block_values = block_head(&values, len, kv_range.len(), slot, dim_v);
                    let key_rows = block_head(&keys, len, kv_range.len(), slot, d);
                    let position = offset + start;
                    scratch.prepare_keys(fmap, state, key_rows, position);
                    for h in q_range.clone().filter(|&h| problem.kv_head(h) == g) {
                        let slot = h - q_range.start;
                        let query_rows = block_head(&queries, len, q_range.len(), slot, d);
                        scratch.prepare_queries(fmap, state, query_rows, position);
                        // SAFETY: these rows of q head h belong to this unit alone.
                        let mut rows = unsafe { out_heads.block(b, h, start, len) };
                        scratch.numerators(state, block_values, rows.rb(), uniform);
                        for (i, &den) in scratch.den[..len].iter().enumerate() {
                            let row = rows.row_mut(i);
                            simd::scale(row, T::one() / normalizer.divisor(den));
                            finite &= simd::all_finite(row);
                        }
                    }
                    state.absorb(
                        position,
                        &mut scratch.phi_k,
                        &scratch.key_scale,
                        block_values,
                    );
                }
            }
            UnitEnd {
                b,
                kv_range: kv_range.clone(),
                states,
                finite,
            }
        })
        .collect();
    let mut pass = KernelPass {
        states: vec![None; problem.batch * problem.heads_kv],
        finite: Some(true),
    };
    for unit in finished {
        for (g, state) in unit.kv_range.zip(unit.states) {
            pass.states[unit.b * problem.heads_kv + g] = Some(state);
        }
        pass.finite = pass.finite.map(|all| all && unit.finite);
    }
    pass
}

/// Per-row quantities of one head that the reverse sweep of the backward reads.
struct RowGradients<T> {
    /// dnᵢ = doᵢ / g(dᵢ), n × d_v.
    dn: Vec<T>,
    /// ddᵢ = −(doᵢ·oᵢ) g'(dᵢ) / g(dᵢ).
    dd: Vec<T>,
    /// Cᵢ of each query.
    row_scale: Vec<T>,
    /// Gradient of each key's log-scale, from the queries whose stabiliser it is.
    d_key_scale: Vec<T>,
}

/// Gradients of causal kernelized attention for the query heads in `heads`, added into
/// `dq`, `dk` and `dv`. One task per (batch, kv head) so that the heads of a GQA group
/// add their key gradients without contention.
#[allow(clippy::too_many_arguments)]
pub(crate) fn causal_chunked_backward<T: Element, F: FeatureMap<T>>(
    problem: &Problem,
    fmap: &F,
    normalizer: Normalizer,
    chunk: usize,
    [q, k, v, d_out]: [&Tensor<T>; 4],
    [dq, dk, dv]: [&mut Tensor<T>; 3],
    heads: Range<usize>,
) {
    let (m, d, dim_v, n) = (
        fmap.features(),
        problem.dim_qk,
        problem.dim_v,
        problem.len_q,
    );
    let uniform = fmap.stabiliser();
    let stabilised = uniform.is_some();
    let mut groups: Vec<usize> = heads.clone().map(|h| problem.kv_head(h)).collect();
    groups.dedup();
    let tasks: Vec<(usize, usize)> = (0..problem.batch)
        .flat_map(|b| groups.iter().map(move |&g| (b, g)))
        .collect();
    let (dq_heads, dk_heads, dv_heads) = (dq.heads_mut(), dk.heads_mut(), dv.heads_mut());
    tasks.par_iter().for_each(|&(b, g)| {
        let (keys, values) = (k.head(b, g), v.head(b, g));
        let mut scratch = Chunk::new(chunk, m);
        let mut rows = RowGradients {
            dn: vec![T::zero(); n * dim_v],
            dd: vec![T::zero(); n],
            row_scale: vec![T::zero(); n],
            d_key_scale: vec![T::zero(); n],
        };
        let mut d_scores = vec![T::zero(); chunk * chunk];
        let mut d_phi = vec![T::zero(); chunk * m];
        let mut dx = vec![T::zero(); chunk * d];
        let mut d_values = vec![T::zero(); chunk * dim_v];
        for h in heads.clone().filter(|&h| problem.kv_head(h) == g) {
            let (queries, upstream) = (q.head(b, h), d_out.head(b, h));
            rows.d_key_scale.fill(T::zero());

            // Forward sweep: recompute each chunk's output, then dq.
            let mut state = LinearState::new(m, dim_v, stabilised);
            let mut start = 0;
            while start < n {
                let len = chunk.min(n - start);
                let block_values = values.rows_range(start, len);
                let query_rows = queries.rows_range(start, len);
                scratch.prepare(fmap, &state, query_rows, keys.rows_range(start, len), start);
                let dn = &mut rows.dn[start * dim_v..(start + len) * dim_v];
                scratch.numerators(
                    &state,
                    block_values,
                    MatMut::contiguous(dn, len, dim_v),
                    uniform,
                );
                for i in 0..len {
                    let den = scratch.den[i];
                    let divisor = normalizer.divisor(den);
                    let n_i = &mut dn[i * dim_v..(i + 1) * dim_v];
                    let d_o = upstream.row(start + i);
                    rows.dd[start + i] =
                        -(dot(d_o, n_i) / divisor) * normalizer.slope(den) / divisor;
                    n_i.iter_mut().zip(d_o).for_each(|(x, &g)| *x = g / divisor);
                    rows.row_scale[start + i] = scratch.row_scale[i];
                }
                let dn =
                    MatRef::contiguous(&rows.dn[start * dim_v..(start + len) * dim_v], len, dim_v);
                let dd = &rows.dd[start..start + len];
                score_gradients(&mut d_scores, dn, block_values, dd, &scratch, stabilised);
                // dφ(qᵢ) = Σⱼ dA_ij k̂ⱼ e^{cⱼ−Cᵢ} + e^{C_state−Cᵢ}(S dnᵢ + z ddᵢ).
                matmul(
                    MatMut::contiguous(&mut d_phi, len, m),
                    dn,
                    MatRef::contiguous(&state.kv, m, dim_v).t(),
                    false,
                    T::one(),
                );
                for i in 0..len {
                    let carry = if stabilised {
                        (state.log_scale - scratch.row_scale[i]).exp()
                    } else {
                        T::one()
                    };
                    let row = &mut d_phi[i * m..(i + 1) * m];
                    row.iter_mut()
                        .zip(&state.k_sum)
                        .for_each(|(x, &z)| *x = (*x + z * dd[i]) * carry);
                }
                matmul(
                    MatMut::contiguous(&mut d_phi, len, m),
                    MatRef::contiguous(&d_scores, len, len),
                    MatRef::contiguous(&scratch.phi_k, len, m),
                    true,
                    T::one(),
                );
                if let Some(u) = uniform {
                    let mut v_prefix = state.v_sum.clone();
                    for i in 0..len {
                        add_assign(&mut v_prefix, block_values.row(i));
                        let row = &mut d_phi[i * m..(i + 1) * m];
                        // ∂A_ij/∂Cᵢ = −(A_ij − u σᵢ): the key holding Cᵢ takes it.
                        let phi_i = &scratch.phi_q[i * m..(i + 1) * m];
                        rows.d_key_scale[scratch.row_argmax[i]] -= dot(phi_i, row);
                        let d_sigma = u
                            * (dot(dn.row(i), &v_prefix)
                                + dd[i] * T::of_f64((state.count + i + 1) as f64));
                        row.iter_mut().for_each(|x| *x += d_sigma);
                    }
                }
                dx[..len * d].fill(T::zero());
                fmap.queries_backward(query_rows, start, &mut d_phi[..len * m], &mut dx[..len * d]);
                // SAFETY: q head h belongs to this task.
                let mut dq_rows = unsafe { dq_heads.block(b, h, start, len) };
                for i in 0..len {
                    add_assign(dq_rows.row_mut(i), &dx[i * d..(i + 1) * d]);
                }
                state.absorb(start, &mut scratch.phi_k, &scratch.key_scale, block_values);
                start += len;
            }

            // Reverse sweep: dk and dv from this chunk's queries and the later ones,
            // R = Σᵢ φ(qᵢ) e^{C_ref−Cᵢ} dnᵢᵀ with C_ref the stabiliser of the chunk
            // after (so that every factor stays at most 1).
            let mut r = vec![T::zero(); m * dim_v];
            let mut h_sum = vec![T::zero(); m];
            let mut u_sum = vec![T::zero(); dim_v];
            let mut reference = T::zero();
            let mut end = n;
            while end > 0 {
                let start = (end - 1) / chunk * chunk;
                let len = end - start;
                let block_values = values.rows_range(start, len);
                let key_rows = keys.rows_range(start, len);
                let query_rows = queries.rows_range(start, len);
                scratch.len = len;
                fmap.queries(query_rows, start, &mut scratch.phi_q);
                fmap.keys(key_rows, start, &mut scratch.phi_k, &mut scratch.key_scale);
                scratch.row_scale[..len].copy_from_slice(&rows.row_scale[start..end]);
                scratch.scores_from_features(stabilised);
                for i in 0..len {
                    scratch.phi_sum[i] = simd::sum(&scratch.phi_q[i * m..(i + 1) * m]);
                }
                let dn = MatRef::contiguous(&rows.dn[start * dim_v..end * dim_v], len, dim_v);
                let dd = &rows.dd[start..end];
                score_gradients(&mut d_scores, dn, block_values, dd, &scratch, stabilised);

                // Later chunks, through the reverse state.
                let weights: Vec<T> = (0..len)
                    .map(|j| {
                        if stabilised && end < n {
                            (scratch.key_scale[j] - reference).exp()
                        } else {
                            T::one()
                        }
                    })
                    .collect();
                let weighted_keys = &mut scratch.carried[..len * m];
                weighted_keys.copy_from_slice(&scratch.phi_k[..len * m]);
                scale_rows(weighted_keys, m, weights.iter().copied());
                let r_mat = MatRef::contiguous(&r, m, dim_v);
                matmul(
                    MatMut::contiguous(&mut d_values, len, dim_v),
                    MatRef::contiguous(weighted_keys, len, m),
                    r_mat,
                    false,
                    T::one(),
                );
                matmul(
                    MatMut::contiguous(&mut d_phi, len, m),
                    block_values,
                    r_mat.t(),
                    false,
                    T::one(),
                );
                for (j, &w) in weights.iter().enumerate() {
                    d_phi[j * m..(j + 1) * m]
                        .iter_mut()
                        .zip(&h_sum)
                        .for_each(|(x, &h)| *x = (*x + h) * w);
                }
                // This chunk's own queries.
                matmul(
                    MatMut::contiguous(&mut d_values, len, dim_v),
                    MatRef::contiguous(&scratch.scores, len, len).t(),
                    dn,
                    true,
                    T::one(),
                );
                matmul(
                    MatMut::contiguous(&mut d_phi, len, m),
                    MatRef::contiguous(&d_scores, len, len).t(),
                    MatRef::contiguous(&scratch.phi_q, len, m),
                    true,
                    T::one(),
                );
                if let Some(u) = uniform {
                    // dvⱼ gains u Σ_{i ≥ j} σᵢ dnᵢ.
                    let mut suffix = u_sum.clone();
                    for j in (0..len).rev() {
                        suffix
                            .iter_mut()
                            .zip(dn.row(j))
                            .for_each(|(s, &g)| *s += scratch.phi_sum[j] * g);
                        d_values[j * dim_v..(j + 1) * dim_v]
                            .iter_mut()
                            .zip(&suffix)
                            .for_each(|(x, &s)| *x += u * s);
                    }
                    u_sum = suffix;
                }
                dx[..len * d].fill(T::zero());
                fmap.keys_backward(
                    key_rows,
                    start,
                    &mut d_phi[..len * m],
                    &rows.d_key_scale[start..end],
                    &mut dx[..len * d],
                );
                // SAFETY: kv head g belongs to this task.
                let (mut dk_rows, mut dv_rows) = unsafe {
                    (
                        dk_heads.block(b, g, start, len),
                        dv_heads.block(b, g, start, len),
                    )
                };
                for i in 0..len {
                    add_assign(dk_rows.row_mut(i), &dx[i * d..(i + 1) * d]);
                    add_assign(dv_rows.row_mut(i), &d_values[i * dim_v..(i + 1) * dim_v]);
                }

                // Absorb this chunk's queries, referred to the stabiliser of its first row.
                let new_reference = if stabilised {
                    scratch.row_scale[0]
                } else {
                    T::zero()
                };
                if stabilised && end < n {
                    let factor = (new_reference - reference).exp();
                    r.iter_mut().for_each(|x| *x *= factor);
                    h_sum.iter_mut().for_each(|x| *x *= factor);
                }
                reference = new_reference;
                let weighted_queries = &mut scratch.carried[..len * m];
                weighted_queries.copy_from_slice(&scratch.phi_q[..len * m]);
                if stabilised {
                    let factors = (0..len).map(|i| (reference - scratch.row_scale[i]).exp());
                    scale_rows(weighted_queries, m, factors);
                }
                let weighted_queries = MatRef::contiguous(weighted_queries, len, m);
                matmul(
                    MatMut::contiguous(&mut r, m, dim_v),
                    weighted_queries.t(),
                    dn,
                    true,
                    T::one(),
                );
                matmul(
                    MatMut::contiguous(&mut h_sum, m, 1),
                    weighted_queries.t(),
                    MatRef::contiguous(dd, len, 1),
                    true,
                    T::one(),
                );
                end = start;
            }
        }
    });
}

/// dA_ij = dnᵢ·vⱼ + ddᵢ for j ≤ i, scaled like the scores.
fn score_gradients<T: Element>(
    d_scores: &mut [T],
    dn: MatRef<'_, T>,
    values: MatRef<'_, T>,
    dd: &[T],
    chunk: &Chunk<T>,
    stabilised: bool,
) {
    let len = dn.rows;
    matmul(
        MatMut::contiguous(d_scores, len, len),
        dn,
        values.t(),
        false,
        T::one(),
    );
    for (row, &dd) in d_scores.chunks_exact_mut(len).zip(dd) {
        row.iter_mut().for_each(|x| *x += dd);
    }
    mask_and_scale(
        &mut d_scores[..len * len],
        len,
        stabilised.then_some((&chunk.key_scale[..len], &chunk.row_scale[..len])),
    );
}
