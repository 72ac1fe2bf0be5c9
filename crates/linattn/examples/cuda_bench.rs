//! The linattn half of a GPU run's timings (bench/gpu_run.sh runs it beside the peers):
//! issue 5's shapes against the copy bandwidth measured in the same process, timed as
//! the peers' `do_bench` times them. The checks against the f64 reference are the
//! named cases of tests/cuda.rs.
//!
//! `cuda_bench [--quick] [--profile] [--sync-each] [--gated]`: `--quick` times the main
//! causal shape only; `--gated` the gated family's forward only, at issue 16's shapes
//! (`--only TEXT`: the cases whose line contains TEXT);
//! `--sync-each` times as before 2026-11-24 (see `SYNC_EACH_RUN`); `--profile` runs the
//! main causal kernel a few times, then one forward and backward and one performer
//! forward, and nothing else (for `ncu`). Lines start with `ceiling` or `bench` so the
//! script can pick them out.

use half::bf16;
use linattn::cuda::{Gpu, GpuDecoder, GpuElement, GpuGateInputs, GpuPlan, GpuTensor};
use linattn::{
    Attention, DeltaRule, GatedDeltaRule, Gla, Method, Performer, Retention, Tensor, Window,
};
use std::sync::atomic::{AtomicBool, Ordering};

/// Timed runs after the warm-up; the median is reported.
const RUNS: usize = 20;
/// `--sync-each`: time each run on its own, waiting for it before issuing the next, as
/// this program did before 2026-11-24 (the host's time to issue a call then counts), so
/// that new figures can be set beside the old ones.
static SYNC_EACH_RUN: AtomicBool = AtomicBool::new(false);

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
    if flag("--gated") {
        let only = arguments.iter().position(|a| a == "--only");
        let only = only
            .and_then(|i| arguments.get(i + 1))
            .map_or("", String::as_str);
        gated_benches(&gpu, only)?;
        return gated_decode_benches(&gpu, only);
    }
    benches(&gpu, flag("--quick"))
}

/// The gated family's forward, bf16 q, k, v and f32 gates, at issue 16's shapes: q and k
/// L2-normalised before the call, as the peers' benchmarks give them.
fn gated_benches(gpu: &Gpu, only: &str) -> Result<()> {
    let gdn = Method::GatedDeltaRule(GatedDeltaRule::default());
    let b4 = [4, 8192, 16, 16, 128];
    let cases = [
        ("gated-delta-rule", gdn.clone(), b4, false),
        (
            "gated-delta-rule",
            gdn.clone(),
            [1, 32768, 16, 32, 128],
            false,
        ),
        (
            "gated-delta-rule",
            gdn.clone(),
            [1, 65536, 16, 16, 128],
            false,
        ),
        (
            "gated-delta-rule",
            gdn.clone(),
            [8, 2048, 16, 16, 128],
            false,
        ),
        (
            "gated-delta-rule",
            gdn.clone(),
            [4, 8192, 16, 16, 64],
            false,
        ),
        (
            "gated-delta-rule",
            gdn.clone(),
            [1, 1 << 20, 16, 16, 128],
            false,
        ),
        ("gated-delta-rule (KDA)", gdn, b4, true),
        (
            "delta-rule",
            Method::DeltaRule(DeltaRule::default()),
            b4,
            false,
        ),
        ("gla (per channel)", Method::Gla(Gla::default()), b4, true),
        ("gla (per head)", Method::Gla(Gla::default()), b4, false),
        (
            "retention",
            Method::Retention(Retention::default()),
            b4,
            false,
        ),
    ];
    for (label, method, [b, t, h, hv, d], channel) in cases {
        let case = format!("{label} forward,bf16,B={b} T={t} H={h} HV={hv} D={d}");
        if !case.contains(only) {
            continue;
        }
        let upload =
            |x: Tensor<f32>| -> Result<GpuTensor<bf16>> { Ok(GpuTensor::upload(gpu, &x)?) };
        let (q, k, v) = (
            upload(unit_rows(random([b, t, h, d], 1)?))?,
            upload(unit_rows(random([b, t, h, d], 2)?))?,
            upload(random([b, t, hv, d], 3)?)?,
        );
        let width = if channel { d } else { 1 };
        let g = Tensor::from_vec(vec![-0.05f32; b * t * hv * width], [b, t, hv, width])?;
        let beta = Tensor::from_vec(vec![0.5f32; b * t * hv], [b, t, hv, 1])?;
        let (g, beta) = (GpuTensor::upload(gpu, &g)?, GpuTensor::upload(gpu, &beta)?);
        let reads = method.info().token_inputs;
        let inputs = GpuGateInputs {
            g: reads.contains(&linattn::TokenInput::LogDecay).then_some(&g),
            beta: reads
                .contains(&linattn::TokenInput::StepSize)
                .then_some(&beta),
            ..GpuGateInputs::default()
        };
        let attention = Attention::new(method).causal(true);
        let ms = median_ms(gpu, || {
            attention.forward_gated_gpu(&q, &k, &v, &inputs).map(drop)
        })?;
        println!("bench,{case},{ms:.4} ms");
    }
    Ok(())
}

