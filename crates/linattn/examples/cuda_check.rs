//! Why this file is long: it is the whole linattn half of one GPU run, every kernel's
//! check against the f64 reference and every timing, in one process, until the checks
//! move into tests/cuda.rs's named cases and the timings into the benches.
//!
//! The GPU run's linattn half (bench/gpu_run.sh runs it beside the peers): every CUDA
//! kernel against the f64 reference on awkward shapes, then the timings of issue 5's
//! shapes against the copy bandwidth measured in the same process.
//!
//! `cuda_check [--quick] [--bench] [--profile] [--sync-each]`: `--quick` runs the checks
//! and the main causal timing only; `--bench` the timings only (while iterating on a
//! kernel that the checks have passed); `--sync-each` times as before 2026-11-24 (see
//! `SYNC_EACH_RUN`); `--profile` runs the main causal kernel a few times, then one
//! forward and backward and one performer forward, and nothing else (for `ncu`). Lines
//! start with `check`, `ceiling` or `bench` so the script can pick them out.

use half::{bf16, f16};
use linattn::cuda::{Gpu, GpuDecoder, GpuElement, GpuTensor};
use linattn::{Attention, Method, Performer, Tensor, Window, reference};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Timed runs after the warm-up; the median is reported.
const RUNS: usize = 20;
/// `--sync-each`: time each run on its own, waiting for it before issuing the next, as
/// this program did before 2026-11-24 (the host's time to issue a call then counts), so
/// that new figures can be set beside the old ones.
static SYNC_EACH_RUN: AtomicBool = AtomicBool::new(false);
/// The linear method's epsilon in the denominator (as in the library).
const EPSILON: f64 = 1e-6;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| arguments.iter().any(|a| a == name);
    SYNC_EACH_RUN.store(flag("--sync-each"), Ordering::Relaxed);
    let gpu = Gpu::open(0)?;
    println!("device {}", gpu.name());
    if flag("--profile") {
        let shape = [4, 8192, 16, 128];
        for _ in 0..3 {
            time_forward::<bf16>(&gpu, shape, 16, true)?;
        }
        profile_forward_backward(&gpu, shape)?;
        let [q, k, v, _] = training_inputs(&gpu, shape)?;
        Attention::new(Method::Performer(Performer::default())).forward(&q, &k, &v)?;
        gpu.synchronize()?;
        return Ok(());
    }
    let failures = if flag("--bench") { 0 } else { checks(&gpu)? };
    benches(&gpu, flag("--quick"))?;
    println!("checks failed: {failures}");
    if failures > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// One element type on the GPU, with the rounding its inputs and outputs go through.
trait Precision: GpuElement {
    const LABEL: &'static str;
    /// Half the spacing of values near 1: the relative error of one rounding.
    const UNIT_ROUNDOFF: f64;
    fn round(x: f64) -> f64;
}

impl Precision for f32 {
    const LABEL: &'static str = "f32";
    const UNIT_ROUNDOFF: f64 = f32::EPSILON as f64 / 2.0;
    fn round(x: f64) -> f64 {
        x as f32 as f64
    }
}

impl Precision for bf16 {
    const LABEL: &'static str = "bf16";
    const UNIT_ROUNDOFF: f64 = 1.0 / 256.0;
    fn round(x: f64) -> f64 {
        bf16::from_f64(x).to_f64()
    }
}

impl Precision for f16 {
    const LABEL: &'static str = "f16";
    const UNIT_ROUNDOFF: f64 = 1.0 / 2048.0;
    fn round(x: f64) -> f64 {
        f16::from_f64(x).to_f64()
    }
}

fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    let (diff, norm) = a.iter().zip(b).fold((0.0, 0.0), |(d, n), (&x, &y)| {
        (d + (x - y).powi(2), n + y * y)
    });
    (diff / norm).sqrt()
}

fn as_f64(x: &Tensor<f32>) -> Vec<f64> {
    x.as_slice().iter().map(|&x| x as f64).collect()
}

