//! The one engine behind every kernelized method (linear, performer, cosformer and the
//! global heads of hybrid): `O = φ(Q) (φ(K)ᵀ V)`, normalised row by row by
//! `φ(qᵢ) · Σⱼ φ(kⱼ)`. A method is a point on two axes, its [`FeatureMap`] and its
//! [`StateUpdate`], with a [`Normalizer`]; each runs in the parallel, chunked and
//! recurrent forms.
//!
//! Stabilised maps (FAVOR+) produce key features `φ(kⱼ) = k̂ⱼ·e^{cⱼ−C} + u` where `cⱼ` is
//! the key's own log-scale, `C` the largest log-scale seen so far and `u` a constant. The
//! running state keeps `C` and rescales when it grows, as online softmax does, so a
//! single pass (and the causal form, which may not look ahead) never overflows.

use crate::backend::cpu::matmul::{matmul, packing_bytes};
use crate::base::CausalForm;
use crate::base::Problem;
use crate::base::per_thread;
use crate::base::simd;
use crate::base::task_list_bytes;
use crate::base::{Element, Tensor};
use crate::base::{MatMut, MatRef};
use crate::engine::feature_map::KernelMap;
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

    /// d divisor / d den.
    #[inline]
    fn slope<T: Element>(self, den: T) -> T {
        match self {
            Normalizer::ClampMin(eps) if den < T::of_f64(eps) => T::zero(),
            _ => T::one(),
        }
    }
}

