//! The feature maps φ of the kernelized methods, and the random matrices they draw.

use crate::backend::cpu::matmul::matmul;
use crate::base::Element;
use crate::base::simd;
use crate::base::{MatMut, MatRef};
use crate::engine::FeatureMap;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Linear Transformer: φ(x) = elu(x) + 1, which is x + 1 for x > 0 and eˣ otherwise.
#[derive(Clone, Debug)]
pub(crate) struct EluPlusOne {
    pub dim: usize,
}

impl<T: Element> FeatureMap<T> for EluPlusOne {
    fn features(&self) -> usize {
        self.dim
    }
    fn queries(&self, rows: MatRef<'_, T>, _first: usize, out: &mut [T]) {
        for (i, phi) in out.chunks_exact_mut(self.dim).take(rows.rows).enumerate() {
            if i + 64 < rows.rows {
                simd::prefetch(rows.row(i + 64));
            }
            simd::elu_plus_one(rows.row(i), phi);
        }
    }
    fn keys(&self, rows: MatRef<'_, T>, first: usize, out: &mut [T], _log_scale: &mut [T]) {
        self.queries(rows, first, out);
    }
    fn stabiliser(&self) -> Option<T> {
        None
    }
    fn queries_backward(&self, rows: MatRef<'_, T>, _first: usize, d_phi: &mut [T], dx: &mut [T]) {
        let d = self.dim;
        for (i, (dx, d_phi)) in dx
            .chunks_exact_mut(d)
            .zip(d_phi.chunks_exact(d))
            .enumerate()
        {
            for ((g, &dp), &x) in dx.iter_mut().zip(d_phi).zip(rows.row(i)) {
                *g += dp * if x > T::zero() { T::one() } else { x.exp() };
            }
        }
    }
    fn keys_backward(
        &self,
        rows: MatRef<'_, T>,
        first: usize,
        d_features: &mut [T],
        _d_log_scale: &[T],
        dx: &mut [T],
    ) {
        self.queries_backward(rows, first, d_features, dx);
    }
}

/// cosFormer: φ(xᵢ) = [relu(xᵢ)·cos θᵢ, relu(xᵢ)·sin θᵢ] with θᵢ = π/2 · i / M for the
/// 1-based position i, so that φ(qᵢ)·φ(kⱼ) = relu(qᵢ)·relu(kⱼ)·cos(π/2 · (i−j)/M).
#[derive(Clone, Debug)]
pub(crate) struct CosineReweighted {
    pub dim: usize,
    /// M = max(len_q, len_k).
    pub max_len: usize,
}

impl<T: Element> FeatureMap<T> for CosineReweighted {
    fn features(&self) -> usize {
        2 * self.dim
    }
    fn queries(&self, rows: MatRef<'_, T>, first: usize, out: &mut [T]) {
        let d = self.dim;
        for (i, phi) in out.chunks_exact_mut(2 * d).take(rows.rows).enumerate() {
            let (sin, cos) = cosformer_angle(first + i, self.max_len).sin_cos();
            let (cos, sin) = (T::of_f64(cos), T::of_f64(sin));
            let (phi_cos, phi_sin) = phi.split_at_mut(d);
            for ((c, s), &x) in phi_cos.iter_mut().zip(phi_sin).zip(rows.row(i)) {
                let relu = x.max(T::zero());
                *c = relu * cos;
                *s = relu * sin;
            }
        }
    }
    fn keys(&self, rows: MatRef<'_, T>, first: usize, out: &mut [T], _log_scale: &mut [T]) {
        self.queries(rows, first, out);
    }
    fn stabiliser(&self) -> Option<T> {
        None
    }
    fn queries_backward(&self, rows: MatRef<'_, T>, first: usize, d_phi: &mut [T], dx: &mut [T]) {
        let d = self.dim;
        for (i, (dx, d_phi)) in dx
            .chunks_exact_mut(d)
            .zip(d_phi.chunks_exact(2 * d))
            .enumerate()
        {
            let (sin, cos) = cosformer_angle(first + i, self.max_len).sin_cos();
            let (cos, sin) = (T::of_f64(cos), T::of_f64(sin));
            let (d_cos, d_sin) = d_phi.split_at(d);
            for (((g, &dc), &ds), &x) in dx.iter_mut().zip(d_cos).zip(d_sin).zip(rows.row(i)) {
                if x > T::zero() {
                    *g += dc * cos + ds * sin;
                }
            }
        }
    }
    fn keys_backward(
        &self,
        rows: MatRef<'_, T>,
        first: usize,
        d_features: &mut [T],
        _d_log_scale: &[T],
        dx: &mut [T],
    ) {
        self.queries_backward(rows, first, d_features, dx);
    }
}

/// θ for the 0-based `position`: π/2 · (position + 1) / M, in f64 so that f32 and f64
/// runs weigh positions alike.
pub(crate) fn cosformer_angle(position: usize, max_len: usize) -> f64 {
    std::f64::consts::FRAC_PI_2 * (position + 1) as f64 / max_len as f64
}

