//! Non-causal linear attention (φ = elu + 1) in f32 on AVX-512, fused for long sequences.
//!
//! The general path maps a block of rows, then hands it to the matmul crate: the loads of
//! q, k and v from memory and the multiply-adds take turns, so the time is the sum of the
//! two (measured on the 2-core machine: ~19 ms of products plus ~19 ms of memory for
//! 65536 tokens, B=1, H=8, D=64). Here each register tile maps its rows itself and asks
//! for the rows of a later tile while it multiplies, so that memory and arithmetic
//! overlap. Taken only where it applies (f32, elu + 1, every head in one call, feature and
//! value widths multiples of 64, AVX-512 present); everything else goes the general way.

use super::{LinearState, Normalizer, merge_parts};
use crate::base::Problem;
use crate::base::Tensor;
use crate::base::simd;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::ops::Range;

/// Rows (query side) or features (key side) per register tile: with 64 columns in four
/// registers, six rows fill 24 of the 32 vector registers with accumulators.
const TILE: usize = 6;
/// Columns per register tile: four registers of 16 floats.
const WIDTH: usize = 64;
/// Key rows mapped at a time: their features and values stay in the 48 KiB L1 cache
/// while every feature tile passes over them.
const KEY_BLOCK: usize = 48;
/// Query rows per task.
const QUERY_BLOCK: usize = 256;
/// How many tiles ahead the query side asks for its rows.
const QUERY_LOOKAHEAD: usize = 2;

/// Whether the fused kernels take this call.
pub(super) fn applies(problem: &Problem, heads: &Range<usize>) -> bool {
    heads.start == 0
        && heads.end == problem.heads_q
        && problem.dim_qk.is_multiple_of(WIDTH)
        && problem.dim_v.is_multiple_of(WIDTH)
        && std::arch::is_x86_feature_detected!("avx512f")
}

/// Attention for every head; returns whether every input and output was finite. The
/// caller has checked [`applies`].
pub(super) fn forward(
    problem: &Problem,
    normalizer: Normalizer,
    [q, k, v]: [&Tensor<f32>; 3],
    out: &mut Tensor<f32>,
) -> bool {
    let (states, keys_finite) = key_states(problem, k, v);
    let (heads_q, dim_v) = (problem.heads_q, problem.dim_v);
    let group = heads_q / problem.heads_kv;
    let row_q = heads_q * problem.dim_qk;
    let row_out = heads_q * dim_v;
    let batch_q = problem.len_q * row_q;
    let queries = q.as_slice();
    let rows_finite = out
        .as_mut_slice()
        .par_chunks_mut(problem.len_q * row_out)
        .enumerate()
        .flat_map(|(b, batch_out)| {
            let batch = &queries[b * batch_q..(b + 1) * batch_q];
            let head_states: Vec<&LinearState<f32>> = (0..heads_q)
                .map(|h| &states[b * problem.heads_kv + h / group])
                .collect();
            batch_out
                .par_chunks_mut(QUERY_BLOCK * row_out)
                .enumerate()
                .map(move |(block, out_rows)| {
                    let start = block * QUERY_BLOCK;
                    let rows = start..start + out_rows.len() / row_out;
                    // SAFETY: `applies` found AVX-512; `batch` holds every query row of
                    // the batch and `out_rows` the output rows `rows`.
                    unsafe {
                        query_rows(
                            batch,
                            rows,
                            out_rows,
                            &head_states,
                            [problem.dim_qk, dim_v],
                            normalizer,
                        )
                    }
                })
        })
        .reduce(|| true, |a, b| a && b);
    keys_finite && rows_finite
}

/// One state per (batch, kv head), batch-major, and whether every key and value was
/// finite: each batch's sequence split into as many parts as keep every thread busy.
fn key_states(
    problem: &Problem,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
) -> (Vec<LinearState<f32>>, bool) {
    let (heads, d, dim_v) = (problem.heads_kv, problem.dim_qk, problem.dim_v);
    let parts = rayon::current_num_threads()
        .div_ceil(problem.batch)
        .clamp(1, problem.len_k.div_ceil(KEY_BLOCK));
    let span = problem.len_k.div_ceil(parts);
    let (keys, values) = (k.as_slice(), v.as_slice());
    let partial: Vec<(Vec<LinearState<f32>>, bool)> = (0..problem.batch * parts)
        .into_par_iter()
        .map(|task| {
            let (b, part) = (task / parts, task % parts);
            let rows = (part * span).min(problem.len_k)..((part + 1) * span).min(problem.len_k);
            let mut states = vec![LinearState::new(d, dim_v, false); heads];
            let batch = b * problem.len_k;
            let key_rows = &keys[batch * heads * d..(batch + problem.len_k) * heads * d];
            let value_rows =
                &values[batch * heads * dim_v..(batch + problem.len_k) * heads * dim_v];
            // SAFETY: `applies` found AVX-512; the slices hold len_k rows of every head.
            let finite =
                unsafe { absorb_rows(key_rows, value_rows, rows, &mut states, [d, dim_v]) };
            (states, finite)
        })
        .collect();
    merge_parts(partial, parts)
}