/// How the running state absorbs each token: the engine's axis beside the feature map.
/// The kernelized methods sum (`S_t = S_{t−1} + φ(k_t) v_tᵀ`) and normalise; decay, gates
/// and the delta rule, with the per-token inputs they read, are [`gated`]'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StateUpdate {
    /// `S_t = S_{t−1} + φ(k_t) v_tᵀ`: nothing forgotten, nothing overwritten.
    Sum,
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

    /// Adds to `dx` (rows × d, row-major) the gradient through φ of query rows, given
    /// `d_phi` (rows × m; may be overwritten).
    fn queries_backward(&self, rows: MatRef<'_, T>, first: usize, d_phi: &mut [T], dx: &mut [T]);

    /// Adds to `dx` the gradient through the key features `k̂ⱼ` given `d_features`
    /// (rows × m; may be overwritten) and, for stabilised maps, the gradient of each
    /// row's log-scale `cⱼ` in `d_log_scale`.
    fn keys_backward(
        &self,
        rows: MatRef<'_, T>,
        first: usize,
        d_features: &mut [T],
        d_log_scale: &[T],
        dx: &mut [T],
    );
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
    /// Position of the key whose log-scale is C (gradients of C flow to it).
    pub argmax: usize,
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
            argmax: 0,
            dim_v,
        }
    }

    pub fn features(&self) -> usize {
        self.k_sum.len()
    }

    pub fn stabilised(&self) -> bool {
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

    /// Adds a block of keys at positions `first..`: `features` (L × m, overwritten with
    /// the rescaled features) with their `log_scale`s, and the matching `values`.
    fn absorb(&mut self, first: usize, features: &mut [T], log_scale: &[T], values: MatRef<'_, T>) {
        let (len, m) = (values.rows, self.features());
        if self.stabilised() {
            let mut top = self.log_scale;
            for (i, &c) in log_scale[..len].iter().enumerate() {
                if c > top {
                    top = c;
                    self.argmax = first + i;
                }
            }
            self.rescale_to(top);
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
        if other.log_scale > self.log_scale {
            self.argmax = other.argmax;
        }
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

/// One state per (batch, head) from the states of each batch's `parts` consecutive
/// pieces of the sequence (`partial` batch-major, a state per head in each), and whether
/// every piece was finite.
fn merge_parts<T: Element>(
    partial: Vec<(Vec<LinearState<T>>, bool)>,
    parts: usize,
) -> (Vec<LinearState<T>>, bool) {
    let finite = partial.iter().all(|(_, finite)| *finite);
    let mut states: Vec<LinearState<T>> = Vec::new();
    for (index, (part_states, _)) in partial.into_iter().enumerate() {
        if index % parts == 0 {
            states.extend(part_states);
        } else {
            let batch_states = states.len() - part_states.len();
            for (state, other) in states[batch_states..].iter_mut().zip(part_states) {
                state.merge(other);
            }
        }
    }
    (states, finite)
}

#[inline]
fn add_assign<T: Element>(acc: &mut [T], x: &[T]) {
    acc.iter_mut().zip(x).for_each(|(a, &b)| *a += b);
}

#[inline]
fn dot<T: Element>(a: &[T], b: &[T]) -> T {
    simd::dot(a, b)
}

/// `rows[i] *= factor[i]` for each row of an L × m matrix.
#[inline]
fn scale_rows<T: Element>(rows: &mut [T], m: usize, factors: impl Iterator<Item = T>) {
    for (row, factor) in rows.chunks_exact_mut(m).zip(factors) {
        simd::scale(row, factor);
    }
}

/// Numerators `φ(qᵢ)ᵀ S` of a block into `rows` and denominators into `den`, with the
/// constant feature of stabilised maps.
pub(crate) fn numerators<T: Element>(
    phi: MatRef<'_, T>,
    state: &LinearState<T>,
    uniform: Option<T>,
    mut rows: MatMut<'_, T>,
    den: &mut [T],
) {
    let (m, dim_v) = (phi.cols, rows.cols);
    matmul(
        rows.rb(),
        phi,
        MatRef::contiguous(&state.kv, m, dim_v),
        false,
        T::one(),
    );
    for (i, den) in den.iter_mut().enumerate().take(phi.rows) {
        let phi_i = phi.row(i);
        *den = dot(phi_i, &state.k_sum);
        if let Some(u) = uniform {
            let weight = u * simd::sum(phi_i);
            *den += weight * T::of_f64(state.count as f64);
            rows.row_mut(i)
                .iter_mut()
                .zip(&state.v_sum)
                .for_each(|(o, &s)| *o += weight * s);
        }
    }
}

/// Rows per block when mapping features in the non-causal form: 256 ran about 5% faster
/// than 128 or 512 at 65536 tokens on the 2-core machine (larger products, blocks of all
/// heads still within L2).
const FULL_BLOCK: usize = 256;

mod chunked;
#[cfg(target_arch = "x86_64")]
mod elu_avx512;
pub(crate) mod feature_map;
mod full;
pub(crate) mod gated;
mod parallel;

/// The final state of each kv head a chunked pass read, at `b · heads_kv + g`.
pub(crate) type FinalStates<T> = Vec<Option<LinearState<T>>>;

/// Where a causal pass continues sequences from: each sequence's position (the tokens
/// before this pass) and its kv heads' states, at `b · heads_kv + g`.
pub(crate) struct Start<'a, T> {
    pub positions: &'a [usize],
    pub states: &'a [LinearState<T>],
}

/// What a forward pass of the kernel leaves besides its output.
pub(crate) struct KernelPass<T> {
    /// The final states, for the decoder.
    pub states: FinalStates<T>,
    /// Whether every input read and output written was finite, for the forms that check
    /// while the data is in cache (`None`: not checked).
    pub finite: Option<bool>,
}

impl<T> KernelPass<T> {
    /// A pass that kept no state and checked nothing.
    pub fn unchecked() -> Self {
        Self {
            states: Vec::new(),
            finite: None,
        }
    }
}

/// A kernelized method reduced to what the engine needs: its feature map, how its state
/// absorbs tokens, how it normalises, and the chunk length of its causal form.
#[derive(Clone, Debug)]
pub(crate) struct Kernel<T> {
    pub map: KernelMap<T>,
    pub update: StateUpdate,
    pub normalizer: Normalizer,
    pub chunk: usize,
}

impl<T: Element> Kernel<T> {
    /// The non-causal form: the fused AVX-512 kernels where they apply, else the general
    /// blocked form. Returns whether every input and output was finite.
    fn full(
        &self,
        problem: &Problem,
        [q, k, v]: [&Tensor<T>; 3],
        out: &mut Tensor<T>,
        heads: Range<usize>,
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if matches!(self.map, KernelMap::EluPlusOne(_)) && elu_avx512::applies(problem, &heads) {
            use std::any::Any;
            fn as_f32<T: Element>(x: &Tensor<T>) -> Option<&Tensor<f32>> {
                (x as &dyn Any).downcast_ref()
            }
            if let (Some(q), Some(k), Some(v)) = (as_f32(q), as_f32(k), as_f32(v))
                && let Some(out) = (out as &mut dyn Any).downcast_mut::<Tensor<f32>>()
            {
                return elu_avx512::forward(problem, self.normalizer, [q, k, v], out);
            }
        }
        full::full(problem, &self.map, self.normalizer, q, k, v, out, heads)
    }

    /// Attention for the query heads in `heads`: chunked (or parallel) when causal,
    /// through one state per head otherwise.
    pub fn forward(
        &self,
        problem: &Problem,
        [q, k, v]: [&Tensor<T>; 3],
        out: &mut Tensor<T>,
        heads: Range<usize>,
    ) -> KernelPass<T> {
        let (map, normalizer) = (&self.map, self.normalizer);
        match self.update {
            StateUpdate::Sum if problem.causal && problem.causal_form == CausalForm::Parallel => {
                parallel::causal_parallel(problem, map, normalizer, q, k, v, out, heads);
                KernelPass::unchecked()
            }
            StateUpdate::Sum if problem.causal => chunked::causal_chunked(
                problem, map, normalizer, self.chunk, q, k, v, out, heads, None,
            ),
            StateUpdate::Sum => {
                let finite = self.full(problem, [q, k, v], out, heads);
                KernelPass {
                    states: Vec::new(),
                    finite: Some(finite),
                }
            }
        }
    }

    /// The causal chunked form for the query heads in `heads`, continuing sequences from
    /// `start` (the decoder's states) instead of from empty ones.
    pub fn forward_from(
        &self,
        problem: &Problem,
        [q, k, v]: [&Tensor<T>; 3],
        out: &mut Tensor<T>,
        heads: Range<usize>,
        start: &Start<'_, T>,
    ) -> KernelPass<T> {
        debug_assert!(problem.causal);
        let (map, normalizer) = (&self.map, self.normalizer);
        chunked::causal_chunked(
            problem,
            map,
            normalizer,
            self.chunk,
            q,
            k,
            v,
            out,
            heads,
            Some(start),
        )
    }

    /// The recurrent form, first half: absorbs the key and value at `position`.
    pub fn step(&self, state: &mut LinearState<T>, position: usize, key: &[T], value: &[T]) {
        let mut features = vec![T::zero(); self.map.features()];
        let mut log_scale = [T::zero()];
        let (key, value) = (
            MatRef::contiguous(key, 1, key.len()),
            MatRef::contiguous(value, 1, value.len()),
        );
        self.map.keys(key, position, &mut features, &mut log_scale);
        state.absorb(position, &mut features, &log_scale, value);
    }

    /// The recurrent form, second half: the output of the query at `position`, whose
    /// key the state has absorbed.
    pub fn read(&self, state: &LinearState<T>, position: usize, query: &[T], out: &mut [T]) {
        let mut features = vec![T::zero(); self.map.features()];
        self.map.queries(
            MatRef::contiguous(query, 1, query.len()),
            position,
            &mut features,
        );
        let mut den = [T::zero()];
        let dim_v = out.len();
        numerators(
            MatRef::contiguous(&features, 1, features.len()),
            state,
            self.map.stabiliser(),
            MatMut::contiguous(out, 1, dim_v),
            &mut den,
        );
        let inv = T::one() / self.normalizer.divisor(den[0]);
        out.iter_mut().for_each(|o| *o *= inv);
    }

    /// Gradients of [`Kernel::forward`], added into `grads` (dq, dk, dv).
    pub fn backward(
        &self,
        problem: &Problem,
        inputs: [&Tensor<T>; 4],
        grads: [&mut Tensor<T>; 3],
        heads: Range<usize>,
    ) {
        if problem.causal {
            chunked::causal_chunked_backward(
                problem,
                &self.map,
                self.normalizer,
                self.chunk,
                inputs,
                grads,
                heads,
            );
        } else {
            full::full_backward(problem, &self.map, self.normalizer, inputs, grads, heads);
        }
    }
}

/// Upper bound of the scratch [`backward`] allocates, in bytes.
pub(crate) fn backward_workspace_bytes(
    problem: &Problem,
    features: usize,
    projection_dim: usize,
    chunk: usize,
    element: usize,
) -> u128 {
    let (m, d, dim_v) = (features, problem.dim_qk, problem.dim_v);
    let state = m * dim_v + m + dim_v;
    let projection = packing_bytes(element, &[(chunk.max(FULL_BLOCK), m, projection_dim)])
        + (chunk.max(FULL_BLOCK) * m * element) as u128;
    if problem.causal {
        let (c, n) = (chunk, problem.len_q);
        let rows = n * (dim_v + 3);
        let buffers = 6 * c * m + 3 * c * c + 4 * c + c * d + c * dim_v + 2 * state + 2 * dim_v;
        let packing = packing_bytes(
            element,
            &[
                (c, c, m.max(dim_v)),
                (c, m, c),
                (c, dim_v, m),
                (m, dim_v, c),
                (c, m, dim_v),
                (c, d, m),
            ],
        );
        let tasks = problem.batch * problem.heads_kv;
        per_thread(
            tasks,
            ((rows + buffers) * element) as u128 + packing + projection,
        ) + task_list_bytes(tasks)
    } else {
        let threads = rayon::current_num_threads();
        let sums = problem.batch * problem.heads_kv * (threads + 1) * 2 * state;
        let block = FULL_BLOCK * (3 * m + 2 * dim_v + d + 3);
        let packing = packing_bytes(
            element,
            &[
                (m, dim_v, FULL_BLOCK),
                (FULL_BLOCK, m, dim_v),
                (FULL_BLOCK, dim_v, m),
                (FULL_BLOCK, d, m),
            ],
        );
        let tasks =
            problem.batch * (problem.heads_kv * (2 * threads + problem.len_k.div_ceil(FULL_BLOCK)));
        ((sums + threads * block) * element) as u128
            + threads as u128 * (packing + projection)
            + task_list_bytes(tasks)
    }
}
/// (FAVOR+; 0 for maps without one).
/// Products of kernelized attention with m features: each key adds a rank-one m × d_v
/// update and each query reads m × d_v (the recurrent form's count, the least any form
/// can do); a map with a projection (FAVOR+) multiplies queries and keys by m × d too.
pub(crate) fn flops(problem: &Problem, features: usize, projection_dim: usize) -> f64 {
    let tokens = (problem.batch * problem.heads_q * problem.len_q) as f64;
    let m = features as f64;
    4.0 * tokens * m * (problem.dim_v + projection_dim) as f64
}

pub(crate) fn workspace_bytes(
    problem: &Problem,
    features: usize,
    projection_dim: usize,
    chunk: usize,
    element: usize,
) -> u128 {
    let (m, dim_v) = (features, problem.dim_v);
    let state = m * dim_v + m + dim_v;
    if problem.causal && problem.causal_form == CausalForm::Parallel {
        let tile = parallel::PARALLEL_TILE;
        let pairs = problem.batch * problem.heads_kv;
        let keys = pairs * problem.len_k * (m + 2) * element;
        let projection = packing_bytes(element, &[(tile, m, projection_dim)]);
        let buffers = (tile * m + tile * tile + 2 * tile) * element;
        let packing = packing_bytes(element, &[(tile, tile, m), (tile, dim_v, tile)]);
        let tasks = problem.batch * problem.heads_q * problem.len_q.div_ceil(tile);
        keys as u128
            + per_thread(pairs, projection)
            + per_thread(tasks, buffers as u128 + packing)
            + task_list_bytes(tasks + pairs)
    } else if problem.causal {
        let (c, d) = (chunk, problem.dim_qk);
        // A unit's chunk of its heads' rows (bounded by all heads), the chunk scratch, and
        // its kv heads' states; the final states of all kv heads wait to be returned.
        let rows = c * (problem.heads_q * (d + dim_v) + problem.heads_kv * (d + dim_v));
        let scratch = 3 * c * m + c * c + 4 * c + 2 * dim_v;
        let buffers = (rows + scratch + problem.heads_kv * state) * element;
        let returned = problem.batch * problem.heads_kv * (state * element + 64);
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
        per_thread(tasks, buffers as u128 + packing) + task_list_bytes(tasks) + returned as u128
    } else {
        let threads = rayon::current_num_threads();
        // Up to `threads` partial states per (batch, kv head), plus the merged ones.
        let states = problem.batch * problem.heads_kv * (threads + 1) * state;
        // Per thread, the larger of a key task's blocks and a query task's.
        let (d, heads) = (problem.dim_qk, problem.heads_q.max(problem.heads_kv));
        let block = FULL_BLOCK * (heads * (d + dim_v) + m + 1);
        let packing = packing_bytes(
            element,
            &[
                (m, dim_v, FULL_BLOCK),
                (FULL_BLOCK, m, projection_dim),
                (FULL_BLOCK, dim_v, m),
            ],
        );
        let tasks = problem.batch * (problem.len_q.div_ceil(FULL_BLOCK) + threads);
        ((states + threads * block) * element) as u128
            + threads as u128 * packing
            + task_list_bytes(tasks)
    }
}
