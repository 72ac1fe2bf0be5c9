//! `--device cuda`: the paths of `run`, `bench`, `decode` and `explore` that compute on
//! the GPU (feature
//! `cuda`, on by default; the binary still runs where there is no GPU and says so).

use crate::error::CliError;
use clap::ValueEnum;

/// Where a command computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// The CPU, every method.
    Cpu,
    /// The first NVIDIA GPU, through CUDA (linear, performer, softmax, window and the
    /// gated family so far; `Attention::supports` says which shapes and forms).
    Cuda,
}

/// Element type of the tensors on the GPU (inputs are read and outputs written in the
/// .npy files' own dtype either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GpuDtype {
    /// float32 throughout.
    F32,
    /// bfloat16 tensors, f32 accumulation and state.
    Bf16,
    /// float16 tensors, f32 accumulation and state.
    F16,
}

impl GpuDtype {
    /// The name records give it, as they name the CPU's `float32`.
    pub fn name(self) -> &'static str {
        match self {
            GpuDtype::F32 => "float32",
            GpuDtype::Bf16 => "bfloat16",
            GpuDtype::F16 => "float16",
        }
    }
}

#[cfg(feature = "cuda")]
mod enabled {
    use super::GpuDtype;
    use crate::error::CliError;
    use crate::gates::{self, Gate, RandomGates};
    use crate::report::{Case, Record};
    use half::{bf16, f16};
    use linattn::cuda::{Gpu, GpuDecoder, GpuElement, GpuGateInputs, GpuTensor};
    use linattn::{Attention, Tensor};
    use std::time::Duration;

    /// Timed runs of one case after the warm-up.
    const RUNS: usize = 20;

    /// `attention` on the GPU, the tensors rounded to `dtype` there; the output comes
    /// back as f32.
    pub fn forward(
        attention: &Attention,
        [q, k, v]: [&Tensor<f32>; 3],
        dtype: GpuDtype,
    ) -> Result<Tensor<f32>, CliError> {
        let gpu = Gpu::open(0)?;
        Ok(match dtype {
            GpuDtype::F32 => forward_as::<f32>(&gpu, attention, [q, k, v])?,
            GpuDtype::Bf16 => forward_as::<bf16>(&gpu, attention, [q, k, v])?,
            GpuDtype::F16 => forward_as::<f16>(&gpu, attention, [q, k, v])?,
        })
    }

    fn forward_as<T: GpuElement>(
        gpu: &Gpu,
        attention: &Attention,
        [q, k, v]: [&Tensor<f32>; 3],
    ) -> linattn::Result<Tensor<f32>> {
        let upload = |x| GpuTensor::<T>::upload(gpu, x);
        attention
            .forward(&upload(q)?, &upload(k)?, &upload(v)?)?
            .download()
    }

    /// Prefills `prompt` on the GPU, then feeds `tokens` one step at a time through the
    /// recurrent state, timing each step on the device (the token's upload is not timed).
    /// Returns the prefill's time, the steps and the bytes each token adds to the state.
    /// The gated family reads the random g and β `bench` draws ([`RandomGates`], g for
    /// `gate`), the same for every step.
    pub fn decode_steps(
        attention: &Attention,
        prompt: [&Tensor<f32>; 3],
        tokens: impl Iterator<Item = linattn::Result<[Tensor<f32>; 3]>>,
        (dtype, gate): (GpuDtype, Option<Gate>),
    ) -> Result<(Duration, Vec<crate::decode_report::Step>, usize), CliError> {
        let gpu = Gpu::open(0)?;
        match (dtype, gates::of_the_family(attention.method())) {
            (GpuDtype::F32, false) => decode_as::<f32>(&gpu, attention, prompt, tokens),
            (GpuDtype::Bf16, false) => decode_as::<bf16>(&gpu, attention, prompt, tokens),
            (GpuDtype::F16, false) => decode_as::<f16>(&gpu, attention, prompt, tokens),
            (GpuDtype::F32, true) => decode_gated_as::<f32>(&gpu, attention, prompt, tokens, gate),
            (GpuDtype::Bf16, true) => {
                decode_gated_as::<bf16>(&gpu, attention, prompt, tokens, gate)
            }
            (GpuDtype::F16, true) => decode_gated_as::<f16>(&gpu, attention, prompt, tokens, gate),
        }
    }