/// Walks through a slice one cache line per call, asking for each line ahead of its use.
struct Prefetcher {
    next: *const u8,
    end: *const u8,
}

impl Prefetcher {
    fn over(lines: &[f32]) -> Self {
        let range = lines.as_ptr_range();
        Self {
            next: range.start as *const u8,
            end: range.end as *const u8,
        }
    }

    #[inline(always)]
    fn step(&mut self) {
        if self.next < self.end {
            // SAFETY: a prefetch is a hint; the address lies inside the slice.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.next as *const i8) };
            // The last step may pass the end by less than a line: never dereferenced.
            self.next = self.next.wrapping_add(64);
        }
    }
}

/// eˣ as [`crate::base::Element::fast_exp`] computes it, sixteen at a time.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> __m512 {
    const LOWEST: f32 = -87.3;
    const ROUND: f32 = 12_582_912.0;
    let clamped = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(LOWEST)),
        _mm512_set1_ps(88.7),
    );
    let z = _mm512_fmadd_ps(
        clamped,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
        _mm512_set1_ps(ROUND),
    );
    let n = _mm512_sub_ps(z, _mm512_set1_ps(ROUND));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), clamped);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(0.001_388_2);
    for c in [0.008_333_452, 0.041_666_49, 0.166_666_7, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let bits = _mm512_add_epi32(
        _mm512_sub_epi32(
            _mm512_castps_si512(z),
            _mm512_set1_epi32(ROUND.to_bits() as i32),
        ),
        _mm512_set1_epi32(127),
    );
    let power = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(bits));
    let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(LOWEST));
    _mm512_maskz_mov_ps(!below, _mm512_mul_ps(power, p))
}

/// elu(x) + 1 of sixteen values; `poison` gathers x·0, which is NaN for any NaN or
/// infinite x (the map alone would hide them: NaN maps to 1 and −∞ to 0).
#[inline]
#[target_feature(enable = "avx512f")]
fn elu_plus_one16(x: __m512, poison: &mut __m512) -> __m512 {
    let zero = _mm512_setzero_ps();
    *poison = _mm512_fmadd_ps(x, zero, *poison);
    let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, zero);
    let exp = exp16(_mm512_min_ps(x, zero));
    _mm512_mask_blend_ps(positive, exp, _mm512_add_ps(x, _mm512_set1_ps(1.0)))
}

/// Whether no NaN reached `poison`.
#[inline]
#[target_feature(enable = "avx512f")]
fn clean(poison: __m512) -> bool {
    _mm512_reduce_add_ps(poison) == 0.0
}

