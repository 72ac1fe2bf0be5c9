//! The gated family's chunked forward on the GPU against the f64 recurrence: every
//! method and gate shape, grouped value heads, initial and final states, packed
//! sequences, a chunk shorter than the default where the state is wide, and the typed
//! errors of bad gates.

use half::{bf16, f16};
use linattn::cuda::{Gpu, GpuElement, GpuGateInputs, GpuTensor};
use linattn::{
    Attention, DeltaRule, Error, GateInputs, GatedDeltaRule, Gla, Method, Retention, Tensor,
    reference,
};

/// One case: q, k, v and the gates a method reads, in f64 (rounded to f32 before the GPU
/// and the reference see them, so that both start from the same values).
struct Case {
    q: Tensor<f64>,
    k: Tensor<f64>,
    v: Tensor<f64>,
    g: Option<Tensor<f64>>,
    beta: Option<Tensor<f64>>,
    initial: Tensor<f64>,
}

/// Values rounded through f32.
fn f32_rounded(x: Tensor<f64>) -> Tensor<f64> {
    x.cast::<f32>().cast()
}

fn logistic(shape: [usize; 4], seed: u64, map: fn(f64) -> f64) -> Tensor<f64> {
    let x = Tensor::<f64>::randn(shape, seed).unwrap();
    let values = x.as_slice().iter().map(|&x| map(1.0 / (1.0 + (-x).exp())));
    f32_rounded(Tensor::from_vec(values.collect(), shape).unwrap())
}

impl Case {
    /// `[b, t, h, hv, dk, dv]`, g per channel when `channel`; `sequences` states.
    fn new(sizes: [usize; 6], reads: (bool, bool), channel: bool, sequences: usize) -> Self {
        let [b, t, h, hv, dk, dv] = sizes;
        let randn = |shape, seed| f32_rounded(Tensor::<f64>::randn(shape, seed).unwrap());
        let (reads_g, reads_beta) = reads;
        Self {
            q: randn([b, t, h, dk], 1),
            k: randn([b, t, h, dk], 2),
            v: randn([b, t, hv, dv], 3),
            g: reads_g.then(|| match channel {
                true => logistic([b, t, hv, dk], 4, |s| s.ln() / 16.0),
                false => logistic([b, t, hv, 1], 4, f64::ln),
            }),
            beta: reads_beta.then(|| logistic([b, t, hv, 1], 5, |s| s)),
            initial: randn([sequences, hv, dk, dv], 6),
        }
    }

    fn reference(&self, attention: &Attention, cu_seqlens: Option<&[usize]>) -> [Tensor<f64>; 2] {
        let inputs = GateInputs {
            g: self.g.as_ref(),
            beta: self.beta.as_ref(),
            initial_state: Some(&self.initial),
            cu_seqlens,
            ..GateInputs::default()
        };
        let result =
            reference::forward_gated(attention, &self.q, &self.k, &self.v, &inputs).unwrap();
        [result.out, result.final_state]
    }

    fn on_gpu<T: GpuElement>(
        &self,
        gpu: &Gpu,
        attention: &Attention,
        cu_seqlens: Option<&[usize]>,
    ) -> linattn::Result<[Tensor<f32>; 2]> {
        let upload = |x: &Tensor<f64>| GpuTensor::<T>::upload(gpu, &x.cast()).unwrap();
        let gates = |x: &Tensor<f64>| GpuTensor::<f32>::upload(gpu, &x.cast()).unwrap();
        let (g, beta, initial) = (
            self.g.as_ref().map(gates),
            self.beta.as_ref().map(gates),
            gates(&self.initial),
        );
        let inputs = GpuGateInputs {
            g: g.as_ref(),
            beta: beta.as_ref(),
            initial_state: Some(&initial),
            cu_seqlens,
        };
        let result = attention.forward_gated_gpu(
            &upload(&self.q),
            &upload(&self.k),
            &upload(&self.v),
            &inputs,
        )?;
        Ok([result.out.download()?, result.final_state.download()?])
    }
}