    /// [`decode_as`] for the gated family, through `GpuGatedDecoder`.
    fn decode_gated_as<T: GpuElement>(
        gpu: &Gpu,
        attention: &Attention,
        [q, k, v]: [&Tensor<f32>; 3],
        tokens: impl Iterator<Item = linattn::Result<[Tensor<f32>; 3]>>,
        gate: Option<Gate>,
    ) -> Result<(Duration, Vec<crate::decode_report::Step>, usize), CliError> {
        let method = attention.method();
        let [batch, prompt_len, _, dim_k] = q.shape();
        let [_, _, heads_v, dim_v] = v.shape();
        let on_gpu = |x: Option<&Tensor<f32>>| x.map(|x| GpuTensor::upload(gpu, x)).transpose();
        let gates = RandomGates::<f32>::for_call(method, gate, v.shape(), dim_k)?;
        let (g, beta) = (on_gpu(gates.inputs().g)?, on_gpu(gates.inputs().beta)?);
        let inputs = GpuGateInputs {
            g: g.as_ref(),
            beta: beta.as_ref(),
            ..GpuGateInputs::default()
        };
        let upload = |x: &Tensor<f32>| GpuTensor::<T>::upload(gpu, x);
        let (q, k, v) = (upload(q)?, upload(k)?, upload(v)?);
        let milliseconds = |ms: f64| Duration::from_secs_f64(ms * 1e-3);
        let mut decoder = None;
        let prefill = gpu.elapsed_ms(|| {
            decoder = Some(attention.prefill_gated_gpu(&q, &k, &v, &inputs)?.1);
            Ok(())
        })?;
        let mut decoder = decoder.expect("the prefill ran");
        let token_gates =
            RandomGates::<f32>::for_call(method, gate, [batch, 1, heads_v, dim_v], dim_k)?;
        let (g, beta) = (
            on_gpu(token_gates.inputs().g)?,
            on_gpu(token_gates.inputs().beta)?,
        );
        let state_bytes = batch * heads_v * dim_k * dim_v * size_of::<f32>();
        let mut steps = Vec::new();
        for (index, token) in tokens.enumerate() {
            let [q, k, v] = token?;
            let (q, k, v) = (upload(&q)?, upload(&k)?, upload(&v)?);
            let latency = gpu.elapsed_ms(|| {
                decoder
                    .step(&q, &k, &v, g.as_ref(), beta.as_ref())
                    .map(drop)
            })?;
            steps.push(crate::decode_report::Step {
                context: prompt_len + index + 1,
                latency: milliseconds(latency),
                state_bytes,
            });
        }
        Ok((milliseconds(prefill), steps, 0))
    }

    fn decode_as<T: GpuElement>(
        gpu: &Gpu,
        attention: &Attention,
        [q, k, v]: [&Tensor<f32>; 3],
        tokens: impl Iterator<Item = linattn::Result<[Tensor<f32>; 3]>>,
    ) -> Result<(Duration, Vec<crate::decode_report::Step>, usize), CliError> {
        let upload = |x: &Tensor<f32>| GpuTensor::<T>::upload(gpu, x);
        let [batch, prompt_len, heads_q, dim_k] = q.shape();
        let [_, _, heads_kv, dim_v] = v.shape();
        let mut decoder =
            GpuDecoder::<T>::new(gpu, attention, batch, heads_q, heads_kv, dim_k, dim_v)?;
        let (q, k, v) = (upload(q)?, upload(k)?, upload(v)?);
        let milliseconds = |ms: f64| Duration::from_secs_f64(ms * 1e-3);
        let prefill = gpu.elapsed_ms(|| decoder.prefill(&q, &k, &v).map(drop))?;
        let mut steps = Vec::new();
        for (index, token) in tokens.enumerate() {
            let [q, k, v] = token?;
            let (q, k, v) = (upload(&q)?, upload(&k)?, upload(&v)?);
            let latency = gpu.elapsed_ms(|| decoder.step(&q, &k, &v).map(drop))?;
            steps.push(crate::decode_report::Step {
                context: prompt_len + index + 1,
                latency: milliseconds(latency),
                state_bytes: decoder.memory().state_bytes,
            });
        }
        Ok((
            milliseconds(prefill),
            steps,
            decoder.memory().bytes_per_token,
        ))
    }

    /// The GPU `bench` opens once: the device and its copy bandwidth, the floor of these
    /// memory-bound kernels.
    pub struct Bench {
        gpu: std::sync::Arc<Gpu>,
        /// Bytes read plus written per second by a device-to-device copy.
        pub copy_bytes_per_second: f64,
    }

    impl Bench {
        pub fn open() -> Result<Self, CliError> {
            let gpu = Gpu::open(0)?;
            let copy_bytes_per_second = gpu.copy_bandwidth()?;
            Ok(Self {
                gpu,
                copy_bytes_per_second,
            })
        }

        pub fn name(&self) -> String {
            self.gpu.name()
        }