/// The error the peers make in `P`: PyTorch's linear attention with every tensor in `P`
/// rounds the feature maps, the state (each prefix state in the causal form), the key
/// sums, numerator, denominator and output to `P`, accumulating in f32 or better.
/// Emulated here in f64 with those roundings; the issue allows twice this error.
fn peer_error<P: Precision>(causal: bool, [q, k, v]: [&Tensor<f32>; 3], exact: &[f64]) -> f64 {
    let [batch, len, heads, dim_k] = q.shape();
    let (heads_kv, dim_v) = (k.heads(), v.head_dim());
    let group = heads / heads_kv;
    let feature = |x: f32| {
        let x = P::round(x as f64);
        P::round(if x > 0.0 { x + 1.0 } else { x.exp() })
    };
    let mut out = vec![0.0; batch * len * heads * dim_v];
    for b in 0..batch {
        for h in 0..heads {
            let g = h / group;
            let mut state = vec![0.0; dim_k * dim_v];
            let mut sums = vec![0.0; dim_k];
            let absorb = |t: usize, state: &mut [f64], sums: &mut [f64]| {
                for i in 0..dim_k {
                    let phi = feature(k.at(b, t, g, i));
                    sums[i] += phi;
                    for j in 0..dim_v {
                        state[i * dim_v + j] += phi * P::round(v.at(b, t, g, j) as f64);
                    }
                }
            };
            if !causal {
                for t in 0..len {
                    absorb(t, &mut state, &mut sums);
                }
            }
            for t in 0..len {
                if causal {
                    absorb(t, &mut state, &mut sums);
                }
                let phi_q: Vec<f64> = (0..dim_k).map(|i| feature(q.at(b, t, h, i))).collect();
                let den = P::round(
                    (0..dim_k)
                        .map(|i| phi_q[i] * P::round(sums[i]))
                        .sum::<f64>()
                        + EPSILON,
                );
                for j in 0..dim_v {
                    let num: f64 = (0..dim_k)
                        .map(|i| phi_q[i] * P::round(state[i * dim_v + j]))
                        .sum();
                    out[((b * len + t) * heads + h) * dim_v + j] = P::round(P::round(num) / den);
                }
            }
        }
    }
    relative_error(&out, exact)
}

/// The error performer-pytorch makes in `P` (non-causal): its `softmax_kernel` with ω,
/// x·d^(-1/4), the projection, |x'|²/2, the shifted exponent and the features each
/// rounded to `P`, then `linear_attention` rounding the key sums, the context kᵀv, the
/// inverse denominators and the output; products accumulate in f32 or better. Emulated
/// in f64 with those roundings.
fn performer_peer_error<P: Precision>(
    features: usize,
    seed: u64,
    [q, k, v]: [&Tensor<f32>; 3],
    exact: &[f64],
) -> f64 {
    let [batch, len, heads, dim] = q.shape();
    let (heads_kv, dim_v) = (k.heads(), v.head_dim());
    let group = heads / heads_kv;
    let omega: Vec<f64> = linattn::orthogonal_random_features(features, dim, seed)
        .into_iter()
        .map(P::round)
        .collect();
    let normalizer = (dim as f64).powf(-0.25);
    let ratio = (features as f64).powf(-0.5);
    // Projections and half norms of one row of x.
    let project = |row: &[f64]| -> (Vec<f64>, f64) {
        let scaled: Vec<f64> = row.iter().map(|&x| P::round(x * normalizer)).collect();
        let projection = omega
            .chunks_exact(dim)
            .map(|w| P::round(w.iter().zip(&scaled).map(|(a, b)| a * b).sum()))
            .collect();
        let squares: f64 = row.iter().map(|&x| P::round(x * x)).sum();
        let diag = P::round(P::round(P::round(squares) / 2.0) * normalizer * normalizer);
        (projection, diag)
    };
    let feature = |p: f64, diag: f64, top: f64| {
        let shifted = P::round(P::round(p - diag) - top);
        P::round(ratio * P::round(P::round(shifted.exp()) + 1e-4))
    };
    let row = |x: &Tensor<f32>, b, t, h| -> Vec<f64> {
        (0..x.head_dim())
            .map(|i| P::round(x.at(b, t, h, i) as f64))
            .collect()
    };
    let mut out = vec![0.0; batch * len * heads * dim_v];
    for b in 0..batch {
        for g in 0..heads_kv {
            let projected: Vec<(Vec<f64>, f64)> =
                (0..len).map(|t| project(&row(k, b, t, g))).collect();
            let top = projected
                .iter()
                .flat_map(|(p, _)| p.iter().copied())
                .fold(f64::NEG_INFINITY, f64::max);
            let mut context = vec![0.0; features * dim_v];
            let mut sums = vec![0.0; features];
            for (t, (p, diag)) in projected.iter().enumerate() {
                let values = row(v, b, t, g);
                for f in 0..features {
                    let phi = feature(p[f], *diag, top);
                    sums[f] += phi;
                    for (c, value) in values.iter().enumerate() {
                        context[f * dim_v + c] += phi * value;
                    }
                }
            }
            let context: Vec<f64> = context.into_iter().map(P::round).collect();
            let sums: Vec<f64> = sums.into_iter().map(P::round).collect();
            for h in (g * group)..((g + 1) * group) {
                for t in 0..len {
                    let (p, diag) = project(&row(q, b, t, h));
                    let top = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let phi: Vec<f64> = p.iter().map(|&x| feature(x, diag, top)).collect();
                    let inverse =
                        P::round(1.0 / P::round(phi.iter().zip(&sums).map(|(a, b)| a * b).sum()));
                    for c in 0..dim_v {
                        let num: f64 = (0..features).map(|f| phi[f] * context[f * dim_v + c]).sum();
                        out[((b * len + t) * heads + h) * dim_v + c] = P::round(num * inverse);
                    }
                }
            }
        }
    }
    relative_error(&out, exact)
}

