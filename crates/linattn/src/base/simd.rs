//! The elementwise loops of the kernels (exponentials, maxima, sums), compiled for
//! AVX-512 and AVX2 besides the baseline and dispatched at run time, so that one portable
//! binary still runs them on the widest vectors the machine has. Reductions keep
//! `LANES` partial results so that the compiler may vectorise them.

use crate::base::Element;
use multiversion::multiversion;

/// Partial sums kept by the reductions: a whole AVX-512 register of f32.
const LANES: usize = 16;

/// `x ← eˣ⁻ˢʰⁱᶠᵗ` for every element; returns their sum.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn exp_shifted<T: Element>(xs: &mut [T], shift: T) -> T {
    let mut partial = [T::zero(); LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (acc, x) in partial.iter_mut().zip(chunk) {
            *x = (*x - shift).fast_exp();
            *acc += *x;
        }
    }
    let mut sum = T::zero();
    for x in chunks.into_remainder() {
        *x = (*x - shift).fast_exp();
        sum += *x;
    }
    partial.iter().fold(sum, |a, &b| a + b)
}

/// `x ← scale·(eˣ⁻ˢʰⁱᶠᵗ + offset)` for every element (FAVOR+'s features).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn exp_affine<T: Element>(xs: &mut [T], shift: T, scale: T, offset: T) {
    for x in xs {
        *x = scale * ((*x - shift).fast_exp() + offset);
    }
}

/// The largest element (−∞ for none).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn max<T: Element>(xs: &[T]) -> T {
    let mut partial = [T::neg_infinity(); LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (acc, &x) in partial.iter_mut().zip(chunk) {
            *acc = if x > *acc { x } else { *acc };
        }
    }
    let rest = chunks
        .remainder()
        .iter()
        .copied()
        .fold(T::neg_infinity(), T::max);
    partial.iter().copied().fold(rest, T::max)
}

/// Σ xᵢ.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn sum<T: Element>(xs: &[T]) -> T {
    let mut partial = [T::zero(); LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (acc, &x) in partial.iter_mut().zip(chunk) {
            *acc += x;
        }
    }
    let rest = chunks.remainder().iter().fold(T::zero(), |a, &b| a + b);
    partial.iter().fold(rest, |a, &b| a + b)
}

/// Σ aᵢ bᵢ.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn dot<T: Element>(a: &[T], b: &[T]) -> T {
    let mut partial = [T::zero(); LANES];
    let (mut a_chunks, mut b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (ca, cb) in (&mut a_chunks).zip(&mut b_chunks) {
        for ((acc, &x), &y) in partial.iter_mut().zip(ca).zip(cb) {
            *acc += x * y;
        }
    }
    let rest = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .fold(T::zero(), |acc, (&x, &y)| acc + x * y);
    partial.iter().fold(rest, |a, &b| a + b)
}

/// `x ← x·s`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn scale<T: Element>(xs: &mut [T], s: T) {
    for x in xs {
        *x *= s;
    }
}

/// `acc ← acc + a·x`.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn add_scaled<T: Element>(acc: &mut [T], x: &[T], a: T) {
    for (acc, &x) in acc.iter_mut().zip(x) {
        *acc += a * x;
    }
}

/// Columns a recurrent step keeps in registers while it walks a state's rows: four
/// AVX-512 vectors of f32, so that sums over rows chain in registers, not through memory.
const STATE_BLOCK: usize = 4 * LANES;

