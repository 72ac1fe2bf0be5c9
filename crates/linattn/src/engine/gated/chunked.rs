//! The chunked form: within a chunk of C tokens the outputs and what the state absorbs are
//! products of C-row matrices; the state passes from chunk to chunk. With C the whole
//! sequence it is the parallel form.
//!
//! With `G_t` the log decays summed from the chunk's start through token t (per channel
//! for a channel gate) and `S` the state before the chunk:
//!
//! - the values absorbed: `X = V` for the decayed sum; for the delta rule, `(I + A) X =
//!   Diag(β) (V − (K ⊙ e^G) S)` with `A_ij = β_i Σ_c k_ic k_jc e^{G_ic − G_jc}` for j < i
//!   (the UT transform of the WY representation), solved by forward substitution;
//! - the outputs: `O = s ((Q ⊙ e^G) S + M X)`, `M_ij = Σ_c q_ic k_jc e^{G_ic − G_jc}` for
//!   j ≤ i;
//! - the state after: `e^{G_last} ⊙ S + (K ⊙ e^{G_last − G})ᵀ X`.
//!
//! Every exponent above is ≤ 0, so no factor overflows however strong the decay (a
//! factor that underflows to 0 is the right limit). Per-channel decays need the same of
//! `M` and `A` computed as products: a row block's exponents are taken relative to the
//! decay just before it, which leaves both factors ≤ 1 for every earlier column. Within
//! the diagonal block of [`SUB`] rows the keys' factors exceed 1 by at most the block's
//! own decay: where that stays below [`FACTORED_SPAN`] the block is part of the product,
//! otherwise it is summed pair by pair.