/// One check line; returns whether it passed.
fn report(what: &str, error: f64, tolerance: f64) -> bool {
    let ok = error.is_finite() && error <= tolerance;
    let verdict = if ok { "ok" } else { "FAILED" };
    println!("check {what:<58} rel err {error:9.2e}  tolerance {tolerance:9.1e}  {verdict}");
    ok
}

/// Twice the peers' error, capped at eight roundings of `P`: where the peers' own
/// arithmetic breaks down (PyTorch's f16 denominator overflows past a few thousand
/// tokens) the cap keeps the check able to fail.
fn peer_tolerance<P: Precision>(peer_error: f64) -> f64 {
    (2.0 * peer_error).min(8.0 * P::UNIT_ROUNDOFF)
}

/// f32 inputs must match the reference to this relative error.
const F32_TOLERANCE: f64 = 1e-4;

fn random(shape: [usize; 4], seed: u64) -> Result<Tensor<f32>> {
    Ok(Tensor::<f32>::randn(shape, seed)?)
}

/// q of `shape`, and k, v of `len_k` rows, `heads_kv` heads, v of width `dim_v`.
fn inputs(
    shape: [usize; 4],
    len_k: usize,
    heads_kv: usize,
    dim_v: usize,
    seed: u64,
) -> Result<[Tensor<f32>; 3]> {
    let [b, _, _, d] = shape;
    Ok([
        random(shape, seed)?,
        random([b, len_k, heads_kv, d], seed + 1)?,
        random([b, len_k, heads_kv, dim_v], seed + 2)?,
    ])
}

/// Sides of a window: keys visible before and after each query, `None` unbounded.
type Sides = (Option<usize>, Option<usize>);

/// Which peer's arithmetic sets the 16-bit tolerances.
#[derive(Clone, Copy)]
enum Peer {
    /// PyTorch's linear attention (causal or not).
    Linear(bool),
    /// SDPA over the keys these sides (the causal mask applied) leave visible.
    Exact(Sides),
    /// performer-pytorch's non-causal FAVOR+ with these features drawn from this seed.
    Performer { features: usize, seed: u64 },
}

impl Peer {
    fn tolerance<P: Precision>(self, inputs: [&Tensor<f32>; 3], exact: &[f64]) -> f64 {
        peer_tolerance::<P>(match self {
            Peer::Linear(causal) => peer_error::<P>(causal, inputs, exact),
            Peer::Exact(sides) => exact_peer_error::<P>(sides, inputs, exact),
            Peer::Performer { features, seed } => {
                performer_peer_error::<P>(features, seed, inputs, exact)
            }
        })
    }
}

/// One case: the attention, its inputs, the f64 reference's output and the tolerances
/// for f32, bf16 and f16, computed on every core before the GPU runs (the reference is
/// written to be obviously right, not fast).
struct Judged {
    attention: Attention,
    inputs: [Tensor<f32>; 3],
    exact: Vec<f64>,
    tolerances: [f64; 3],
}

type Prepared = std::result::Result<Judged, String>;