/// `acc ← acc + Σ_c a_c · row_c` for the rows `rows` (`a.len()` rows of `acc.len()`):
/// `Sᵀ a` for a state `S` stored row by row.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn add_rows_scaled<T: Element>(acc: &mut [T], rows: &[T], a: &[T]) {
    let n = acc.len();
    let mut blocks = acc.chunks_exact_mut(STATE_BLOCK);
    for (block, acc) in (&mut blocks).enumerate() {
        let j0 = block * STATE_BLOCK;
        // An array, not a slice, so that the sum lives in registers.
        let mut sum: [T; STATE_BLOCK] = (*acc).try_into().expect("a whole block");
        for (c, &a_c) in a.iter().enumerate() {
            let row: &[T; STATE_BLOCK] = rows[c * n + j0..][..STATE_BLOCK]
                .try_into()
                .expect("a whole block");
            for (s, &x) in sum.iter_mut().zip(row) {
                *s += a_c * x;
            }
        }
        acc.copy_from_slice(&sum);
    }
    let tail = blocks.into_remainder();
    let j0 = n - tail.len();
    if tail.is_empty() {
        return;
    }
    for (c, &a_c) in a.iter().enumerate() {
        add_scaled(tail, &rows[c * n + j0..(c + 1) * n], a_c);
    }
}

/// Solves `(I + L) Y = X` in place for the rows of `x` (each `dim` long), `L` strictly
/// lower triangular with `L_ij` at `l[i · stride + j]`: row i becomes `x_i − Σ_{j<i} L_ij
/// y_j`, one row after the other.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn solve_unit_lower<T: Element>(x: &mut [T], dim: usize, l: &[T], stride: usize) {
    let rows = x.len() / dim;
    let whole = dim - dim % STATE_BLOCK;
    for i in 1..rows {
        let (solved, rest) = x.split_at_mut(i * dim);
        let row = &mut rest[..dim];
        let coefficients = &l[i * stride..i * stride + i];
        for j0 in (0..whole).step_by(STATE_BLOCK) {
            // An array, not a slice, so that the row's block lives in registers.
            let block: &mut [T; STATE_BLOCK] = (&mut row[j0..j0 + STATE_BLOCK])
                .try_into()
                .expect("a whole block");
            let mut sum = *block;
            for (j, &c) in coefficients.iter().enumerate() {
                let y: &[T; STATE_BLOCK] = solved[j * dim + j0..][..STATE_BLOCK]
                    .try_into()
                    .expect("a whole block");
                for (s, &y) in sum.iter_mut().zip(y) {
                    *s -= c * y;
                }
            }
            *block = sum;
        }
        for (j, &c) in coefficients.iter().enumerate() {
            let y = &solved[j * dim + whole..(j + 1) * dim];
            for (s, &y) in row[whole..].iter_mut().zip(y) {
                *s -= c * y;
            }
        }
    }
}

/// For each row c of `rows` (`f.len()` rows of `u.len()`): `row_c ← f_c·row_c + a_c·u`,
/// and where `read` gives `(out, b)`, `out = Σ_c b_c · row_c` of the new rows: a
/// recurrent step's decay, update and output in one pass over the state.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn decay_update_rows<T: Element>(
    rows: &mut [T],
    f: &[T],
    u: &[T],
    a: &[T],
    read: Option<(&mut [T], &[T])>,
) {
    let n = u.len();
    let (mut out, b) = match read {
        Some((out, b)) => (Some(out), b),
        None => (None, &[][..]),
    };
    let whole = n - n % STATE_BLOCK;
    for j0 in (0..whole).step_by(STATE_BLOCK) {
        let u: &[T; STATE_BLOCK] = u[j0..j0 + STATE_BLOCK].try_into().expect("a whole block");
        let mut sum = [T::zero(); STATE_BLOCK];
        for (c, (&f_c, &a_c)) in f.iter().zip(a).enumerate() {
            let row: &mut [T; STATE_BLOCK] = (&mut rows[c * n + j0..][..STATE_BLOCK])
                .try_into()
                .expect("a whole block");
            for (x, &u) in row.iter_mut().zip(u) {
                *x = f_c * *x + a_c * u;
            }
            if let Some(&b_c) = b.get(c) {
                for (s, &x) in sum.iter_mut().zip(row.iter()) {
                    *s += b_c * x;
                }
            }
        }
        if let Some(out) = out.as_deref_mut() {
            out[j0..j0 + STATE_BLOCK].copy_from_slice(&sum);
        }
    }
    if whole == n {
        return;
    }
    if let Some(out) = out.as_deref_mut() {
        out[whole..].fill(T::zero());
    }
    for (c, (&f_c, &a_c)) in f.iter().zip(a).enumerate() {
        let row = &mut rows[c * n + whole..(c + 1) * n];
        for (x, &u) in row.iter_mut().zip(&u[whole..]) {
            *x = f_c * *x + a_c * u;
        }
        if let (Some(out), Some(&b_c)) = (out.as_deref_mut(), b.get(c)) {
            add_scaled(&mut out[whole..], row, b_c);
        }
    }
}

