//! The GPU run's linattn half (bench/gpu_run.sh runs it beside the peers): every CUDA
//! kernel against the f64 reference on awkward shapes, then the timings of issue 5's
//! shapes against the copy bandwidth measured in the same process.
//!
//! `cuda_check [--quick] [--profile]`: `--quick` runs the checks and the main causal
//! timing only; `--profile` runs the main causal kernel a few times and nothing else (for
//! `ncu`). Lines start with `check`, `ceiling` or `bench` so the script can pick them out.

use half::{bf16, f16};
use linattn::cuda::{Gpu, GpuElement, GpuLinearState, GpuTensor};
use linattn::{Attention, Method, Tensor, Window, reference};
use rayon::prelude::*;

/// Timed runs after the warm-up; the median is reported.
const RUNS: usize = 20;
/// The linear method's epsilon in the denominator (as in the library).
const EPSILON: f64 = 1e-6;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| arguments.iter().any(|a| a == name);
    let gpu = Gpu::open(0)?;
    println!("device {}", gpu.name());
    if flag("--profile") {
        let shape = [4, 8192, 16, 128];
        for _ in 0..3 {
            time_forward::<bf16>(&gpu, shape, 16, true)?;
        }
        return Ok(());
    }
    let failures = checks(&gpu)? + exact_checks(&gpu)?;
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

fn tolerance<P: Precision>(causal: bool, inputs: [&Tensor<f32>; 3], exact: &[f64]) -> f64 {
    if P::LABEL == "f32" {
        1e-4
    } else {
        peer_tolerance::<P>(peer_error::<P>(causal, inputs, exact))
    }
}

fn random(shape: [usize; 4], seed: u64) -> Result<Tensor<f32>> {
    Ok(Tensor::<f32>::randn(shape, seed)?)
}

/// Linear attention on the GPU in `P` against `exact`, the f64 reference's output.
fn check_forward<P: Precision>(
    gpu: &Gpu,
    causal: bool,
    [q, k, v]: [&Tensor<f32>; 3],
    (exact, tolerance): (&[f64], f64),
) -> Result<bool> {
    let attention = Attention::new(Method::linear()).causal(causal);
    let upload = |x| GpuTensor::<P>::upload(gpu, x);
    let out = attention
        .forward_cuda(gpu, &upload(q)?, &upload(k)?, &upload(v)?)?
        .download()?;
    let what = format!(
        "linear {:<6} {} q{:?} kv heads {} dv {}",
        if causal { "causal" } else { "full" },
        P::LABEL,
        q.shape(),
        k.heads(),
        v.head_dim()
    );
    Ok(report(
        &what,
        relative_error(&as_f64(&out), exact),
        tolerance,
    ))
}

/// `prompt` tokens through prefill, the rest one decode step at a time, against one
/// causal reference call over all of them.
fn check_decode<P: Precision>(
    gpu: &Gpu,
    prompt: usize,
    [q, k, v]: [&Tensor<f32>; 3],
    (exact, tolerance): (&[f64], f64),
) -> Result<bool> {
    let [batch, len, _, dim_k] = q.shape();
    let attention = Attention::new(Method::linear()).causal(true);
    let part = |x: &Tensor<f32>, range| -> Result<GpuTensor<P>> {
        Ok(GpuTensor::upload(gpu, &x.slice_seq(range)?)?)
    };
    let mut state = GpuLinearState::zeros(gpu, batch, k.heads(), dim_k, v.head_dim())?;
    let mut pieces = vec![
        attention
            .prefill_cuda(
                gpu,
                &part(q, 0..prompt)?,
                &part(k, 0..prompt)?,
                &part(v, 0..prompt)?,
                &mut state,
            )?
            .download()?,
    ];
    for t in prompt..len {
        let step = attention.decode_step_cuda(
            gpu,
            &part(q, t..t + 1)?,
            &part(k, t..t + 1)?,
            &part(v, t..t + 1)?,
            &mut state,
        )?;
        pieces.push(step.download()?);
    }
    // The pieces back in [B, T, H, D] order.
    let row = q.heads() * v.head_dim();
    let mut out = Vec::with_capacity(exact.len());
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
        "prefill {prompt} + decode {} {} q{:?} kv heads {}",
        len - prompt,
        P::LABEL,
        q.shape(),
        k.heads()
    );
    Ok(report(&what, relative_error(&out, exact), tolerance))
}

/// Linear and exact attention's f64 reference and the tolerances of `P` in
/// the precisions checked, computed on every core before the GPU runs: the reference is
/// written to be obviously right, not fast.
struct Judged {
    inputs: [Tensor<f32>; 3],
    exact: Vec<f64>,
    /// Tolerances for f32, bf16, f16.
    tolerances: [f64; 3],
}

type Prepared = std::result::Result<Judged, String>;

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