fn judge(attention: Attention, peer: Peer, inputs: Result<[Tensor<f32>; 3]>) -> Prepared {
    let inputs = inputs.map_err(|e| e.to_string())?;
    let [q, k, v] = &inputs;
    let exact = reference::forward(&attention, &q.cast(), &k.cast(), &v.cast())
        .map_err(|e| e.to_string())?
        .into_vec();
    let tolerances = [
        F32_TOLERANCE,
        peer.tolerance::<bf16>([q, k, v], &exact),
        peer.tolerance::<f16>([q, k, v], &exact),
    ];
    Ok(Judged {
        attention,
        inputs,
        exact,
        tolerances,
    })
}

impl Judged {
    fn inputs(&self) -> [&Tensor<f32>; 3] {
        let [q, k, v] = &self.inputs;
        [q, k, v]
    }

    /// The case's description in a check line, in precision `P`.
    fn describe<P: Precision>(&self) -> String {
        let [q, k, v] = self.inputs();
        format!(
            "{} {:<6} {} q{:?} k len {} kv heads {} dv {}",
            self.attention.method().name(),
            if self.attention.is_causal() {
                "causal"
            } else {
                "full"
            },
            P::LABEL,
            q.shape(),
            k.seq_len(),
            k.heads(),
            v.head_dim()
        )
    }

    /// One forward call on the GPU in `P` against the reference.
    fn check<P: Precision>(&self, gpu: &Gpu, tolerance: f64) -> Result<bool> {
        let [q, k, v] = self.inputs();
        let upload = |x| GpuTensor::<P>::upload(gpu, x);
        let out = self
            .attention
            .forward(&upload(q)?, &upload(k)?, &upload(v)?)?
            .download()?;
        let error = relative_error(&as_f64(&out), &self.exact);
        Ok(report(&self.describe::<P>(), error, tolerance))
    }

    /// Failed checks of the forward call in f32, bf16 and f16.
    fn check_every_precision(&self, gpu: &Gpu) -> Result<usize> {
        let [f32_ok, bf16_ok, f16_ok] = [
            self.check::<f32>(gpu, self.tolerances[0])?,
            self.check::<bf16>(gpu, self.tolerances[1])?,
            self.check::<f16>(gpu, self.tolerances[2])?,
        ];
        Ok([f32_ok, bf16_ok, f16_ok].iter().filter(|&&ok| !ok).count())
    }

    /// `prompt` tokens through prefill, the rest one decode step at a time, in `P`,
    /// against the reference's one causal call over all of them.
    fn check_decode<P: Precision>(&self, gpu: &Gpu, prompt: usize, tolerance: f64) -> Result<bool> {
        let [q, k, v] = self.inputs();
        let [batch, len, _, dim_k] = q.shape();
        let part = |x: &Tensor<f32>, range| -> Result<GpuTensor<P>> {
            Ok(GpuTensor::upload(gpu, &x.slice_seq(range)?)?)
        };
        let mut decoder = GpuDecoder::<P>::new(
            gpu,
            &self.attention,
            batch,
            q.heads(),
            k.heads(),
            dim_k,
            v.head_dim(),
        )?;
        let mut pieces = vec![
            decoder
                .prefill(
                    &part(q, 0..prompt)?,
                    &part(k, 0..prompt)?,
                    &part(v, 0..prompt)?,
                )?
                .download()?,
        ];
        for t in prompt..len {
            let step = decoder.step(
                &part(q, t..t + 1)?,
                &part(k, t..t + 1)?,
                &part(v, t..t + 1)?,
            )?;
            pieces.push(step.download()?);
        }
        // The pieces back in [B, T, H, D] order.
        let row = q.heads() * v.head_dim();
        let mut out = Vec::with_capacity(self.exact.len());
        for b in 0..batch {
            for piece in &pieces {
                let rows = piece.seq_len();
                out.extend(
                    piece.as_slice()[b * rows * row..(b + 1) * rows * row]
                        .iter()
                        .map(|&x| x as f64),
                );
            }
        }
        let what = format!(
            "prefill {prompt} + decode {}: {}",
            len - prompt,
            self.describe::<P>()
        );
        Ok(report(&what, relative_error(&out, &self.exact), tolerance))
    }
}