/// Adds the keys and values of `rows` (of `keys`, `values`: every row of one batch, all
/// heads side by side) into one state per head.
///
/// # Safety
/// AVX-512F must be present; `keys` and `values` hold whole rows of `states.len()` heads
/// of widths `d` and `dim_v`, at least `rows.end` of them.
#[target_feature(enable = "avx512f")]
unsafe fn absorb_rows(
    keys: &[f32],
    values: &[f32],
    rows: Range<usize>,
    states: &mut [LinearState<f32>],
    [d, dim_v]: [usize; 2],
) -> bool {
    let heads = states.len();
    let (row_k, row_v) = (heads * d, heads * dim_v);
    let mut features = vec![0.0f32; KEY_BLOCK * d];
    // One head's values of the block, side by side: in place its rows lie a whole token
    // apart, so that they fall into a few L1 sets and every feature tile would reread
    // them from L2.
    let mut head_values = vec![0.0f32; KEY_BLOCK * dim_v];
    let mut poison = _mm512_setzero_ps();
    let mut finite = true;
    let mut start = rows.start;
    while start < rows.end {
        let len = KEY_BLOCK.min(rows.end - start);
        let next = (start + len)..(start + 2 * len).min(rows.end);
        let (next_keys, next_values) = (
            &keys[next.start * row_k..next.end * row_k],
            &values[next.start * row_v..next.end * row_v],
        );
        for (g, state) in states.iter_mut().enumerate() {
            // Each head asks for its share of the next block's lines while it multiplies.
            let share = |lines: &[f32]| {
                let part = lines.len().div_ceil(heads);
                Prefetcher::over(
                    &lines[(g * part).min(lines.len())..((g + 1) * part).min(lines.len())],
                )
            };
            let mut ahead = [share(next_keys), share(next_values)];
            for i in 0..len {
                let key = &keys[(start + i) * row_k + g * d..][..d];
                let phi = &mut features[i * d..(i + 1) * d];
                for (x, (p, z)) in key.chunks_exact(16).zip(
                    phi.chunks_exact_mut(16)
                        .zip(state.k_sum.chunks_exact_mut(16)),
                ) {
                    // SAFETY: 16 values in each of the three chunks.
                    unsafe {
                        let mapped = elu_plus_one16(_mm512_loadu_ps(x.as_ptr()), &mut poison);
                        _mm512_storeu_ps(p.as_mut_ptr(), mapped);
                        let sum = _mm512_add_ps(_mm512_loadu_ps(z.as_ptr()), mapped);
                        _mm512_storeu_ps(z.as_mut_ptr(), sum);
                    }
                }
            }
            for (i, row) in head_values.chunks_exact_mut(dim_v).take(len).enumerate() {
                row.copy_from_slice(&values[(start + i) * row_v + g * dim_v..][..dim_v]);
            }
            // Checked while the copy is in cache.
            finite &= simd::all_finite(&head_values[..len * dim_v]);
            for column in (0..dim_v).step_by(WIDTH) {
                let mut first = 0;
                while first < d {
                    let count = TILE.min(d - first);
                    let tile = FeatureTile {
                        features: &features,
                        d,
                        first,
                        values: &head_values,
                        column,
                        len,
                    };
                    let state_rows = &mut state.kv[first * dim_v..];
                    // SAFETY: AVX-512F is present (this function's contract).
                    unsafe {
                        match count {
                            6 => tile.absorb::<6>(state_rows, dim_v, &mut ahead),
                            4 => tile.absorb::<4>(state_rows, dim_v, &mut ahead),
                            2 => tile.absorb::<2>(state_rows, dim_v, &mut ahead),
                            _ => {
                                unreachable!("widths are multiples of 64: tiles of 6, then 4 or 2")
                            }
                        }
                    }
                    first += count;
                }
            }
            state.count += len;
        }
        start += len;
    }
    finite && clean(poison)
}

/// Features `first..` (rows of the state) × 64 value columns, over the rows of one key
/// block.
struct FeatureTile<'a> {
    features: &'a [f32],
    d: usize,
    first: usize,
    values: &'a [f32],
    column: usize,
    len: usize,
}

impl FeatureTile<'_> {
    /// `state[first + f][column..column + 64] += Σᵢ φᵢ[first + f] vᵢ[column..]`.
    ///
    /// # Safety
    /// AVX-512F must be present.
    #[target_feature(enable = "avx512f")]
    unsafe fn absorb<const COUNT: usize>(
        &self,
        state_rows: &mut [f32],
        dim_v: usize,
        ahead: &mut [Prefetcher; 2],
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; COUNT];
        for (f, row) in acc.iter_mut().enumerate() {
            for (j, lane) in row.iter_mut().enumerate() {
                let at = f * dim_v + self.column + 16 * j;
                // SAFETY: the state has `first + COUNT` rows of dim_v ≥ column + 64 values.
                *lane = unsafe { _mm512_loadu_ps(state_rows[at..at + 16].as_ptr()) };
            }
        }
        for i in 0..self.len {
            let value_row = &self.values[i * dim_v + self.column..][..WIDTH];
            // SAFETY: 64 values.
            let v =
                unsafe { [0, 16, 32, 48].map(|j| _mm512_loadu_ps(value_row[j..j + 16].as_ptr())) };
            let phi = &self.features[i * self.d + self.first..][..COUNT];
            for (row, &weight) in acc.iter_mut().zip(phi) {
                let weight = _mm512_set1_ps(weight);
                for (lane, &v) in row.iter_mut().zip(&v) {
                    *lane = _mm512_fmadd_ps(weight, v, *lane);
                }
            }
            ahead[0].step();
            ahead[1].step();
        }
        for (f, row) in acc.iter().enumerate() {
            for (j, lane) in row.iter().enumerate() {
                let at = f * dim_v + self.column + 16 * j;
                // SAFETY: as for the loads.
                unsafe { _mm512_storeu_ps(state_rows[at..at + 16].as_mut_ptr(), *lane) };
            }
        }
    }
}