/// FAVOR+ positive random features, as performer-pytorch's `softmax_kernel`:
/// x' = x·d^(−1/4), φ(x) = m^(−1/2)·(exp(ω·x' − |x'|²/2 − c) + 1e-4), with c the row's
/// max of ω·x' for queries; for keys c is the running maximum kept by the engine.
#[derive(Clone, Debug)]
pub(crate) struct Favor<T> {
    /// ω, m × d row-major.
    pub omega: Vec<T>,
    pub features: usize,
    pub dim: usize,
}

/// performer-pytorch's additive constant inside the feature map.
pub(crate) const FAVOR_EPSILON: f64 = 1e-4;

impl<T: Element> Favor<T> {
    /// ω·x' for every row into `out`; returns nothing, leaves |x'|²/2 to the caller.
    fn project(&self, rows: MatRef<'_, T>, out: &mut [T]) {
        let normalizer = T::of_f64((self.dim as f64).powf(-0.25));
        matmul(
            MatMut::contiguous(out, rows.rows, self.features),
            rows,
            MatRef::contiguous(&self.omega, self.features, self.dim).t(),
            false,
            normalizer,
        );
    }

    fn half_norm_squared(&self, x: &[T]) -> T {
        let normalizer_sq = T::of_f64(1.0 / (self.dim as f64).sqrt());
        simd::dot(x, x) * normalizer_sq * T::of_f64(0.5)
    }

    fn ratio(&self) -> T {
        T::of_f64(1.0 / (self.features as f64).sqrt())
    }

    /// The backward of `r·exp(ω·x' − |x'|²/2 − c)` per row, with c the row's max of ω·x':
    /// `d_exp` holds the gradient of that exponential (overwritten), `d_max` adds a
    /// gradient on c (which flows to the projection it is the max of).
    fn exponential_backward(
        &self,
        rows: MatRef<'_, T>,
        d_exp: &mut [T],
        d_max: impl Fn(usize, T) -> T,
        dx: &mut [T],
    ) {
        let (m, d) = (self.features, self.dim);
        let len = rows.rows;
        let mut projection = vec![T::zero(); len * m];
        self.project(rows, &mut projection);
        let ratio = self.ratio();
        let normalizer_sq = T::of_f64(1.0 / (d as f64).sqrt());
        for i in 0..len {
            let p = &projection[i * m..(i + 1) * m];
            let diag = self.half_norm_squared(rows.row(i));
            let (argmax, max) =
                p.iter()
                    .copied()
                    .enumerate()
                    .fold((0, T::neg_infinity()), |best, (f, x)| {
                        if x > best.1 { (f, x) } else { best }
                    });
            let g = &mut d_exp[i * m..(i + 1) * m];
            // d(exp)/dp = exp; the same sum, negated, is the gradient of −|x'|²/2 − c.
            let mut total = T::zero();
            for (g, &p) in g.iter_mut().zip(p) {
                *g *= ratio * (p - diag - max).exp();
                total += *g;
            }
            g[argmax] += d_max(i, -total);
            // |x'|²/2 = |x|²·d^(−1/2)/2, so its gradient is x·d^(−1/2).
            let d_diag = -total;
            dx[i * d..(i + 1) * d]
                .iter_mut()
                .zip(rows.row(i))
                .for_each(|(g, &x)| *g += d_diag * normalizer_sq * x);
        }
        // p = d^(−1/4)·x ωᵀ.
        matmul(
            MatMut::contiguous(dx, len, d),
            MatRef::contiguous(d_exp, len, m),
            MatRef::contiguous(&self.omega, m, d),
            true,
            T::of_f64((d as f64).powf(-0.25)),
        );
    }
}

impl<T: Element> FeatureMap<T> for Favor<T> {
    fn features(&self) -> usize {
        self.features
    }
    fn queries(&self, rows: MatRef<'_, T>, _first: usize, out: &mut [T]) {
        self.project(rows, out);
        let (ratio, eps) = (self.ratio(), T::of_f64(FAVOR_EPSILON));
        for (i, phi) in out
            .chunks_exact_mut(self.features)
            .take(rows.rows)
            .enumerate()
        {
            let diag = self.half_norm_squared(rows.row(i));
            let max = simd::max(phi);
            simd::exp_affine(phi, diag + max, ratio, eps);
        }
    }
    fn keys(&self, rows: MatRef<'_, T>, _first: usize, out: &mut [T], log_scale: &mut [T]) {
        self.project(rows, out);
        let ratio = self.ratio();
        for (i, phi) in out
            .chunks_exact_mut(self.features)
            .take(rows.rows)
            .enumerate()
        {
            let diag = self.half_norm_squared(rows.row(i));
            let max = simd::max(phi);
            log_scale[i] = max;
            simd::exp_affine(phi, diag + max, ratio, T::zero());
        }
    }
    fn stabiliser(&self) -> Option<T> {
        Some(self.ratio() * T::of_f64(FAVOR_EPSILON))
    }
    fn queries_backward(&self, rows: MatRef<'_, T>, _first: usize, d_phi: &mut [T], dx: &mut [T]) {
        // A query's own max does not cancel (the +1e-4 does not scale with it).
        self.exponential_backward(rows, d_phi, |_, d_max| d_max, dx);
    }
    fn keys_backward(
        &self,
        rows: MatRef<'_, T>,
        _first: usize,
        d_features: &mut [T],
        d_log_scale: &[T],
        dx: &mut [T],
    ) {
        // A key's own max cancels against e^{cⱼ−C}; only C's gradient reaches it, and
        // only where this key holds C.
        self.exponential_backward(rows, d_features, |i, _| d_log_scale[i], dx);
    }
}