/// The error PyTorch's SDPA makes in `P` (its FlashAttention kernel): scores and
/// their softmax in f32 from inputs in `P`, the probabilities rounded to `P` before they
/// multiply V, the output rounded to `P`. Emulated in f64; the issue allows twice this.
fn exact_peer_error<P: Precision>(
    (left, right): Sides,
    [q, k, v]: [&Tensor<f32>; 3],
    exact: &[f64],
) -> f64 {
    let [batch, len_q, heads, dim] = q.shape();
    let (len_k, heads_kv) = (k.seq_len(), k.heads());
    let scale = 1.0 / (dim as f64).sqrt();
    let round = |x: f32| P::round(x as f64);
    let mut out = vec![0.0; exact.len()];
    for b in 0..batch {
        for h in 0..heads {
            let g = h / (heads / heads_kv);
            for i in 0..len_q {
                let visible: Vec<usize> = (0..len_k)
                    .filter(|&j| {
                        left.is_none_or(|l| j + l >= i) && right.is_none_or(|r| j <= i + r)
                    })
                    .collect();
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        scale
                            * (0..dim)
                                .map(|d| round(q.at(b, i, h, d)) * round(k.at(b, j, g, d)))
                                .sum::<f64>()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..v.head_dim() {
                    let sum: f64 = visible
                        .iter()
                        .zip(&weights)
                        .map(|(&j, &w)| P::round(w) * round(v.at(b, j, g, d)))
                        .sum();
                    out[((b * len_q + i) * heads + h) * v.head_dim() + d] = P::round(sum / total);
                }
            }
        }
    }
    relative_error(&out, exact)
}

/// `window` with these sides, or plain softmax when both are unbounded.
fn exact_attention(causal: bool, (left, right): Sides) -> Attention {
    let method = if left.is_none() && right.is_none() {
        Method::softmax()
    } else {
        Method::Window(Window::new(left, right))
    };
    Attention::new(method).causal(causal)
}

/// Every case on the reference first (in parallel), then each on the GPU in turn.
fn judge_all<C: Sync>(
    cases: &[C],
    judge_one: impl Fn(usize, &C) -> Prepared + Sync,
) -> Vec<Prepared> {
    cases
        .par_iter()
        .enumerate()
        .map(|(index, case)| judge_one(index, case))
        .collect()
}

/// q's shape, the keys' length, kv heads, causal, window sides.
type ExactCase = ([usize; 4], usize, usize, bool, Sides);