/// `out ← elu(x) + 1`, which is x + 1 for x > 0 and eˣ otherwise.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn elu_plus_one<T: Element>(xs: &[T], out: &mut [T]) {
    for (o, &x) in out.iter_mut().zip(xs) {
        let exp = x.min(T::zero()).fast_exp();
        *o = if x > T::zero() { x + T::one() } else { exp };
    }
}

/// `dst ← src` in register-sized pieces: for the row copies of gathers, where a call to
/// `memmove` (which picks `rep movsb` at these sizes) proved several times slower.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn copy<T: Element>(dst: &mut [T], src: &[T]) {
    let mut pieces = dst.chunks_exact_mut(LANES);
    let mut sources = src.chunks_exact(LANES);
    for (d, s) in (&mut pieces).zip(&mut sources) {
        let piece: [T; LANES] = s.try_into().expect("a whole piece");
        d.copy_from_slice(&piece);
    }
    for (d, &s) in pieces.into_remainder().iter_mut().zip(sources.remainder()) {
        *d = s;
    }
}

/// Whether every element lies in `[low, high]` (NaN does not).
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn all_within<T: Element>(xs: &[T], low: T, high: T) -> bool {
    let mut inside = [true; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (acc, &x) in inside.iter_mut().zip(chunk) {
            *acc &= (x >= low) & (x <= high);
        }
    }
    let rest = chunks.remainder().iter().all(|&x| x >= low && x <= high);
    rest && inside.iter().all(|&x| x)
}

/// Whether every element is finite.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn all_finite<T: Element>(xs: &[T]) -> bool {
    // x·0 is 0 for finite x and NaN otherwise; NaN poisons the sum.
    let mut partial = [T::zero(); LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (acc, &x) in partial.iter_mut().zip(chunk) {
            *acc += x * T::zero();
        }
    }
    let rest = chunks
        .remainder()
        .iter()
        .fold(T::zero(), |a, &x| a + x * T::zero());
    partial.iter().fold(rest, |a, &b| a + b) == T::zero()
}

/// Asks for the cache lines of `xs` ahead of use: rows of one head lie a whole token
/// apart, a pattern the hardware prefetchers do not follow.
#[inline(always)]
pub(crate) fn prefetch<T>(xs: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(xs);
        let start = xs.as_ptr() as *const i8;
        for offset in (0..bytes).step_by(64) {
            // SAFETY: prefetching is a hint; the address lies inside `xs`.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    start.add(offset),
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_within_a_few_ulp_everywhere_it_is_used() {
        let mut worst32 = 0.0f64;
        let mut worst64 = 0.0f64;
        for i in 0..=400_000 {
            let x = -87.0 + 175.0 * i as f64 / 400_000.0;
            let exact = x.exp();
            worst32 =
                worst32.max(((x as f32).fast_exp() as f64 - (x as f32 as f64).exp()).abs() / exact);
            let y = -700.0 + 1400.0 * i as f64 / 400_000.0;
            worst64 = worst64.max((y.fast_exp() - y.exp()).abs() / y.exp());
        }
        assert!(worst32 < 3.0 * f32::EPSILON as f64, "f32: {worst32:e}");
        assert!(worst64 < 4.0 * f64::EPSILON, "f64: {worst64:e}");
        assert_eq!(f32::NEG_INFINITY.fast_exp(), 0.0);
        assert_eq!((-100.0f32).fast_exp(), 0.0);
        assert_eq!(f64::NEG_INFINITY.fast_exp(), 0.0);
    }

    #[test]
    fn reductions_match_their_definitions_on_every_length() {
        for len in [0, 1, 15, 16, 17, 100] {
            let xs: Vec<f64> = (0..len).map(|i| ((i * 37) % 11) as f64 - 5.0).collect();
            let ys: Vec<f64> = (0..len).map(|i| (i % 3) as f64).collect();
            assert_eq!(sum(&xs), xs.iter().sum::<f64>());
            assert_eq!(
                max(&xs),
                xs.iter().copied().fold(f64::NEG_INFINITY, f64::max)
            );
            assert_eq!(
                dot(&xs, &ys),
                xs.iter().zip(&ys).map(|(a, b)| a * b).sum::<f64>()
            );
            assert!(all_finite(&xs));
            let mut with_nan = xs.clone();
            if len > 0 {
                with_nan[len - 1] = f64::NAN;
                assert!(!all_finite(&with_nan));
                with_nan[len - 1] = f64::INFINITY;
                assert!(!all_finite(&with_nan));
            }
            let mut exps = xs.clone();
            let total = exp_shifted(&mut exps, 1.0);
            for (e, x) in exps.iter().zip(&xs) {
                assert!((e - (x - 1.0).exp()).abs() < 1e-15 * e);
            }
            assert!((total - exps.iter().sum::<f64>()).abs() < 1e-12 * total.max(1.0));
        }
    }
}

/// `x ← eˣ` for every element.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn exp_in_place<T: Element>(xs: &mut [T]) {
    for x in xs {
        *x = x.fast_exp();
    }
}