        /// Median GPU time of `attention` on these inputs (events around each call, after
        /// three warm-up calls), as a record whose floor is the inputs and output moved
        /// once at the copy bandwidth. The first warm-up's output is returned for the
        /// error against exact softmax.
        /// The gated family's methods get the random g and β `bench` draws on the CPU
        /// ([`RandomGates`], g for `gate`), uploaded in f32 as flash-linear-attention keeps
        /// them; the others are called on q, k and v alone.
        pub fn measure(
            &self,
            case: Case,
            attention: &Attention,
            [q, k, v]: [&Tensor<f32>; 3],
            (dtype, gate): (GpuDtype, Option<Gate>),
        ) -> Result<(Record, Tensor<f32>), CliError> {
            let inputs = [q, k, v];
            match dtype {
                GpuDtype::F32 => self.measure_as::<f32>(case, attention, inputs, gate),
                GpuDtype::Bf16 => self.measure_as::<bf16>(case, attention, inputs, gate),
                GpuDtype::F16 => self.measure_as::<f16>(case, attention, inputs, gate),
            }
        }

        fn measure_as<T: GpuElement>(
            &self,
            case: Case,
            attention: &Attention,
            [q, k, v]: [&Tensor<f32>; 3],
            gate: Option<Gate>,
        ) -> Result<(Record, Tensor<f32>), CliError> {
            let gpu = &self.gpu;
            let gates =
                RandomGates::<f32>::for_call(attention.method(), gate, v.shape(), q.head_dim())?;
            let on_gpu = |x: Option<&Tensor<f32>>| x.map(|x| GpuTensor::upload(gpu, x)).transpose();
            let (g, beta) = (on_gpu(gates.inputs().g)?, on_gpu(gates.inputs().beta)?);
            let gate_inputs = GpuGateInputs {
                g: g.as_ref(),
                beta: beta.as_ref(),
                ..GpuGateInputs::default()
            };
            let upload = |x| GpuTensor::<T>::upload(gpu, x);
            let (q, k, v) = (upload(q)?, upload(k)?, upload(v)?);
            let run = || match gates::of_the_family(attention.method()) {
                true => attention
                    .forward_gated_gpu(&q, &k, &v, &gate_inputs)
                    .map(|r| r.out),
                false => attention.forward(&q, &k, &v),
            };
            let output = run()?.download()?;
            for _ in 0..2 {
                run()?;
            }
            let mut times = gpu.elapsed_runs_ms(RUNS, || run().map(drop))?;
            times.sort_by(f64::total_cmp);
            let median = Duration::from_secs_f64(times[RUNS / 2] * 1e-3);
            let elements: usize = [q.shape(), k.shape(), v.shape(), q.shape()]
                .iter()
                .map(|shape| shape.iter().product::<usize>())
                .sum();
            let floor = elements as f64 * size_of::<T>() as f64 / self.copy_bytes_per_second;
            let mut record = Record::measured(
                case,
                median,
                RUNS,
                0,
                None,
                Some(Duration::from_secs_f64(floor)),
            );
            // GPU scratch is not counted by the host allocator.
            record.extra_bytes = None;
            Ok((record, output))
        }
    }
}

#[cfg(feature = "cuda")]
pub use enabled::{Bench, decode_steps, forward};

#[cfg(not(feature = "cuda"))]
mod disabled {
    use super::GpuDtype;
    use crate::error::CliError;
    use crate::report::{Case, Record};
    use linattn::{Attention, Tensor};

    fn unavailable() -> CliError {
        CliError::Usage(
            "this linattn was built without CUDA; build it with the `cuda` feature".into(),
        )
    }

    pub fn forward(
        _: &Attention,
        _: [&Tensor<f32>; 3],
        _: GpuDtype,
    ) -> Result<Tensor<f32>, CliError> {
        Err(unavailable())
    }

    pub fn decode_steps(
        _: &Attention,
        _: [&Tensor<f32>; 3],
        _: impl Iterator<Item = linattn::Result<[Tensor<f32>; 3]>>,
        _: (GpuDtype, Option<crate::gates::Gate>),
    ) -> Result<(std::time::Duration, Vec<crate::decode_report::Step>, usize), CliError> {
        Err(unavailable())
    }

    pub struct Bench {
        pub copy_bytes_per_second: f64,
    }

    impl Bench {
        pub fn open() -> Result<Self, CliError> {
            Err(unavailable())
        }

        pub fn name(&self) -> String {
            unreachable!("never opened")
        }

        pub fn measure(
            &self,
            _: Case,
            _: &Attention,
            _: [&Tensor<f32>; 3],
            _: (GpuDtype, Option<crate::gates::Gate>),
        ) -> Result<(Record, Tensor<f32>), CliError> {
            Err(unavailable())
        }
    }
}

#[cfg(not(feature = "cuda"))]
pub use disabled::{Bench, decode_steps, forward};

/// Refuses what the GPU path does not do yet, naming the option.
pub fn refuse_on_gpu(option: &str) -> CliError {
    CliError::Usage(format!(
        "{option} runs on the CPU only for now; drop --device cuda"
    ))
}