fn checks(gpu: &Gpu) -> Result<usize> {
    let mut failures = 0;
    // Linear: lengths off the chunk, GQA and MQA, head dims off the tensor-core tile,
    // value dims wider than one value block, one token, and lengths split into segments.
    let linear_cases = [
        ([2, 77, 4, 32], 4, 32),
        ([1, 130, 4, 64], 2, 64),
        ([1, 200, 2, 24], 1, 40),
        ([2, 64, 3, 128], 3, 128),
        ([1, 1, 2, 16], 2, 16),
        ([1, 333, 2, 8], 2, 136),
        ([1, 2000, 2, 64], 1, 64),
        ([2, 1100, 4, 128], 2, 96),
    ];
    let both_forms: Vec<_> = linear_cases
        .into_iter()
        .enumerate()
        .flat_map(|(index, case)| [false, true].map(|causal| (index, case, causal)))
        .collect();
    let judged = judge_all(
        &both_forms,
        |_, &(index, (shape, heads_kv, dim_v), causal)| {
            let inputs = inputs(shape, shape[1], heads_kv, dim_v, 3 * index as u64);
            let attention = Attention::new(Method::linear()).causal(causal);
            judge(attention, Peer::Linear(causal), inputs)
        },
    );
    for judged in judged {
        failures += judged?.check_every_precision(gpu)?;
    }

    // Exact: query and key lengths off the tile (and unequal, without a causal mask), GQA
    // and MQA, windows narrower than a tile and wider than several, and head dims the
    // tensor cores do not take (the general kernel).
    let exact_cases: [ExactCase; 10] = [
        ([2, 77, 4, 64], 77, 2, false, (None, None)),
        ([2, 77, 4, 64], 77, 2, true, (None, None)),
        ([1, 200, 2, 128], 333, 1, false, (None, None)),
        ([1, 300, 3, 128], 300, 3, true, (None, None)),
        ([1, 1000, 2, 64], 1000, 2, true, (None, None)),
        ([1, 500, 4, 128], 500, 2, false, (Some(40), Some(7))),
        ([1, 700, 2, 64], 700, 1, true, (Some(150), None)),
        ([2, 130, 2, 128], 130, 2, false, (Some(0), Some(0))),
        ([2, 90, 4, 48], 90, 2, true, (None, None)),
        ([1, 260, 2, 96], 260, 1, false, (Some(30), None)),
    ];
    let judged = judge_all(
        &exact_cases,
        |index, &(shape, len_k, heads_kv, causal, sides)| {
            let inputs = inputs(shape, len_k, heads_kv, shape[3], 200 + 3 * index as u64);
            let (left, right) = sides;
            let visible = (left, if causal { Some(0) } else { right });
            judge(exact_attention(causal, sides), Peer::Exact(visible), inputs)
        },
    );
    for judged in judged {
        failures += judged?.check_every_precision(gpu)?;
    }

    // Performer, non-causal: feature counts from one tile to the most the kernels hold,
    // GQA, value dims off and wider than a value block, lengths split into spans.
    let performer_cases = [
        ([2, 77, 4, 64], 2, 64, 256),
        ([1, 600, 2, 128], 1, 96, 128),
        ([1, 1500, 2, 32], 2, 32, 64),
        ([2, 130, 3, 16], 3, 40, 16),
    ];
    let judged = judge_all(
        &performer_cases,
        |index, &(shape, heads_kv, dim_v, features)| {
            let inputs = inputs(shape, shape[1], heads_kv, dim_v, 400 + 3 * index as u64);
            let seed = index as u64;
            let method = Method::Performer(Performer::new(features, seed));
            let peer = Peer::Performer { features, seed };
            judge(Attention::new(method), peer, inputs)
        },
    );
    for judged in judged {
        failures += judged?.check_every_precision(gpu)?;
    }

    // Prefill then decode, each case in one precision.
    let decode_cases = [
        ([2, 150, 4, 64], 2, 129),
        ([3, 100, 2, 128], 2, 64),
        ([1, 70, 8, 32], 1, 1),
        ([1, 1700, 2, 64], 2, 1650),
    ];
    let judged = judge_all(&decode_cases, |index, &(shape, heads_kv, _)| {
        let inputs = inputs(shape, shape[1], heads_kv, shape[3], 100 + 3 * index as u64);
        judge(
            Attention::new(Method::linear()).causal(true),
            Peer::Linear(true),
            inputs,
        )
    });
    for (index, ((_, _, prompt), judged)) in decode_cases.into_iter().zip(judged).enumerate() {
        let judged = judged?;
        let tolerance = judged.tolerances[index % 3];
        let passed = match index % 3 {
            0 => judged.check_decode::<f32>(gpu, prompt, tolerance)?,
            1 => judged.check_decode::<bf16>(gpu, prompt, tolerance)?,
            _ => judged.check_decode::<f16>(gpu, prompt, tolerance)?,
        };
        failures += usize::from(!passed);
    }

    // Backward: a length inside one chunk, lengths off the chunk, several segments (and
    // their pieces), both head dims, more than one batch.
    for (index, shape) in [
        [2, 77, 3, 64],
        [1, 300, 2, 128],
        [2, 1000, 2, 64],
        [1, 2000, 2, 128],
    ]
    .into_iter()
    .enumerate()
    {
        failures += check_backward(gpu, shape, 400 + 5 * index as u64)?;
    }
    Ok(failures)
}

/// The GPU backward of causal linear attention against the CPU's in f64, on the same
/// bf16-rounded inputs and output gradient. No peer's backward is emulated here: the
/// tolerance is four roundings of bf16 for each gradient (half the forward checks' cap;
/// the first H100 run measured 0.25-0.71%).
fn check_backward(gpu: &Gpu, shape: [usize; 4], seed: u64) -> Result<usize> {
    let rounded = |x: Tensor<f32>| -> Result<Tensor<f32>> {
        let values = x
            .as_slice()
            .iter()
            .map(|&x| bf16::from_f32(x).to_f32())
            .collect();
        Ok(Tensor::from_vec(values, x.shape())?)
    };
    let [q, k, v] = inputs(shape, shape[1], shape[2], shape[3], seed)?;
    let [q, k, v, d_out] = [
        rounded(q)?,
        rounded(k)?,
        rounded(v)?,
        rounded(random(shape, seed + 3)?)?,
    ];
    let attention = Attention::new(Method::linear()).causal(true);
    let exact = attention.backward(
        &q.cast::<f64>(),
        &k.cast::<f64>(),
        &v.cast::<f64>(),
        &d_out.cast::<f64>(),
    )?;
    let upload = |x: &Tensor<f32>| GpuTensor::<bf16>::upload(gpu, x);
    let (q, k, v, d_out) = (upload(&q)?, upload(&k)?, upload(&v)?, upload(&d_out)?);
    let forward = attention.forward_training(&q, &k, &v)?;
    let gradients = attention.backward_with(&forward, &q, &k, &v, &d_out)?;
    let tolerance = 4.0 * bf16::UNIT_ROUNDOFF;
    let mut failures = 0;
    for (name, gpu_gradient, exact) in [
        ("dq", &gradients.dq, &exact.dq),
        ("dk", &gradients.dk, &exact.dk),
        ("dv", &gradients.dv, &exact.dv),
    ] {
        let error = relative_error(&as_f64(&gpu_gradient.download()?), exact.as_slice());
        let what = format!("linear backward {name} bf16 {shape:?}");
        failures += usize::from(!report(&what, error, tolerance));
    }
    Ok(failures)
}