/// The linear method's judgement of `inputs`.
fn judge_linear(causal: bool, inputs: [Tensor<f32>; 3]) -> Prepared {
    let attention = Attention::new(Method::linear()).causal(causal);
    let [q, k, v] = &inputs;
    let exact = reference::forward(&attention, &q.cast(), &k.cast(), &v.cast())
        .map_err(|e| e.to_string())?
        .into_vec();
    let tolerances = [
        tolerance::<f32>(causal, [q, k, v], &exact),
        tolerance::<bf16>(causal, [q, k, v], &exact),
        tolerance::<f16>(causal, [q, k, v], &exact),
    ];
    Ok(Judged {
        inputs,
        exact,
        tolerances,
    })
}

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

/// Exact attention (`window` with the given sides; both `None` is plain softmax) on
/// the GPU in `P` against the f64 reference.
fn check_exact<P: Precision>(
    gpu: &Gpu,
    causal: bool,
    (left, right): Sides,
    [q, k, v]: [&Tensor<f32>; 3],
    (exact, tolerance): (&[f64], f64),
) -> Result<bool> {
    let attention = exact_attention(causal, (left, right));
    let upload = |x| GpuTensor::<P>::upload(gpu, x);
    let out = attention
        .forward_cuda(gpu, &upload(q)?, &upload(k)?, &upload(v)?)?
        .download()?;
    let what = format!(
        "{} {:<6} {} q{:?} k len {} kv heads {}",
        attention.method().name(),
        if causal { "causal" } else { "full" },
        P::LABEL,
        q.shape(),
        k.seq_len(),
        k.heads(),
    );
    Ok(report(
        &what,
        relative_error(&as_f64(&out), exact),
        tolerance,
    ))
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

fn judge_exact(causal: bool, (left, right): Sides, inputs: [Tensor<f32>; 3]) -> Prepared {
    let attention = exact_attention(causal, (left, right));
    let [q, k, v] = &inputs;
    let exact = reference::forward(&attention, &q.cast(), &k.cast(), &v.cast())
        .map_err(|e| e.to_string())?
        .into_vec();
    let sides = (left, if causal { Some(0) } else { right });
    let tolerances = [
        1e-4,
        peer_tolerance::<bf16>(exact_peer_error::<bf16>(sides, [q, k, v], &exact)),
        peer_tolerance::<f16>(exact_peer_error::<f16>(sides, [q, k, v], &exact)),
    ];
    Ok(Judged {
        inputs,
        exact,
        tolerances,
    })
}

/// Sides of a window: keys visible before and after each query, `None` unbounded.
type Sides = (Option<usize>, Option<usize>);
/// q's shape, the keys' length, kv heads, causal, window sides.
type ExactCase = ([usize; 4], usize, usize, bool, Sides);

fn exact_checks(gpu: &Gpu) -> Result<usize> {
    let mut failures = 0;
    // Query and key lengths off the tile (and unequal, without a causal mask), GQA and
    // MQA, windows narrower than a tile and wider than several.
    let cases: [ExactCase; 10] = [
        ([2, 77, 4, 64], 77, 2, false, (None, None)),
        ([2, 77, 4, 64], 77, 2, true, (None, None)),
        ([1, 200, 2, 128], 333, 1, false, (None, None)),
        ([1, 300, 3, 128], 300, 3, true, (None, None)),
        ([1, 1000, 2, 64], 1000, 2, true, (None, None)),
        ([1, 500, 4, 128], 500, 2, false, (Some(40), Some(7))),
        ([1, 700, 2, 64], 700, 1, true, (Some(150), None)),
        ([2, 130, 2, 128], 130, 2, false, (Some(0), Some(0))),
        // Head dims the tensor cores do not take: the general kernel.
        ([2, 90, 4, 48], 90, 2, true, (None, None)),
        ([1, 260, 2, 96], 260, 1, false, (Some(30), None)),
    ];
    let judged: Vec<Prepared> = cases
        .par_iter()
        .enumerate()
        .map(|(index, &(shape, len_k, heads_kv, causal, sides))| {
            let seed = 200 + 3 * index as u64;
            let inputs =
                inputs(shape, len_k, heads_kv, shape[3], seed).map_err(|e| e.to_string())?;
            judge_exact(causal, sides, inputs)
        })
        .collect();
    for ((_, _, _, causal, sides), judged) in cases.into_iter().zip(judged) {
        let Judged {
            inputs: [q, k, v],
            exact,
            tolerances,
        } = judged?;
        let inputs = [&q, &k, &v];
        let passed = [
            check_exact::<f32>(gpu, causal, sides, inputs, (&exact, tolerances[0]))?,
            check_exact::<bf16>(gpu, causal, sides, inputs, (&exact, tolerances[1]))?,
            check_exact::<f16>(gpu, causal, sides, inputs, (&exact, tolerances[2]))?,
        ];
        failures += passed.iter().filter(|&&ok| !ok).count();
    }
    Ok(failures)
}

fn checks(gpu: &Gpu) -> Result<usize> {
    let mut failures = 0;
    // Lengths off the chunk, GQA and MQA, head dims off the tensor-core tile, value dims
    // wider than one value block, one token, and lengths split into segments.
    let cases = [
        ([2, 77, 4, 32], 4, 32),
        ([1, 130, 4, 64], 2, 64),
        ([1, 200, 2, 24], 1, 40),
        ([2, 64, 3, 128], 3, 128),
        ([1, 1, 2, 16], 2, 16),
        ([1, 333, 2, 8], 2, 136),
        ([1, 2000, 2, 64], 1, 64),
        ([2, 1100, 4, 128], 2, 96),
    ];
    let judged: Vec<Prepared> = cases
        .par_iter()
        .enumerate()
        .flat_map(|(index, &(shape, heads_kv, dim_v))| {
            [false, true].map(|causal| {
                let seed = 3 * index as u64;
                let inputs =
                    inputs(shape, shape[1], heads_kv, dim_v, seed).map_err(|e| e.to_string())?;
                judge_linear(causal, inputs)
            })
        })
        .collect();
    for (judged, causal) in judged.into_iter().zip([false, true].into_iter().cycle()) {
        let Judged {
            inputs: [q, k, v],
            exact,
            tolerances,
        } = judged?;
        let inputs = [&q, &k, &v];
        let passed = [
            check_forward::<f32>(gpu, causal, inputs, (&exact, tolerances[0]))?,
            check_forward::<bf16>(gpu, causal, inputs, (&exact, tolerances[1]))?,
            check_forward::<f16>(gpu, causal, inputs, (&exact, tolerances[2]))?,
        ];
        failures += passed.iter().filter(|&&ok| !ok).count();
    }
    let decode_cases = [
        ([2, 150, 4, 64], 2, 129),
        ([3, 100, 2, 128], 2, 64),
        ([1, 70, 8, 32], 1, 1),
        ([1, 1700, 2, 64], 2, 1650),
    ];
    let judged: Vec<Prepared> = decode_cases
        .par_iter()
        .enumerate()
        .map(|(index, &(shape, heads_kv, _))| {
            let seed = 100 + 3 * index as u64;
            let inputs =
                inputs(shape, shape[1], heads_kv, shape[3], seed).map_err(|e| e.to_string())?;
            judge_linear(true, inputs)
        })
        .collect();
    for (index, ((_, _, prompt), judged)) in decode_cases.into_iter().zip(judged).enumerate() {
        let Judged {
            inputs: [q, k, v],
            exact,
            tolerances,
        } = judged?;
        let inputs = [&q, &k, &v];
        let passed = match index % 3 {
            0 => check_decode::<f32>(gpu, prompt, inputs, (&exact, tolerances[0]))?,
            1 => check_decode::<bf16>(gpu, prompt, inputs, (&exact, tolerances[1]))?,
            _ => check_decode::<f16>(gpu, prompt, inputs, (&exact, tolerances[2]))?,
        };
        failures += usize::from(!passed);
    }
    Ok(failures)
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
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
    let run = || attention.forward_cuda(gpu, &q, &k, &v).map(drop);
    for _ in 0..3 {
        run()?;
    }
    gpu.synchronize()?;
    let times = (0..RUNS)
        .map(|_| gpu.elapsed_ms(run))
        .collect::<linattn::Result<Vec<f64>>>()?;
    Ok(median(times))
}

/// Median microseconds of one decode step, B=32 H=16 D=128, bf16 tokens, f32 state.
fn time_decode(gpu: &Gpu) -> Result<f64> {
    let (batch, heads, dim) = (32, 16, 128);
    let token = GpuTensor::<bf16>::upload(gpu, &random([batch, 1, heads, dim], 7)?)?;
    let mut state = GpuLinearState::zeros(gpu, batch, heads, dim, dim)?;
    let attention = Attention::new(Method::linear()).causal(true);
    const STEPS: usize = 50;
    let mut steps = || -> linattn::Result<()> {
        for _ in 0..STEPS {
            attention.decode_step_cuda(gpu, &token, &token, &token, &mut state)?;
        }
        Ok(())
    };
    steps()?;
    gpu.synchronize()?;
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        times.push(gpu.elapsed_ms(&mut steps)? * 1e3 / STEPS as f64);
    }
    Ok(median(times))
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
    let state_bytes = 32.0 * 16.0 * (128.0 * 128.0 + 128.0) * 4.0;
    println!(
        "bench,linear decode step,bf16 tokens f32 state,B=32 H=16 D=128,{:.1} us,floor {:.1} us (state read + written)",
        time_decode(gpu)?,
        2.0 * state_bytes / bandwidth * 1e6
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