/// A positive orthogonal random matrix ω (m × d, row-major) as performer-pytorch's
/// `gaussian_orthogonal_random_matrix(m, d, scaling=0)`: blocks of d orthonormal rows
/// (Gram–Schmidt on gaussian rows, the construction of the Performer paper), the last
/// block cut to m mod d rows, each row then scaled by the norm of a fresh gaussian row.
///
/// ```
/// let omega = linattn::orthogonal_random_features(5, 3, 42);
/// assert_eq!(omega.len(), 15);
/// let dot: f64 = (0..3).map(|j| omega[j] * omega[3 + j]).sum();
/// assert!(dot.abs() < 1e-12); // rows of one block are orthogonal
/// ```
pub fn orthogonal_random_features(features: usize, dim: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut omega = Vec::with_capacity(features * dim);
    while omega.len() < features * dim {
        let block = orthonormal_rows(dim, &mut rng);
        let rows_needed = (features * dim - omega.len()) / dim;
        omega.extend_from_slice(&block[..rows_needed.min(dim) * dim]);
    }
    for row in omega.chunks_exact_mut(dim) {
        let norm = (0..dim)
            .map(|_| rng.sample::<f64, _>(StandardNormal).powi(2))
            .sum::<f64>()
            .sqrt();
        row.iter_mut().for_each(|x| *x *= norm);
    }
    omega
}

/// d × d gaussian rows made orthonormal by modified Gram–Schmidt, applied twice so the
/// rows stay orthogonal to rounding even when the gaussian rows are nearly dependent.
fn orthonormal_rows(dim: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let mut rows: Vec<f64> = (0..dim * dim)
        .map(|_| rng.sample::<f64, _>(StandardNormal))
        .collect();
    for i in 0..dim {
        for _pass in 0..2 {
            for j in 0..i {
                let (done, current) = rows.split_at_mut(i * dim);
                let basis = &done[j * dim..(j + 1) * dim];
                let row = &mut current[..dim];
                let projection: f64 = row.iter().zip(basis).map(|(a, b)| a * b).sum();
                row.iter_mut()
                    .zip(basis)
                    .for_each(|(a, b)| *a -= projection * b);
            }
        }
        let row = &mut rows[i * dim..(i + 1) * dim];
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
    }
    rows
}

/// Any of the feature maps, for code that picks one at run time.
#[derive(Clone, Debug)]
pub(crate) enum KernelMap<T> {
    EluPlusOne(EluPlusOne),
    Cosine(CosineReweighted),
    Favor(Favor<T>),
}

macro_rules! delegate {
    ($self:ident, $map:ident => $call:expr) => {
        match $self {
            KernelMap::EluPlusOne($map) => $call,
            KernelMap::Cosine($map) => $call,
            KernelMap::Favor($map) => $call,
        }
    };
}

impl<T: Element> FeatureMap<T> for KernelMap<T> {
    fn features(&self) -> usize {
        delegate!(self, map => FeatureMap::<T>::features(map))
    }
    fn queries(&self, rows: MatRef<'_, T>, first: usize, out: &mut [T]) {
        delegate!(self, map => map.queries(rows, first, out))
    }
    fn keys(&self, rows: MatRef<'_, T>, first: usize, out: &mut [T], log_scale: &mut [T]) {
        delegate!(self, map => map.keys(rows, first, out, log_scale))
    }
    fn stabiliser(&self) -> Option<T> {
        delegate!(self, map => map.stabiliser())
    }
    fn queries_backward(&self, rows: MatRef<'_, T>, first: usize, d_phi: &mut [T], dx: &mut [T]) {
        delegate!(self, map => map.queries_backward(rows, first, d_phi, dx))
    }
    fn keys_backward(
        &self,
        rows: MatRef<'_, T>,
        first: usize,
        d_features: &mut [T],
        d_log_scale: &[T],
        dx: &mut [T],
    ) {
        delegate!(self, map => map.keys_backward(rows, first, d_features, d_log_scale, dx))
    }
}