/// Median milliseconds of a training forward and its backward (causal linear, bf16).
fn time_forward_backward(gpu: &Gpu, shape: [usize; 4]) -> Result<f64> {
    let [q, k, v, d_out] = training_inputs(gpu, shape)?;
    let attention = Attention::new(Method::linear()).causal(true);
    median_ms(gpu, || {
        let forward = attention.forward_training(&q, &k, &v)?;
        attention
            .backward_with(&forward, &q, &k, &v, &d_out)
            .map(drop)
    })
}

/// Random q, k, v and output gradient of `shape` on the GPU in bf16.
fn training_inputs(gpu: &Gpu, shape: [usize; 4]) -> Result<[GpuTensor<bf16>; 4]> {
    let upload =
        |seed| -> Result<GpuTensor<bf16>> { Ok(GpuTensor::upload(gpu, &random(shape, seed)?)?) };
    Ok([upload(1)?, upload(2)?, upload(3)?, upload(4)?])
}

/// One forward and backward call, for a profiler to take apart.
fn profile_forward_backward(gpu: &Gpu, shape: [usize; 4]) -> Result<()> {
    let [q, k, v, d_out] = training_inputs(gpu, shape)?;
    let attention = Attention::new(Method::linear()).causal(true);
    let forward = attention.forward_training(&q, &k, &v)?;
    attention.backward_with(&forward, &q, &k, &v, &d_out)?;
    gpu.synchronize()?;
    Ok(())
}