/// Rows `rows` of the output, `out_rows`, from the queries of one batch (every row, all
/// heads side by side) and each query head's state.
///
/// # Safety
/// AVX-512F must be present; `queries` holds at least `rows.end` rows of `states.len()`
/// heads of width `d`, `out_rows` exactly `rows.len()` rows of width `dim_v` each.
#[target_feature(enable = "avx512f")]
unsafe fn query_rows(
    queries: &[f32],
    rows: Range<usize>,
    out_rows: &mut [f32],
    states: &[&LinearState<f32>],
    [d, dim_v]: [usize; 2],
    normalizer: Normalizer,
) -> bool {
    let heads = states.len();
    let (row_q, row_out) = (heads * d, heads * dim_v);
    let seq = queries.len() / row_q;
    let mut features = vec![0.0f32; TILE * d];
    let mut poison = _mm512_setzero_ps();
    let mut start = rows.start;
    while start < rows.end {
        let len = TILE.min(rows.end - start);
        let ahead_rows = (start + QUERY_LOOKAHEAD * TILE).min(seq)
            ..(start + (QUERY_LOOKAHEAD + 1) * TILE).min(seq);
        let upcoming = &queries[ahead_rows.start * row_q..ahead_rows.end * row_q];
        for (h, state) in states.iter().enumerate() {
            let part = upcoming.len().div_ceil(heads);
            let mut ahead = Prefetcher::over(
                &upcoming[(h * part).min(upcoming.len())..((h + 1) * part).min(upcoming.len())],
            );
            let mut den = [0.0f32; TILE];
            for (i, den) in den.iter_mut().enumerate().take(len) {
                let query = &queries[(start + i) * row_q + h * d..][..d];
                let phi = &mut features[i * d..(i + 1) * d];
                let mut dot = _mm512_setzero_ps();
                for (x, (p, z)) in query
                    .chunks_exact(16)
                    .zip(phi.chunks_exact_mut(16).zip(state.k_sum.chunks_exact(16)))
                {
                    // SAFETY: 16 values in each of the three chunks.
                    unsafe {
                        let mapped = elu_plus_one16(_mm512_loadu_ps(x.as_ptr()), &mut poison);
                        _mm512_storeu_ps(p.as_mut_ptr(), mapped);
                        dot = _mm512_fmadd_ps(mapped, _mm512_loadu_ps(z.as_ptr()), dot);
                    }
                }
                *den = _mm512_reduce_add_ps(dot);
            }
            let first_out = (start - rows.start) * row_out + h * dim_v;
            for column in (0..dim_v).step_by(WIDTH) {
                let mut acc = [[_mm512_setzero_ps(); 4]; TILE];
                for f in 0..d {
                    let state_row = &state.kv[f * dim_v + column..][..WIDTH];
                    // SAFETY: 64 values.
                    let s = unsafe {
                        [0, 16, 32, 48].map(|j| _mm512_loadu_ps(state_row[j..j + 16].as_ptr()))
                    };
                    for (i, row) in acc.iter_mut().enumerate() {
                        let weight = _mm512_set1_ps(features[i * d + f]);
                        for (lane, &s) in row.iter_mut().zip(&s) {
                            *lane = _mm512_fmadd_ps(weight, s, *lane);
                        }
                    }
                    ahead.step();
                }
                for (i, row) in acc.iter().enumerate().take(len) {
                    let scale = _mm512_set1_ps(1.0 / normalizer.divisor(den[i]));
                    let target = &mut out_rows[first_out + i * row_out + column..][..WIDTH];
                    for (j, lane) in row.iter().enumerate() {
                        let y = _mm512_mul_ps(*lane, scale);
                        poison = _mm512_fmadd_ps(y, _mm512_setzero_ps(), poison);
                        // SAFETY: 16 values.
                        unsafe { _mm512_storeu_ps(target[16 * j..16 * j + 16].as_mut_ptr(), y) };
                    }
                }
            }
        }
        start += len;
    }
    clean(poison)
}