use super::{Decay, GatedShape, Gates, Span, l2_normalise_rows};
use crate::backend::cpu::matmul::matmul;
use crate::base::simd;
use crate::base::{Element, MatMut, MatRef, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// Rows of a chunk's blocks: the diagonal blocks of per-channel decays (summed pair by
/// pair only where their decay exceeds [`FACTORED_SPAN`]) and of the delta rule's
/// triangular solve. 32, half a chunk: against flash-linear-attention's 16, half the
/// rescaled copies of earlier keys, measured 4% faster for GLA and KDA here (journal).
const SUB: usize = 32;

/// Bytes of one chunk's rows (q, k, v and channel gates) a group of value heads gathers
/// at once: a sweep of memory in order, which the prefetchers follow, where each head
/// alone would stride a whole token between rows; small enough to stay in L2.
const GROUP_BYTES: usize = 256 << 10;

/// Runs q, k, v through `states` (`[batch, heads_v, dim_k, dim_v]`: the initial states,
/// left as the final ones) in chunks of `chunk` tokens and writes `o_t = scale · S_tᵀ q_t`
/// to `out` (`[batch, len, heads_v, dim_v]`). Each task takes a sequence's group of
/// value heads through the chunks together. Returns whether every value of q, k, v and
/// a channel gate was finite (the gate's ≤ 0) and so is every output and final state,
/// checked while each piece is in cache.
pub(crate) fn chunked<T: Element>(
    shape: &GatedShape,
    [q, k, v]: [&Tensor<T>; 3],
    gates: &Gates<'_, T>,
    scale: T,
    chunk: usize,
    states: &mut [T],
    out: &mut Tensor<T>,
) -> bool {
    let out_heads = out.heads_mut();
    let state_len = shape.state_len();
    let sequences = gates.units(shape) / shape.heads_v;
    let per_group = heads_per_group(shape, gates, chunk, sequences);
    states
        .par_chunks_mut(shape.heads_v * state_len)
        .enumerate()
        .flat_map(|(sequence, states)| {
            let groups = states.par_chunks_mut(per_group * state_len).enumerate();
            groups.map(move |(group, states)| (sequence, group * per_group, states))
        })
        .map(|(sequence, first_hv, states)| {
            let heads_v = first_hv..first_hv + states.len() / state_len;
            let Span { b, first, len, .. } = gates.span(shape, sequence * shape.heads_v);
            let rows = chunk.min(len);
            let mut group = GroupRows::new(shape, gates, heads_v.clone(), rows);
            let mut scratch = Scratch::new(shape, gates, rows);
            let end = first + len;
            let mut clean = true;
            for start in (first..end).step_by(chunk) {
                let len = chunk.min(end - start);
                clean &= group.gather(shape, [q, k, v], gates, b, start..start + len);
                for (hv, state) in heads_v.clone().zip(states.chunks_mut(state_len)) {
                    // SAFETY: the rows of value head hv in sequence b belong to this task.
                    let rows = unsafe { out_heads.block(b, hv, start, len) };
                    clean &=
                        scratch.chunk(shape, &group, gates, b, hv, start, len, state, scale, rows);
                }
            }
            clean && simd::all_finite(states)
        })
        // Not `all`: it would stop the other tasks at the first unclean one.
        .reduce(|| true, |a, b| a && b)
}

/// Value heads a task takes together: enough tasks for every thread, each gathering at
/// most about [`GROUP_BYTES`] a chunk.
fn heads_per_group<T: Element>(
    shape: &GatedShape,
    gates: &Gates<'_, T>,
    chunk: usize,
    sequences: usize,
) -> usize {
    let wanted = rayon::current_num_threads()
        .div_ceil(sequences.max(1))
        .max(1);
    let by_threads = shape.heads_v.div_ceil(wanted.min(shape.heads_v));
    let channel = matches!(gates.decay, Decay::Channel(_));
    let per_head = head_rows_bytes(shape, chunk, channel, size_of::<T>());
    by_threads.min((GROUP_BYTES / per_head.max(1)).max(1))
}

/// Bytes of one value head's rows in a chunk of `rows`: its share of the q and k heads,
/// its values and, with a channel gate, its log decays.
fn head_rows_bytes(shape: &GatedShape, rows: usize, channel: bool, element: usize) -> usize {
    let grouped = shape.heads_v / shape.heads;
    let channels = if channel { shape.dim_k } else { 0 };
    rows * (2 * shape.dim_k / grouped + shape.dim_v + channels) * element
}

/// At most what one task's [`GroupRows`] hold for chunks of `rows`: a group stays within
/// [`GROUP_BYTES`] unless one head alone exceeds it; its q and k heads rounded up, one
/// more of each.
pub(crate) fn group_bytes(shape: &GatedShape, rows: usize, channel: bool, element: usize) -> usize {
    let one_head = head_rows_bytes(shape, rows, channel, element);
    GROUP_BYTES.max(one_head) + 2 * rows * shape.dim_k * element
}

/// One chunk's rows of a group of value heads and the q and k heads they read, gathered
/// row by row (`[row][head][dim]`).
struct GroupRows<T> {
    heads_v: Range<usize>,
    heads_qk: Range<usize>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    /// Channel gates' log decays; empty for other decays.
    g: Vec<T>,
}

impl<T: Element> GroupRows<T> {
    fn new(shape: &GatedShape, gates: &Gates<'_, T>, heads_v: Range<usize>, rows: usize) -> Self {
        let heads_qk = shape.qk_head(heads_v.start)..shape.qk_head(heads_v.end - 1) + 1;
        let channels = match gates.decay {
            Decay::Channel(_) => rows * heads_v.len() * shape.dim_k,
            _ => 0,
        };
        Self {
            q: vec![T::zero(); rows * heads_qk.len() * shape.dim_k],
            k: vec![T::zero(); rows * heads_qk.len() * shape.dim_k],
            v: vec![T::zero(); rows * heads_v.len() * shape.dim_v],
            g: vec![T::zero(); channels],
            heads_v,
            heads_qk,
        }
    }

    /// The rows of `tokens` in batch row `b`; whether every value is finite and every
    /// channel gate's ≤ 0.
    fn gather(
        &mut self,
        shape: &GatedShape,
        [q, k, v]: [&Tensor<T>; 3],
        gates: &Gates<'_, T>,
        b: usize,
        tokens: Range<usize>,
    ) -> bool {
        let mut clean = q.gather(b, tokens.clone(), self.heads_qk.clone(), &mut self.q);
        clean &= k.gather(b, tokens.clone(), self.heads_qk.clone(), &mut self.k);
        clean &= v.gather(b, tokens.clone(), self.heads_v.clone(), &mut self.v);
        if let Decay::Channel(g) = gates.decay {
            let width = self.heads_v.len() * shape.dim_k;
            let len = tokens.len();
            for (t, row) in tokens.zip(self.g.chunks_exact_mut(width)) {
                let first = shape.token(b, t, self.heads_v.start) * shape.dim_k;
                simd::copy(row, &g[first..first + width]);
            }
            clean &= simd::all_within(&self.g[..len * width], T::min_value(), T::zero());
        }
        clean
    }

    /// The first `len` rows of one head of `rows` (`heads` heads of `dim` per row) into
    /// `dst`.
    fn head_rows(rows: &[T], heads: usize, slot: usize, dim: usize, len: usize, dst: &mut [T]) {
        let sources = rows.chunks_exact(heads * dim).take(len);
        for (source, row) in sources.zip(dst.chunks_exact_mut(dim)) {
            row.copy_from_slice(&source[slot * dim..(slot + 1) * dim]);
        }
    }

    /// q's rows of the q and k head `h`.
    fn queries(&self, h: usize, dim: usize, len: usize, dst: &mut [T]) {
        let slot = h - self.heads_qk.start;
        Self::head_rows(&self.q, self.heads_qk.len(), slot, dim, len, dst);
    }

    /// k's rows of the q and k head `h`.
    fn keys(&self, h: usize, dim: usize, len: usize, dst: &mut [T]) {
        let slot = h - self.heads_qk.start;
        Self::head_rows(&self.k, self.heads_qk.len(), slot, dim, len, dst);
    }

    /// v's rows of value head `hv`.
    fn values(&self, hv: usize, dim: usize, len: usize, dst: &mut [T]) {
        let slot = hv - self.heads_v.start;
        Self::head_rows(&self.v, self.heads_v.len(), slot, dim, len, dst);
    }

    /// The log decays of value head `hv` for the chunk's `len` tokens from `start`:
    /// channel gates from the gathered rows, the others as [`Gates`] reads them.
    #[allow(clippy::too_many_arguments)]
    fn log_decays(
        &self,
        shape: &GatedShape,
        gates: &Gates<'_, T>,
        b: usize,
        hv: usize,
        start: usize,
        len: usize,
        dst: &mut [T],
    ) {
        match gates.decay {
            Decay::Channel(_) => {
                let slot = hv - self.heads_v.start;
                Self::head_rows(&self.g, self.heads_v.len(), slot, shape.dim_k, len, dst);
            }
            _ => gates.log_decays(shape, b, hv, start, dst),
        }
    }
}

/// One unit's buffers for a chunk of up to `rows` tokens.
struct Scratch<T> {
    q: Vec<T>,
    k: Vec<T>,
    /// The values the state absorbs (`X`).
    x: Vec<T>,
    /// `G`, `rows × width`.
    log_decay: Vec<T>,
    width: usize,
    /// Rows of q or k times decay factors.
    decayed: Vec<T>,
    /// Earlier rows of k times decay factors (per-channel products).
    decayed_keys: Vec<T>,
    /// With a channel gate, `k_j e^{E − G_j}` for E the log decay at the end of j's
    /// block of [`SUB`] rows: every exponent ≤ 0, and any later reference reached from
    /// it by one factor per block and channel instead of one per element.
    keys_to_block_end: Vec<T>,
    /// One such factor per key channel.
    block_factors: Vec<T>,
    /// With a channel gate, `e^{G_i − R}` for R the log decay just before i's block:
    /// what the block's q (and k) rows are scaled by, and whence `e^{G_i}` and the keys'
    /// factors follow without another exponential.
    from_block_start: Vec<T>,
    /// Per block of [`SUB`] rows: whether its decay is within [`FACTORED_SPAN`], so that
    /// its diagonal is part of the products.
    factored: Vec<bool>,
    /// `M`, then `A`: `rows × rows`.
    scores: Vec<T>,
    /// `e^{G_t}`, `rows × width`: what q (and for the delta rule k) rows are scaled by.
    from_start: Vec<T>,
    /// `G` before the chunk's first token: zeros, one per key channel.
    zero_row: Vec<T>,
    /// β of the chunk's tokens.
    betas: Vec<T>,
}

impl<T: Element> Scratch<T> {
    fn new(shape: &GatedShape, gates: &Gates<'_, T>, rows: usize) -> Self {
        let (dim_k, dim_v) = (shape.dim_k, shape.dim_v);
        let width = gates.width(shape);
        Self {
            q: vec![T::zero(); rows * dim_k],
            k: vec![T::zero(); rows * dim_k],
            x: vec![T::zero(); rows * dim_v],
            log_decay: vec![T::zero(); rows * width],
            width,
            decayed: vec![T::zero(); rows * dim_k],
            decayed_keys: vec![T::zero(); rows * dim_k],
            keys_to_block_end: vec![T::zero(); if width > 1 { rows * dim_k } else { 0 }],
            block_factors: vec![T::zero(); dim_k],
            from_block_start: vec![T::zero(); if width > 1 { rows * dim_k } else { 0 }],
            factored: Vec::with_capacity(rows.div_ceil(SUB)),
            scores: vec![T::zero(); rows * rows],
            from_start: vec![T::zero(); rows * width],
            zero_row: vec![T::zero(); dim_k],
            betas: vec![T::zero(); rows],
        }
    }

    /// Tokens `start..start + len` of unit (b, hv): their outputs into `rows`, the state
    /// carried past them; whether the outputs are finite.
    #[allow(clippy::too_many_arguments)]
    fn chunk(
        &mut self,
        shape: &GatedShape,
        group: &GroupRows<T>,
        gates: &Gates<'_, T>,
        b: usize,
        hv: usize,
        start: usize,
        len: usize,
        state: &mut [T],
        scale: T,
        mut rows: MatMut<'_, T>,
    ) -> bool {
        let (dim_k, dim_v, width) = (shape.dim_k, shape.dim_v, self.width);
        let h = shape.qk_head(hv);
        group.queries(h, dim_k, len, &mut self.q);
        group.keys(h, dim_k, len, &mut self.k);
        if gates.l2norm_qk {
            l2_normalise_rows(&mut self.q[..len * dim_k], dim_k);
            l2_normalise_rows(&mut self.k[..len * dim_k], dim_k);
        }
        group.values(hv, dim_v, len, &mut self.x);
        let log_decay = &mut self.log_decay[..len * width];
        group.log_decays(shape, gates, b, hv, start, len, log_decay);
        for t in 1..len {
            let (before, row) = log_decay.split_at_mut(t * width);
            simd::add_scaled(&mut row[..width], &before[(t - 1) * width..], T::one());
        }
        if width > 1 {
            self.channel_factors(len, dim_k);
        } else {
            let from_start = &mut self.from_start[..len * width];
            from_start.copy_from_slice(log_decay);
            simd::exp_in_place(from_start);
        }

        if gates.step_sizes(shape, b, hv, start, &mut self.betas[..len]) {
            // X = Diag(β) (V − (K ⊙ e^G) S), then (I + A) X = that.
            self.decay_rows(Operand::Keys, len, dim_k, Towards::Start);
            matmul(
                MatMut::contiguous(&mut self.x, len, dim_v),
                MatRef::contiguous(&self.decayed, len, dim_k),
                MatRef::contiguous(state, dim_k, dim_v),
                true,
                -T::one(),
            );
            for (row, &beta) in self.x.chunks_exact_mut(dim_v).zip(&self.betas[..len]) {
                simd::scale(row, beta);
            }
            self.scores_into(Operand::Keys, len, dim_k, true);
            for (i, (row, &beta)) in self
                .scores
                .chunks_exact_mut(len)
                .zip(&self.betas[..len])
                .enumerate()
            {
                simd::scale(&mut row[..i], beta);
            }
            // By blocks of SUB rows: what the solved rows take from a block in one
            // product, then the block's own triangle.
            for block in (0..len).step_by(SUB) {
                let end = (block + SUB).min(len);
                let (solved, rest) = self.x.split_at_mut(block * dim_v);
                let rows = &mut rest[..(end - block) * dim_v];
                matmul(
                    MatMut::contiguous(rows, end - block, dim_v),
                    MatRef::strided(&self.scores[block * len..], end - block, block, len, 1),
                    MatRef::contiguous(solved, block, dim_v),
                    true,
                    -T::one(),
                );
                simd::solve_unit_lower(rows, dim_v, &self.scores[block * len + block..], len);
            }
        }

        // O = s ((Q ⊙ e^G) S + M X).
        self.decay_rows(Operand::Queries, len, dim_k, Towards::Start);
        matmul(
            rows.rb(),
            MatRef::contiguous(&self.decayed, len, dim_k),
            MatRef::contiguous(state, dim_k, dim_v),
            false,
            scale,
        );
        self.scores_into(Operand::Queries, len, dim_k, false);
        let x = MatRef::contiguous(&self.x, len, dim_v);
        lower_triangular_product(rows.rb(), &self.scores[..len * len], x, scale);

        // S ← e^{G_last} ⊙ S + (K ⊙ e^{G_last − G})ᵀ X.
        if width > 0 {
            let last = &self.log_decay[(len - 1) * width..len * width];
            super::recurrent::decay(state, dim_v, last);
        }
        self.decay_rows(Operand::Keys, len, dim_k, Towards::Last);
        matmul(
            MatMut::contiguous(state, dim_k, dim_v),
            MatRef::contiguous(&self.decayed, len, dim_k).t(),
            MatRef::contiguous(&self.x, len, dim_v),
            true,
            T::one(),
        );
        (0..len).all(|i| simd::all_finite(rows.row_mut(i)))
    }

    /// `decayed` = the first `len` rows of q or k, row t scaled by `e^{G_t}`
    /// ([`Towards::Start`], computed once per chunk) or `e^{G_last − G_t}`
    /// ([`Towards::Last`], keys only), per channel for a channel gate; a copy without
    /// decay.
    fn decay_rows(&mut self, operand: Operand, len: usize, dim_k: usize, towards: Towards) {
        let source = match operand {
            Operand::Queries => &self.q[..len * dim_k],
            Operand::Keys => &self.k[..len * dim_k],
        };
        let decayed = &mut self.decayed[..len * dim_k];
        let width = self.width;
        let g = &self.log_decay[..len * width];
        let last = &g[len * width - width..];
        match (towards, width) {
            (_, 0) => decayed.copy_from_slice(source),
            (Towards::Start, _) => {
                decayed.copy_from_slice(source);
                let rows = decayed.chunks_exact_mut(dim_k);
                for (row, factors) in rows.zip(self.from_start.chunks_exact(width)) {
                    match factors {
                        [factor] => simd::scale(row, *factor),
                        _ => simd::mul_assign(row, factors),
                    }
                }
            }
            (Towards::Last, 1) => {
                decayed.copy_from_slice(source);
                for (row, g_t) in decayed.chunks_exact_mut(dim_k).zip(g) {
                    simd::scale(row, (last[0] - *g_t).exp());
                }
            }
            (Towards::Last, _) => {
                // k_j e^{G_last − G_j} = (k_j e^{E − G_j}) e^{G_last − E}, E its block's end.
                let blocks = decayed.chunks_mut(SUB * dim_k);
                let sources = self.keys_to_block_end.chunks(SUB * dim_k);
                for (block, (rows, sources)) in blocks.zip(sources).enumerate() {
                    let end = (block * SUB + rows.len() / dim_k) * width;
                    exp_difference(&mut self.block_factors, last, &g[end - width..end]);
                    let pairs = rows
                        .chunks_exact_mut(dim_k)
                        .zip(sources.chunks_exact(dim_k));
                    for (row, source) in pairs {
                        simd::mul_into(row, source, &self.block_factors);
                    }
                }
            }
        }
    }

    /// Under a channel gate, for the chunk's first `len` tokens: `from_block_start` (one
    /// exponential per element), `from_start` and `keys_to_block_end` from it by products,
    /// and which blocks are [`factored`](Self::factored).
    fn channel_factors(&mut self, len: usize, dim_k: usize) {
        let g = &self.log_decay[..len * dim_k];
        self.factored.clear();
        for first in (0..len).step_by(SUB) {
            let end = (first + SUB).min(len);
            let block = first * dim_k..end * dim_k;
            let reference = match first {
                0 => &self.zero_row[..],
                _ => &g[(first - 1) * dim_k..first * dim_k],
            };
            let factors = &mut self.from_block_start[block.clone()];
            let rows = factors
                .chunks_exact_mut(dim_k)
                .zip(g[block.clone()].chunks_exact(dim_k));
            for (row, g_i) in rows {
                exp_difference(row, g_i, reference);
            }
            // e^{G_i} = e^{G_i − R} e^{R}, e^{R} the previous block's last row.
            let (before, from_start) = self.from_start.split_at_mut(first * dim_k);
            let from_start = &mut from_start[..block.len()];
            match first {
                0 => from_start.copy_from_slice(factors),
                _ => {
                    let previous = &before[(first - 1) * dim_k..];
                    for (row, f) in from_start
                        .chunks_exact_mut(dim_k)
                        .zip(factors.chunks_exact(dim_k))
                    {
                        simd::mul_into(row, f, previous);
                    }
                }
            }
            let last = &g[(end - 1) * dim_k..end * dim_k];
            let span = reference
                .iter()
                .zip(last)
                .fold(T::zero(), |m, (&r, &l)| m.max(r - l));
            let factored = span <= T::of_f64(FACTORED_SPAN);
            self.factored.push(factored);
            // k_j e^{E − G_j} = k_j e^{E − R} / e^{G_j − R}, each divisor at least e^{−span}
            // in a factored block; an exponential each where the decay is stronger.
            let keys = &mut self.keys_to_block_end[block.clone()];
            keys.copy_from_slice(&self.k[block.clone()]);
            let last_factors = &factors[factors.len() - dim_k..];
            let rows = keys.chunks_exact_mut(dim_k);
            for ((row, f), g_j) in rows
                .zip(factors.chunks_exact(dim_k))
                .zip(g[block.clone()].chunks_exact(dim_k))
            {
                match factored {
                    true => simd::scale_by_ratio(row, last_factors, f),
                    false => simd::scale_by_exp_difference(row, last, g_j),
                }
            }
        }
    }

    /// `scores` (`len × len`) = `Σ_c a_ic k_jc e^{G_ic − G_jc}` for j ≤ i (j < i when
    /// `strict`), 0 above; `a` is q or k.
    fn scores_into(&mut self, rows_of: Operand, len: usize, dim_k: usize, strict: bool) {
        let width = self.width;
        let scores = &mut self.scores[..len * len];
        let a = match rows_of {
            Operand::Queries => &self.q[..len * dim_k],
            Operand::Keys => &self.k[..len * dim_k],
        };
        let keys = &self.k[..len * dim_k];
        let visible = |i: usize, j: usize| if strict { j < i } else { j <= i };
        let g = &self.log_decay;
        if width <= 1 {
            // Only the lower triangle is kept: the first half of the rows needs only the
            // first half of the keys.
            let half = lower_half(len);
            for (first, rows, keys_seen) in [(0, half, half), (half, len - half, len)] {
                matmul(
                    MatMut::strided(&mut scores[first * len..], rows, keys_seen, len),
                    MatRef::contiguous(&a[first * dim_k..], rows, dim_k),
                    MatRef::contiguous(keys, keys_seen, dim_k).t(),
                    false,
                    T::one(),
                );
            }
            for (i, row) in scores.chunks_exact_mut(len).enumerate() {
                let seen = if strict { i } else { i + 1 };
                row[seen..].fill(T::zero());
                if width == 1 {
                    // e^{G_i − G_j} for the keys row i sees.
                    simd::scale_by_exp_from(&mut row[..seen], g[i], &g[..seen]);
                }
            }
            return;
        }
        scores.fill(T::zero());
        for block in (0..len).step_by(SUB) {
            let end = (block + SUB).min(len);
            // Exponents against R, G just before the block (0 before the chunk): G_i − R ≤ 0
            // for the block's rows, R − G_j ≤ 0 for every earlier key, and R − G_j at most
            // the block's own decay for its keys.
            let reference = if block > 0 {
                &g[(block - 1) * dim_k..block * dim_k]
            } else {
                &self.zero_row
            };
            // A block whose keys' factors stay small is one product, its diagonal included;
            // a strongly decaying one sums its diagonal pair by pair.
            let factored = self.factored[block / SUB];
            let keys_to = if factored { end } else { block };
            let rows = &mut self.decayed[..(end - block) * dim_k];
            let sources = a[block * dim_k..end * dim_k].chunks_exact(dim_k);
            let factors = self.from_block_start[block * dim_k..].chunks_exact(dim_k);
            for ((row, a_i), f) in rows.chunks_exact_mut(dim_k).zip(sources).zip(factors) {
                simd::mul_into(row, a_i, f);
            }
            // k_j e^{R − G_j} = (k_j e^{E − G_j}) e^{R − E}, E the end of j's block.
            let earlier = &mut self.decayed_keys[..keys_to * dim_k];
            let blocks = earlier.chunks_mut(SUB * dim_k);
            let sources = self.keys_to_block_end.chunks(SUB * dim_k);
            for (key_block, (rows, sources)) in blocks.zip(sources).enumerate() {
                let key_end = key_block * SUB + rows.len() / dim_k;
                let block_end = &g[(key_end - 1) * dim_k..key_end * dim_k];
                exp_difference(&mut self.block_factors, reference, block_end);
                let pairs = rows
                    .chunks_exact_mut(dim_k)
                    .zip(sources.chunks_exact(dim_k));
                for (row, source) in pairs {
                    simd::mul_into(row, source, &self.block_factors);
                }
            }
            matmul(
                MatMut::strided(&mut scores[block * len..], end - block, keys_to, len),
                MatRef::contiguous(rows, end - block, dim_k),
                MatRef::contiguous(earlier, keys_to, dim_k).t(),
                false,
                T::one(),
            );
            for i in block..end {
                let row = &mut scores[i * len..(i + 1) * len];
                if factored {
                    let seen = if strict { i } else { i + 1 };
                    row[seen..end].fill(T::zero());
                    continue;
                }
                for j in (block..=i).filter(|&j| visible(i, j)) {
                    let (a_i, k_j) = (&a[i * dim_k..][..dim_k], &keys[j * dim_k..][..dim_k]);
                    let (g_i, g_j) = (&g[i * dim_k..][..dim_k], &g[j * dim_k..][..dim_k]);
                    row[j] = simd::decayed_dot(a_i, k_j, g_i, g_j);
                }
            }
        }
    }
}

/// Where a chunk's rows are split so that products with a lower-triangular factor skip
/// the upper-right quarter: half the rows, or none for chunks too short to gain.
fn lower_half(len: usize) -> usize {
    if len >= 2 * SUB { len / 2 } else { 0 }
}

/// `dst += scale · lower · rhs` for `lower` (`len × len`, zero above its diagonal): the
/// first half of the rows reads only the first half of `rhs`.
fn lower_triangular_product<T: Element>(
    mut dst: MatMut<'_, T>,
    lower: &[T],
    rhs: MatRef<'_, T>,
    scale: T,
) {
    let len = rhs.rows;
    let half = lower_half(len);
    for (first, rows, seen) in [(0, half, half), (half, len - half, len)] {
        matmul(
            dst.rows_mut(first, rows),
            MatRef::strided(&lower[first * len..], rows, seen, len, 1),
            rhs.rows_range(0, seen),
            true,
            scale,
        );
    }
}

/// `out ← e^{a − b}` elementwise.
fn exp_difference<T: Element>(out: &mut [T], a: &[T], b: &[T]) {
    out.fill(T::one());
    simd::scale_by_exp_difference(out, a, b);
}

/// Where [`Scratch::decay_rows`] carries each row's decay: from the chunk's start to the
/// row, or from the row to the chunk's last token.
#[derive(Clone, Copy)]
enum Towards {
    Start,
    Last,
}

/// The largest decay within a block (in log space, over any channel) for which its keys'
/// factors `e^{R − G_j}`, at most `e^20 ≈ 5·10⁸`, are taken in one product: far from f32's
/// range, and each factor rounded once.
const FACTORED_SPAN: f64 = 20.0;

/// Which rows a product reads.
#[derive(Clone, Copy)]
enum Operand {
    Queries,
    Keys,
}