/// Median milliseconds of `run` on the GPU over RUNS runs, after three to warm up, timed
/// as the peers' `do_bench` times them (`Gpu::elapsed_runs_ms`).
fn median_ms(gpu: &Gpu, mut run: impl FnMut() -> linattn::Result<()>) -> Result<f64> {
    for _ in 0..3 {
        run()?;
    }
    gpu.synchronize()?;
    let mut times = if SYNC_EACH_RUN.load(Ordering::Relaxed) {
        (0..RUNS)
            .map(|_| gpu.elapsed_ms(&mut run))
            .collect::<linattn::Result<Vec<f64>>>()?
    } else {
        gpu.elapsed_runs_ms(RUNS, run)?
    };
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Median milliseconds of one forward call on random inputs of `shape` in `P`
/// (`heads_kv` key/value heads).
fn time_forward<P: Precision>(
    gpu: &Gpu,
    shape: [usize; 4],
    heads_kv: usize,
    causal: bool,
) -> Result<f64> {
    time_method::<P>(gpu, Method::linear(), shape, heads_kv, causal)
}

/// As [`time_forward`] for any method.
fn time_method<P: Precision>(
    gpu: &Gpu,
    method: Method,
    shape: [usize; 4],
    heads_kv: usize,
    causal: bool,
) -> Result<f64> {
    let [b, t, _, d] = shape;
    let upload = |shape, seed| -> Result<GpuTensor<P>> {
        Ok(GpuTensor::upload(gpu, &random(shape, seed)?)?)
    };
    let (q, k, v) = (
        upload(shape, 1)?,
        upload([b, t, heads_kv, d], 2)?,
        upload([b, t, heads_kv, d], 3)?,
    );
    let attention = Attention::new(method).causal(causal);
    median_ms(gpu, || attention.forward(&q, &k, &v).map(drop))
}

/// Median microseconds of one decode step, B=32 H=16 D=128, bf16 tokens, f32 state.
fn time_decode(gpu: &Gpu) -> Result<f64> {
    let (batch, heads, dim) = (32, 16, 128);
    let token = GpuTensor::<bf16>::upload(gpu, &random([batch, 1, heads, dim], 7)?)?;
    let attention = Attention::new(Method::linear()).causal(true);
    let mut decoder = GpuDecoder::<bf16>::new(gpu, &attention, batch, heads, heads, dim, dim)?;
    const STEPS: usize = 50;
    let ms = median_ms(gpu, || {
        for _ in 0..STEPS {
            decoder.step(&token, &token, &token)?;
        }
        Ok(())
    })?;
    Ok(ms * 1e3 / STEPS as f64)
}

fn benches(gpu: &Gpu, quick: bool) -> Result<()> {
    let bandwidth = gpu.copy_bandwidth()?;
    println!(
        "ceiling,d2d copy,{:.1} GB/s (read + written)",
        bandwidth / 1e9
    );
    // q, k, v read and the output written once: the floor of a memory-bound kernel.
    let floor_ms = |[b, t, h, d]: [usize; 4], element: usize| {
        4.0 * (b * t * h * d * element) as f64 / bandwidth * 1e3
    };
    let line = |what: &str, dtype: &str, shape: [usize; 4], ms: f64, element: usize| {
        let [b, t, h, d] = shape;
        let floor = floor_ms(shape, element);
        println!(
            "bench,{what},{dtype},B={b} T={t} H={h} D={d},{ms:.4} ms,floor {floor:.4} ms,{:.0}% of copy bandwidth",
            100.0 * floor / ms
        );
    };
    let main = [4, 8192, 16, 128];
    line(
        "linear causal",
        "bf16",
        main,
        time_forward::<bf16>(gpu, main, 16, true)?,
        2,
    );
    if quick {
        return Ok(());
    }
    line(
        "linear full",
        "bf16",
        main,
        time_forward::<bf16>(gpu, main, 16, false)?,
        2,
    );
    line(
        "linear causal",
        "f32",
        main,
        time_forward::<f32>(gpu, main, 16, true)?,
        4,
    );
    let narrow = [4, 8192, 16, 64];
    line(
        "linear causal",
        "bf16",
        narrow,
        time_forward::<bf16>(gpu, narrow, 16, true)?,
        2,
    );
    // Exact attention: 4 B H T^2 D flops in full (two products), half of it causal.
    for (causal, method, label) in [
        (true, Method::softmax(), "softmax causal"),
        (false, Method::softmax(), "softmax full"),
        (
            true,
            Method::Window(Window::new(Some(1024), None)),
            "window 1024 causal",
        ),
    ] {
        let ms = time_method::<bf16>(gpu, method, main, 16, causal)?;
        let [b, t, h, d] = main.map(|x| x as f64);
        let pairs = match label {
            "softmax full" => t * t,
            "softmax causal" => t * (t + 1.0) / 2.0,
            _ => t * 1025.0 - 1024.0 * 1025.0 / 2.0,
        };
        println!(
            "bench,{label},bf16,B=4 T=8192 H=16 D=128,{ms:.4} ms,{:.0} TFLOP/s",
            4.0 * b * h * d * pairs / (ms * 1e-3) / 1e12
        );
    }
    // Performer, 256 features: projections of q and k (once per value block) and the
    // two products with the state, 2 B H T (2 · value blocks · D + 2 D_v) m flops.
    let ms = time_method::<bf16>(
        gpu,
        Method::Performer(Performer::default()),
        main,
        16,
        false,
    )?;
    let [b, t, h, d] = main.map(|x| x as f64);
    println!(
        "bench,performer full 256 features,bf16,B=4 T=8192 H=16 D=128,{ms:.4} ms,{:.0} TFLOP/s",
        2.0 * b * h * t * (2.0 * 2.0 * d + 2.0 * d) * 256.0 / (ms * 1e-3) / 1e12
    );
    let state_bytes = 32.0 * 16.0 * (128.0 * 128.0 + 128.0) * 4.0;
    println!(
        "bench,linear decode step,bf16 tokens f32 state,B=32 H=16 D=128,{:.1} us,floor {:.1} us (state read + written)",
        time_decode(gpu)?,
        2.0 * state_bytes / bandwidth * 1e6
    );
    println!(
        "bench,linear causal forward+backward,bf16,B=4 T=8192 H=16 D=128,{:.4} ms",
        time_forward_backward(gpu, main)?
    );
    let million = [1, 1 << 20, 16, 128];
    line(
        "linear causal",
        "bf16",
        million,
        time_forward::<bf16>(gpu, million, 16, true)?,
        2,
    );
    Ok(())
}