/// `x ← x · e^{a − b}` elementwise: a row scaled by decay factors given as log-space
/// differences.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn scale_by_exp_difference<T: Element>(xs: &mut [T], a: &[T], b: &[T]) {
    for ((x, &a), &b) in xs.iter_mut().zip(a).zip(b) {
        *x *= (a - b).fast_exp();
    }
}

/// `x ← x · e^{a − b_j}` elementwise: a row scaled by decay factors from one log decay.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn scale_by_exp_from<T: Element>(xs: &mut [T], a: T, b: &[T]) {
    for (x, &b) in xs.iter_mut().zip(b) {
        *x *= (a - b).fast_exp();
    }
}

/// `x ← x · y` elementwise.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn mul_assign<T: Element>(xs: &mut [T], ys: &[T]) {
    for (x, &y) in xs.iter_mut().zip(ys) {
        *x *= y;
    }
}

/// `x ← y · z` elementwise.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn mul_into<T: Element>(xs: &mut [T], ys: &[T], zs: &[T]) {
    for ((x, &y), &z) in xs.iter_mut().zip(ys).zip(zs) {
        *x = y * z;
    }
}

/// `x ← x · a / b` elementwise.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn scale_by_ratio<T: Element>(xs: &mut [T], a: &[T], b: &[T]) {
    for ((x, &a), &b) in xs.iter_mut().zip(a).zip(b) {
        *x = *x * a / b;
    }
}

/// `Σ x_c y_c e^{a_c − b_c}`: two rows' product under per-channel decay factors.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx512dq+fma", "x86_64+avx2+fma"))]
pub(crate) fn decayed_dot<T: Element>(x: &[T], y: &[T], a: &[T], b: &[T]) -> T {
    let mut partial = [T::zero(); LANES];
    let rows = x
        .chunks_exact(LANES)
        .zip(y.chunks_exact(LANES))
        .zip(a.chunks_exact(LANES).zip(b.chunks_exact(LANES)));
    for ((x, y), (a, b)) in rows {
        for (((acc, &x), &y), (&a, &b)) in partial.iter_mut().zip(x).zip(y).zip(a.iter().zip(b)) {
            *acc += x * y * (a - b).fast_exp();
        }
    }
    let whole = x.len() / LANES * LANES;
    let tail = x[whole..]
        .iter()
        .zip(&y[whole..])
        .zip(a[whole..].iter().zip(&b[whole..]));
    let sum = tail.fold(T::zero(), |s, ((&x, &y), (&a, &b))| {
        s + x * y * (a - b).fast_exp()
    });
    partial.iter().fold(sum, |s, &p| s + p)
}