/// A method of the family: its name, whether it reads g and β, and whether to give its
/// gate per head, per channel or both.
type Member = (&'static str, Method, (bool, bool), Vec<bool>);

/// Every method of the family.
fn family() -> Vec<Member> {
    let l2 = true;
    vec![
        (
            "retention",
            Method::Retention(Retention::default()),
            (false, false),
            vec![false],
        ),
        (
            "gla",
            Method::Gla(Gla::default()),
            (true, false),
            vec![false, true],
        ),
        (
            "delta-rule",
            Method::DeltaRule(DeltaRule {
                l2norm_qk: l2,
                ..DeltaRule::default()
            }),
            (false, true),
            vec![false],
        ),
        (
            "gated-delta-rule",
            Method::GatedDeltaRule(GatedDeltaRule {
                l2norm_qk: l2,
                ..GatedDeltaRule::default()
            }),
            (true, true),
            vec![false, true],
        ),
    ]
}

/// Tokens `from..from + len` of every sequence of `x` ([B, T, ·, ·]).
fn tokens(x: &Tensor<f64>, from: usize, len: usize) -> Tensor<f64> {
    let [b, t, h, d] = x.shape();
    let row = h * d;
    let mut values = Vec::with_capacity(b * len * row);
    for sequence in 0..b {
        let start = (sequence * t + from) * row;
        values.extend_from_slice(&x.as_slice()[start..start + len * row]);
    }
    Tensor::from_vec(values, [b, len, h, d]).unwrap()
}

fn max_relative(got: &Tensor<f32>, want: &Tensor<f64>) -> f64 {
    got.relative_error(want).expect("the shapes agree")
}

/// Outputs and final states in f32 within 1e-4 of the f64 recurrence, and in bf16
/// within a few of its roundings (the inputs rounded to bf16 move the result by about
/// that much), on awkward shapes: one token, a length off the chunk, d_k ≠ d_v, HV = 2H,
/// batch > 1, widths of 128, and a state too wide for shared memory whose value columns
/// are split over blocks with a partial last one (d_k 256, d_v 200 = 128 + 72).
pub fn matches_the_reference() {
    let gpu = crate::gpu();
    let sizes = [
        [1, 1, 1, 2, 8, 8],
        [2, 77, 2, 4, 16, 24],
        [1, 130, 1, 1, 64, 64],
        [1, 100, 2, 2, 128, 128],
        [1, 70, 1, 1, 256, 200],
    ];
    for (name, method, reads, gates) in family() {
        let attention = Attention::new(method).causal(true);
        for sizes in sizes {
            for &channel in &gates {
                let case = Case::new(sizes, reads, channel, sizes[0]);
                let [out, state] = case.reference(&attention, None);
                let what = format!("{name} {sizes:?} channel gate {channel}");
                let [got, got_state] = case.on_gpu::<f32>(&gpu, &attention, None).unwrap();
                for (label, got, want) in [("output", &got, &out), ("state", &got_state, &state)] {
                    let error = max_relative(got, want);
                    assert!(error < 1e-4, "{what} f32 {label}: {error:.2e}");
                }
                let [got, _] = case.on_gpu::<bf16>(&gpu, &attention, None).unwrap();
                let error = max_relative(&got, &out);
                // bf16 keeps 8 bits: its inputs and output alone are off by 2^-9 each.
                assert!(error < 3e-2, "{what} bf16 output: {error:.2e}");
            }
        }
    }
}

/// The tensor-core path (16-bit q, k, v, d_k and d_v of 64 or 128, a gate per head or
/// none) against the f64 recurrence, outputs and final states: HV = 2H with d_k ≠ d_v,
/// a 128-wide value head split over two blocks, a length off the chunk, exact chunks,
/// one token, batch > 1; bf16 and f16. Its intermediate products (P, W, U, the state as
/// an operand) are rounded to the input type, as flash-linear-attention's are, so the
/// bound is a few of that type's roundings.
pub fn tensor_cores_match_the_reference() {
    let gpu = crate::gpu();
    let sizes = [
        [2, 200, 2, 4, 128, 64],
        [1, 333, 1, 2, 64, 128],
        [1, 128, 2, 2, 128, 128],
        [3, 1, 1, 1, 64, 64],
    ];
    for (name, method, reads, _) in family() {
        let attention = Attention::new(method).causal(true);
        for sizes in sizes {
            let case = Case::new(sizes, reads, false, sizes[0]);
            let [out, state] = case.reference(&attention, None);
            let what = format!("{name} {sizes:?}");
            let [got, got_state] = case.on_gpu::<bf16>(&gpu, &attention, None).unwrap();
            for (label, got, want) in [("output", &got, &out), ("state", &got_state, &state)] {
                let error = max_relative(got, want);
                assert!(error < 2e-2, "{what} bf16 {label}: {error:.2e}");
            }
            let [got, got_state] = case.on_gpu::<f16>(&gpu, &attention, None).unwrap();
            for (label, got, want) in [("output", &got, &out), ("state", &got_state, &state)] {
                let error = max_relative(got, want);
                assert!(error < 4e-3, "{what} f16 {label}: {error:.2e}");
            }
        }
    }
    // Packed sequences on the tensor cores: W's chunks are numbered across sequences.
    let cu = [0, 1, 70, 77, 200, 333];
    for (name, method, reads, _) in family() {
        let attention = Attention::new(method).causal(true);
        let case = Case::new([1, 333, 2, 2, 64, 64], reads, false, cu.len() - 1);
        let [out, state] = case.reference(&attention, Some(&cu));
        let [got, got_state] = case.on_gpu::<bf16>(&gpu, &attention, Some(&cu)).unwrap();
        for (label, got, want) in [("output", &got, &out), ("state", &got_state, &state)] {
            let error = max_relative(got, want);
            assert!(error < 2e-2, "{name} packed bf16 {label}: {error:.2e}");
        }
    }
}

/// The GPU decode step against the CPU's f64 decoder, token by token, outputs and states:
/// every method and gate shape, HV = 2H, value columns split over blocks with a partial
/// last one (d_v 40), widths of 128; then a prompt prefilled on the GPU and continued by a
/// step equals the recurrence over prompt and token, and a bad g is named.
pub fn decode_steps_match_the_cpu_decoder() {
    let gpu = crate::gpu();
    for (name, method, reads, gates) in family() {
        let attention = Attention::new(method).causal(true);
        for [b, h, hv, dk, dv] in [[3, 2, 4, 48, 40], [2, 1, 1, 128, 128]] {
            for &channel in &gates {
                let mut cpu = attention.gated_decoder::<f64>(b, h, hv, dk, dv).unwrap();
                let mut on_gpu = attention
                    .gpu_gated_decoder::<f32>(&gpu, b, [h, hv], [dk, dv])
                    .unwrap();
                for step in 0..5 {
                    let case = Case::new([b, 1, h, hv, dk, dv], reads, channel, b);
                    let q = case.q.as_slice().iter().map(|x| x * (1.0 + step as f64));
                    let q = Tensor::from_vec(q.collect(), case.q.shape()).unwrap();
                    let case = Case { q, ..case };
                    let want = cpu
                        .step(
                            &case.q,
                            &case.k,
                            &case.v,
                            case.g.as_ref(),
                            case.beta.as_ref(),
                        )
                        .unwrap();
                    let up = |x: &Tensor<f64>| GpuTensor::<f32>::upload(&gpu, &x.cast()).unwrap();
                    let (g, beta) = (case.g.as_ref().map(up), case.beta.as_ref().map(up));
                    let got = on_gpu
                        .step(
                            &up(&case.q),
                            &up(&case.k),
                            &up(&case.v),
                            g.as_ref(),
                            beta.as_ref(),
                        )
                        .unwrap()
                        .download()
                        .unwrap();
                    let what = format!(
                        "{name} [{b}, {h}, {hv}, {dk}, {dv}] channel {channel} step {step}"
                    );
                    let error = max_relative(&got, &want);
                    assert!(error < 1e-4, "{what} output: {error:.2e}");
                    let states = on_gpu.states().download().unwrap();
                    let error = max_relative(&states, cpu.state());
                    assert!(error < 1e-4, "{what} state: {error:.2e}");
                }
            }
        }
    }
    // A prompt prefilled on the GPU, then one step: the recurrence over all 101 tokens.
    let method = Method::GatedDeltaRule(GatedDeltaRule {
        l2norm_qk: true,
        ..GatedDeltaRule::default()
    });
    let attention = Attention::new(method).causal(true);
    let case = Case::new([2, 101, 2, 2, 64, 64], (true, true), false, 2);
    let case = Case {
        initial: Tensor::zeros([2, 2, 64, 64]).unwrap(),
        ..case
    };
    let [want, _] = case.reference(&attention, None);
    let up = |x: Tensor<f64>| GpuTensor::<f32>::upload(&gpu, &x.cast()).unwrap();
    let prompt = |x: &Tensor<f64>| up(tokens(x, 0, 100));
    let token = |x: &Tensor<f64>| up(tokens(x, 100, 1));
    let gates =
        |x: &Option<Tensor<f64>>, f: &dyn Fn(&Tensor<f64>) -> GpuTensor<f32>| x.as_ref().map(f);
    let (g, beta) = (gates(&case.g, &prompt), gates(&case.beta, &prompt));
    let inputs = GpuGateInputs {
        g: g.as_ref(),
        beta: beta.as_ref(),
        ..GpuGateInputs::default()
    };
    let (_, mut decoder) = attention
        .prefill_gated_gpu(
            &prompt(&case.q),
            &prompt(&case.k),
            &prompt(&case.v),
            &inputs,
        )
        .unwrap();
    let (g, beta) = (gates(&case.g, &token), gates(&case.beta, &token));
    let got = decoder
        .step(
            &token(&case.q),
            &token(&case.k),
            &token(&case.v),
            g.as_ref(),
            beta.as_ref(),
        )
        .unwrap()
        .download()
        .unwrap();
    let error = max_relative(&got, &tokens(&want, 100, 1));
    assert!(error < 1e-4, "prefill then step: {error:.2e}");
    assert_eq!(decoder.position(), 101);
    // A positive log decay is named at its place, as the forward names it.
    let mut g = tokens(case.g.as_ref().unwrap(), 100, 1);
    g.as_mut_slice()[3] = 0.5;
    let error = decoder
        .step(
            &token(&case.q),
            &token(&case.k),
            &token(&case.v),
            Some(&up(g)),
            beta.as_ref(),
        )
        .err()
        .expect("a positive log decay is refused");
    assert!(
        matches!(&error, Error::OutOfRange { tensor: "g", index, .. } if index == &[1, 0, 1, 0]),
        "{error}"
    );
}

/// Sequences packed along a batch of one, each from its own state, equal the recurrence
/// over each; lengths of one token and past several chunks.
pub fn packed_sequences_match_the_reference() {
    let gpu = crate::gpu();
    let cu = [0, 1, 70, 77, 200];
    for (name, method, reads, gates) in family() {
        let attention = Attention::new(method).causal(true);
        for &channel in &gates {
            let case = Case::new([1, 200, 2, 4, 16, 8], reads, channel, cu.len() - 1);
            let [out, state] = case.reference(&attention, Some(&cu));
            let [got, got_state] = case.on_gpu::<f32>(&gpu, &attention, Some(&cu)).unwrap();
            for (label, got, want) in [("output", &got, &out), ("state", &got_state, &state)] {
                let error = max_relative(got, want);
                assert!(
                    error < 1e-4,
                    "{name} channel {channel} packed {label}: {error:.2e}"
                );
            }
        }
    }
}

/// A positive log decay, a β past its bound and wrong shapes are the typed errors the
/// CPU gives, naming the first bad position.
pub fn bad_gates_are_named() {
    let gpu = crate::gpu();
    let method = Method::GatedDeltaRule(GatedDeltaRule::default());
    let attention = Attention::new(method).causal(true);
    let mut case = Case::new([1, 40, 2, 2, 16, 16], (true, true), true, 1);
    case.g.as_mut().unwrap().as_mut_slice()[(33 * 2 + 1) * 16 + 5] = 0.5;
    case.g.as_mut().unwrap().as_mut_slice()[(35 * 2) * 16] = 0.25;
    let error = case.on_gpu::<f32>(&gpu, &attention, None).unwrap_err();
    assert!(
        matches!(&error, Error::OutOfRange { tensor: "g", index, .. } if index == &[0, 33, 1, 5]),
        "{error}"
    );
    let mut case = Case::new([1, 40, 2, 2, 16, 16], (true, true), false, 1);
    case.beta.as_mut().unwrap().as_mut_slice()[7] = 1.5;
    let error = case.on_gpu::<f32>(&gpu, &attention, None).unwrap_err();
    assert!(
        matches!(&error, Error::OutOfRange { tensor: "beta", index, .. } if index == &[0, 3, 1, 0]),
        "{error}"
    );
    // The same on the tensor-core path, whose prepare pass reads β and scan reads g.
    let mut case = Case::new([1, 100, 1, 2, 64, 64], (true, true), false, 1);
    case.g.as_mut().unwrap().as_mut_slice()[2 * 90 + 1] = 0.5;
    case.beta.as_mut().unwrap().as_mut_slice()[2 * 95] = -0.5;
    let error = case.on_gpu::<bf16>(&gpu, &attention, None).unwrap_err();
    assert!(
        matches!(&error, Error::OutOfRange { tensor: "g", index, .. } if index == &[0, 90, 1, 0]),
        "{error}"
    );
    case.g = Case::new([1, 100, 1, 2, 64, 64], (true, true), false, 1).g;
    let error = case.on_gpu::<bf16>(&gpu, &attention, None).unwrap_err();
    assert!(
        matches!(&error, Error::OutOfRange { tensor: "beta", index, .. } if index == &[0, 95, 0, 0]),
        "{error}"
    );
    let case = Case::new([1, 40, 2, 2, 16, 16], (true, true), false, 2);
    let error = case.on_gpu::<f32>(&gpu, &attention, None).unwrap_err();
    assert!(matches!(error, Error::ShapeMismatch { .. }), "{error}");
    let case = Case::new([1, 40, 2, 2, 16, 16], (false, true), false, 1);
    let error = case.on_gpu::<f32>(&gpu, &attention, None).unwrap_err();
    assert!(matches!(error, Error::MissingInput { .. }), "{error}");
}