/// The gated delta rule's decode step, f32 states, at issue 16's batches, against reading
/// and writing the states at the copy rate measured in the same run.
fn gated_decode_benches(gpu: &Gpu, only: &str) -> Result<()> {
    let bandwidth = gpu.copy_bandwidth()?;
    println!(
        "ceiling,d2d copy,{:.1} GB/s (read + written)",
        bandwidth / 1e9
    );
    let method = Method::GatedDeltaRule(GatedDeltaRule::default());
    let attention = Attention::new(method);
    for [b, h, hv, d] in [[32, 16, 32, 128], [256, 16, 32, 128], [32, 16, 16, 128]] {
        let case = format!("gated-delta-rule decode step,bf16 f32 state,B={b} H={h} HV={hv} D={d}");
        if !case.contains(only) {
            continue;
        }
        let mut decoder = attention.gpu_gated_decoder::<bf16>(gpu, b, [h, hv], [d, d])?;
        let upload =
            |x: Tensor<f32>| -> Result<GpuTensor<bf16>> { Ok(GpuTensor::upload(gpu, &x)?) };
        let (q, k, v) = (
            upload(unit_rows(random([b, 1, h, d], 1)?))?,
            upload(unit_rows(random([b, 1, h, d], 2)?))?,
            upload(random([b, 1, hv, d], 3)?)?,
        );
        let g = Tensor::from_vec(vec![-0.05f32; b * hv], [b, 1, hv, 1])?;
        let beta = Tensor::from_vec(vec![0.5f32; b * hv], [b, 1, hv, 1])?;
        let (g, beta) = (GpuTensor::upload(gpu, &g)?, GpuTensor::upload(gpu, &beta)?);
        let ms = median_ms(gpu, || {
            decoder.step(&q, &k, &v, Some(&g), Some(&beta)).map(drop)
        })?;
        let floor = 2.0 * (b * hv * d * d * 4) as f64 / bandwidth * 1e3;
        println!(
            "bench,{case},{ms:.4} ms,floor {floor:.4} ms,{:.2}x the floor",
            ms / floor
        );
    }
    Ok(())
}

/// Each row of the last axis scaled to unit length.
fn unit_rows(mut x: Tensor<f32>) -> Tensor<f32> {
    let d = x.shape()[3];
    for row in x.as_mut_slice().chunks_mut(d) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
        row.iter_mut().for_each(|x| *x /= norm);
    }
    x
}

fn random(shape: [usize; 4], seed: u64) -> Result<Tensor<f32>> {
    Ok(Tensor::<f32>::randn(shape, seed)?)
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
fn time_forward<P: GpuElement>(
    gpu: &Gpu,
    shape: [usize; 4],
    heads_kv: usize,
    causal: bool,
) -> Result<f64> {
    time_method::<P>(gpu, Method::linear(), shape, heads_kv, causal)
}

/// As [`time_forward`] for any method.
fn time_method<P: GpuElement>(
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
    median_step_us(gpu, &mut decoder, &token, 50)
}

/// Median microseconds of one of `steps` decode steps of `token` in a row.
fn median_step_us(
    gpu: &Gpu,
    decoder: &mut GpuDecoder<bf16>,
    token: &GpuTensor<bf16>,
    steps: usize,
) -> Result<f64> {
    let ms = median_ms(gpu, || {
        for _ in 0..steps {
            decoder.step(token, token, token)?;
        }
        Ok(())
    })?;
    Ok(ms * 1e3 / steps as f64)
}

/// Median microseconds of one exact decode step of B=4 H=16 D=128 bf16 against a cache of
/// `context` tokens (prefilled once; each timed run's steps extend it a little).
fn time_exact_decode(gpu: &Gpu, context: usize) -> Result<f64> {
    let (batch, heads, dim) = (4, 16, 128);
    let prompt = GpuTensor::<bf16>::upload(gpu, &random([batch, context, heads, dim], 8)?)?;
    let token = GpuTensor::<bf16>::upload(gpu, &random([batch, 1, heads, dim], 9)?)?;
    let attention = Attention::new(Method::softmax()).causal(true);
    let mut decoder = GpuDecoder::<bf16>::new(gpu, &attention, batch, heads, heads, dim, dim)?;
    decoder.prefill(&prompt, &prompt, &prompt)?;
    median_step_us(gpu, &mut decoder, &token, 10)
}

/// Median milliseconds of `attention` through a [`GpuPlan`] made once.
fn time_planned(gpu: &Gpu, attention: &Attention, shape: [usize; 4]) -> Result<f64> {
    let x = GpuTensor::<bf16>::upload(gpu, &random(shape, 1)?)?;
    let plan = GpuPlan::<bf16>::new(gpu, attention, shape, shape, shape)?;
    median_ms(gpu, || plan.forward(&x, &x, &x).map(drop))
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
    let performer = Attention::new(Method::Performer(Performer::default()));
    let ms = time_planned(gpu, &performer, main)?;
    println!(
        "bench,performer full 256 features (one plan; omega uploaded once),bf16,B=4 T=8192 H=16 D=128,{ms:.4} ms,{:.0} TFLOP/s",
        2.0 * b * h * t * (2.0 * 2.0 * d + 2.0 * d) * 256.0 / (ms * 1e-3) / 1e12
    );
    let state_bytes = 32.0 * 16.0 * (128.0 * 128.0 + 128.0) * 4.0;
    println!(
        "bench,linear decode step,bf16 tokens f32 state,B=32 H=16 D=128,{:.1} us,floor {:.1} us (state read + written)",
        time_decode(gpu)?,
        2.0 * state_bytes / bandwidth * 1e6
    );
    // Every key and value of the context read once: the floor of an exact decode step.
    let cache_bytes = 2.0 * 4.0 * 8192.0 * 16.0 * 128.0 * 2.0;
    println!(
        "bench,softmax decode step (context 8192),bf16,B=4 H=16 D=128,{:.1} us,floor {:.1} us (keys and values read)",
        time_exact_decode(gpu, 8192)?,
        cache_bytes / bandwidth * 1e6
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
