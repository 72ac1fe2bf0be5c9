//! The CUDA backend against the f64 reference. Built with `--features cuda`. Where no GPU
//! can be opened (CI has none) the tests that need one are reported as ignored, with a
//! line on stderr saying why, and the others check that the backend builds and that its
//! absence is a typed error. Beside the tests here, gpu_checks/ holds a named case per
//! kernel family, shape and element type. A custom harness (libtest-mimic): the
//! standard one cannot decide at run time that a test is skipped.

mod gpu_checks;

use half::bf16;
use libtest_mimic::{Arguments, Failed, Trial};
use linattn::cuda::{Gpu, GpuDecoder, GpuElement, GpuPlan, GpuTensor};
use linattn::{Attention, Cosformer, Error, Method, Performer, Tensor, Window, reference};
use std::process::ExitCode;
use std::sync::Arc;

/// The tests that need a GPU, by name.
const GPU_TESTS: &[(&str, fn())] = &[
    (
        "f32_forward_matches_the_reference_full_and_causal",
        f32_forward_matches_the_reference_full_and_causal,
    ),
    (
        "performer_matches_the_reference_and_refuses_what_it_does_not_take",
        performer_matches_the_reference_and_refuses_what_it_does_not_take,
    ),
    (
        "exact_attention_matches_the_reference_full_causal_and_windowed",
        exact_attention_matches_the_reference_full_causal_and_windowed,
    ),
    (
        "exact_attention_in_f32_and_odd_dims_takes_the_general_kernel",
        exact_attention_in_f32_and_odd_dims_takes_the_general_kernel,
    ),
    (
        "prefill_then_decode_equals_one_causal_call",
        prefill_then_decode_equals_one_causal_call,
    ),
    (
        "plans_keep_what_they_prepared_and_refuse_other_shapes",
        plans_keep_what_they_prepared_and_refuse_other_shapes,
    ),
    ("misuse_is_named", misuse_is_named),
    (
        "non_finite_and_out_of_range_uploads_are_refused",
        non_finite_and_out_of_range_uploads_are_refused,
    ),
    (
        "backward_matches_the_cpu_backward_and_names_what_it_does_not_take",
        backward_matches_the_cpu_backward_and_names_what_it_does_not_take,
    ),
    (
        "gated_family_matches_the_reference",
        gpu_checks::gated::matches_the_reference,
    ),
    (
        "gated_family_on_tensor_cores_matches_the_reference",
        gpu_checks::gated::tensor_cores_match_the_reference,
    ),
    (
        "gated_family_packed_sequences_match_the_reference",
        gpu_checks::gated::packed_sequences_match_the_reference,
    ),
    (
        "gated_family_decode_steps_match_the_cpu_decoder",
        gpu_checks::gated::decode_steps_match_the_cpu_decoder,
    ),
    (
        "gated_family_bad_gates_are_named",
        gpu_checks::gated::bad_gates_are_named,
    ),
];

fn main() -> ExitCode {
    let arguments = Arguments::from_args();
    let missing = Gpu::open(0).err();
    if let Some(error) = &missing {
        eprintln!(
            "cuda tests: no usable GPU ({error}); the {} tests that need one are skipped \
             (counted as ignored below)",
            GPU_TESTS.len()
        );
    }
    let mut trials = vec![Trial::test(
        "a_missing_gpu_is_a_typed_error",
        run(a_missing_gpu_is_a_typed_error),
    )];
    trials.extend(
        GPU_TESTS
            .iter()
            .map(|&(name, test)| Trial::test(name, run(test)).with_ignored_flag(missing.is_some())),
    );
    trials.extend(gpu_checks::trials(Gpu::open(0).ok()));
    libtest_mimic::run(&arguments, trials).exit_code()
}

/// A test function as a trial's runner (libtest-mimic reports a panic as the failure).
fn run(test: fn()) -> impl FnOnce() -> Result<(), Failed> + Send + 'static {
    move || {
        test();
        Ok(())
    }
}

/// The GPU (these tests run only where one was found).
fn gpu() -> Arc<Gpu> {
    Gpu::open(0).expect("a GPU test runs only where a GPU can be opened")
}

fn relative_error(a: &Tensor<f32>, b: &Tensor<f64>) -> f64 {
    a.relative_error(b).expect("the shapes agree")
}

/// The relative error of `attention` on the GPU, inputs in `T`, against the f64
/// reference.
fn error_on_gpu<T: GpuElement>(
    gpu: &Gpu,
    attention: &Attention,
    [q, k, v]: [&Tensor<f32>; 3],
) -> f64 {
    let exact = reference::forward(attention, &q.cast(), &k.cast(), &v.cast()).unwrap();
    relative_error(&output_on_gpu::<T>(gpu, attention, [q, k, v]), &exact)
}

/// The output of `attention` on the GPU with inputs in `T`.
fn output_on_gpu<T: GpuElement>(
    gpu: &Gpu,
    attention: &Attention,
    [q, k, v]: [&Tensor<f32>; 3],
) -> Tensor<f32> {
    let upload = |x: &Tensor<f32>| GpuTensor::<T>::upload(gpu, x).unwrap();
    attention
        .forward(&upload(q), &upload(k), &upload(v))
        .unwrap()
        .download()
        .unwrap()
}

fn a_missing_gpu_is_a_typed_error() {
    if let Err(error) = Gpu::open(0) {
        assert!(matches!(error, Error::Cuda(_)), "{error:?}");
        assert!(error.to_string().starts_with("CUDA: "), "{error}");
    }
}

fn f32_forward_matches_the_reference_full_and_causal() {
    let gpu = gpu();
    // Lengths that are not a multiple of the chunk, GQA, a head dim off the tile, and a
    // sequence long enough to be split into segments.
    for (shape, heads_kv, seed) in [
        ([2, 77, 4, 32], 2, 1),
        ([1, 131, 3, 24], 3, 2),
        ([1, 1500, 2, 64], 1, 3),
    ] {
        let [b, t, _, d] = shape;
        let q = Tensor::<f32>::randn(shape, seed).unwrap();
        let k = Tensor::<f32>::randn([b, t, heads_kv, d], seed + 10).unwrap();
        let v = Tensor::<f32>::randn([b, t, heads_kv, d], seed + 20).unwrap();
        for causal in [false, true] {
            let attention = Attention::new(Method::linear()).causal(causal);
            let error = error_on_gpu::<f32>(&gpu, &attention, [&q, &k, &v]);
            assert!(error < 1e-4, "{shape:?} causal {causal}: {error:e}");
        }
    }
}

fn performer_matches_the_reference_and_refuses_what_it_does_not_take() {
    let gpu = gpu();
    // Keys split into spans (merged at a common stabiliser), GQA, a value dim off the
    // value block; f32 and bf16 inputs against one f64 reference (the reference forms
    // the whole attention matrix: kept small).
    let (shape, heads_kv, dim_v) = ([1, 600, 2, 64], 1, 40);
    let [b, t, _, d] = shape;
    let q = Tensor::<f32>::randn(shape, 7).unwrap();
    let k = Tensor::<f32>::randn([b, t, heads_kv, d], 8).unwrap();
    let v = Tensor::<f32>::randn([b, t, heads_kv, dim_v], 9).unwrap();
    let performer = Attention::new(Method::Performer(Performer::new(64, 5)));
    let exact = reference::forward(&performer, &q.cast(), &k.cast(), &v.cast()).unwrap();
    let f32_error = relative_error(
        &output_on_gpu::<f32>(&gpu, &performer, [&q, &k, &v]),
        &exact,
    );
    assert!(f32_error < 1e-4, "f32: {f32_error:e}");
    // bf16: within eight roundings of the inputs' type.
    let bf16_error = relative_error(
        &output_on_gpu::<bf16>(&gpu, &performer, [&q, &k, &v]),
        &exact,
    );
    assert!(bf16_error < 8.0 / 256.0, "bf16: {bf16_error:e}");
    let x = GpuTensor::<f32>::upload(&gpu, &Tensor::randn([1, 8, 2, 24], 0).unwrap()).unwrap();
    for attention in [
        performer.clone().causal(true),
        // Head dims off the tensor-core tile.
        Attention::new(Method::Performer(Performer::new(64, 0))),
    ] {
        assert!(matches!(
            attention.forward(&x, &x, &x),
            Err(Error::Unsupported(_))
        ));
    }
}

fn exact_attention_matches_the_reference_full_causal_and_windowed() {
    let gpu = gpu();
    // Lengths off the 64-row tile, unequal query and key lengths without a mask, GQA.
    for (shape, len_k, heads_kv, method, causal) in [
        ([2, 90, 4, 64], 150, 2, Method::softmax(), false),
        ([1, 200, 2, 128], 200, 1, Method::softmax(), true),
        (
            [1, 300, 4, 64],
            300,
            4,
            Method::Window(Window::new(Some(37), Some(5))),
            false,
        ),
        (
            [1, 260, 2, 128],
            260,
            2,
            Method::Window(Window::new(Some(70), None)),
            true,
        ),
    ] {
        let [b, _, _, d] = shape;
        let q = Tensor::<f32>::randn(shape, 7).unwrap();
        let k = Tensor::<f32>::randn([b, len_k, heads_kv, d], 8).unwrap();
        let v = Tensor::<f32>::randn([b, len_k, heads_kv, d], 9).unwrap();
        let attention = Attention::new(method).causal(causal);
        let error = error_on_gpu::<bf16>(&gpu, &attention, [&q, &k, &v]);
        // bf16 inputs, probabilities and outputs: a few units of bf16's 2^-8 precision.
        assert!(error < 1.5e-2, "{shape:?} {attention:?}: {error:e}");
    }
}

fn exact_attention_in_f32_and_odd_dims_takes_the_general_kernel() {
    let gpu = gpu();
    // f32 to f32 accuracy; 16-bit with head dims the tensor cores do not take.
    for (shape, heads_kv, dim_v, causal, method) in [
        ([2, 70, 4, 48], 2, 48, true, Method::softmax()),
        (
            [1, 150, 2, 128],
            1,
            96,
            false,
            Method::Window(Window::new(Some(20), Some(3))),
        ),
    ] {
        let [b, t, _, d] = shape;
        let q = Tensor::<f32>::randn(shape, 11).unwrap();
        let k = Tensor::<f32>::randn([b, t, heads_kv, d], 12).unwrap();
        let v = Tensor::<f32>::randn([b, t, heads_kv, dim_v], 13).unwrap();
        let attention = Attention::new(method).causal(causal);
        let error = error_on_gpu::<f32>(&gpu, &attention, [&q, &k, &v]);
        assert!(error < 1e-4, "f32 {shape:?}: {error:e}");
        let error = error_on_gpu::<bf16>(&gpu, &attention, [&q, &k, &v]);
        assert!(error < 1.5e-2, "bf16 {shape:?}: {error:e}");
    }
}

fn prefill_then_decode_equals_one_causal_call() {
    let gpu = gpu();
    let (shape, prompt, block) = ([2, 90, 4, 64], 50, 20);
    let x = |seed| Tensor::<f32>::randn(shape, seed).unwrap();
    let (q, k, v) = (x(4), x(5), x(6));
    let attention = Attention::new(Method::linear()).causal(true);
    let whole = attention
        .forward(&q.cast::<f64>(), &k.cast(), &v.cast())
        .unwrap();
    let upload = |t: &Tensor<f32>, range: std::ops::Range<usize>| {
        GpuTensor::<bf16>::upload(&gpu, &t.slice_seq(range).unwrap()).unwrap()
    };
    let part = |range: std::ops::Range<usize>| [&q, &k, &v].map(|t| upload(t, range.clone()));
    // bf16 inputs and outputs: a few units of bf16's 2^-8 precision.
    let check = |out: GpuTensor<bf16>, range: std::ops::Range<usize>| {
        let error = relative_error(
            &out.download().unwrap(),
            &whole.slice_seq(range.clone()).unwrap(),
        );
        assert!(error < 1.5e-2, "{range:?}: {error:e}");
    };
    let [pq, pk, pv] = part(0..prompt);
    let (out, mut decoder) = attention.prefill(&pq, &pk, &pv).unwrap();
    check(out, 0..prompt);
    let bytes = decoder.memory().state_bytes;
    // A block from the state the prompt left (the initial state of a causal call).
    let [bq, bk, bv] = part(prompt..prompt + block);
    check(
        decoder.prefill(&bq, &bk, &bv).unwrap(),
        prompt..prompt + block,
    );
    for i in prompt + block..shape[1] {
        let [tq, tk, tv] = part(i..i + 1);
        check(decoder.step(&tq, &tk, &tv).unwrap(), i..i + 1);
        assert_eq!(
            decoder.memory().state_bytes,
            bytes,
            "the state must not grow"
        );
    }
    assert_eq!(decoder.positions(), vec![shape[1]; 2]);
}

fn misuse_is_named() {
    let gpu = gpu();
    let x = GpuTensor::<f32>::upload(&gpu, &Tensor::randn([1, 8, 2, 16], 0).unwrap()).unwrap();
    let cosformer = Attention::new(Method::Cosformer(Cosformer::default()));
    assert!(matches!(
        cosformer.forward(&x, &x, &x),
        Err(Error::Unsupported(_))
    ));
    let wide = GpuTensor::<f32>::upload(&gpu, &Tensor::randn([1, 8, 1, 300], 0).unwrap()).unwrap();
    assert!(matches!(
        Attention::new(Method::softmax()).forward(&wide, &wide, &wide),
        Err(Error::Unsupported(_))
    ));
    let causal = Attention::new(Method::linear()).causal(true);
    let mut decoder = GpuDecoder::<f32>::new(&gpu, &causal, 1, 2, 2, 16, 16).unwrap();
    assert!(matches!(
        decoder.step(&x, &x, &x),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut wrong = GpuDecoder::<f32>::new(&gpu, &causal, 1, 3, 3, 16, 16).unwrap();
    assert!(matches!(
        wrong.prefill(&x, &x, &x),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_eq!(
        wrong.positions(),
        vec![0],
        "a refused block changes nothing"
    );
    assert!(matches!(
        GpuDecoder::<f32>::new(&gpu, &cosformer, 1, 2, 2, 16, 16),
        Err(Error::Unsupported(_))
    ));
    // The backward takes bf16 only.
    assert!(matches!(
        causal.backward(&x, &x, &x, &x),
        Err(Error::Unsupported(_))
    ));
}

fn plans_keep_what_they_prepared_and_refuse_other_shapes() {
    let gpu = gpu();
    let shape = [2, 100, 2, 32];
    let upload = |seed| GpuTensor::<bf16>::upload(&gpu, &Tensor::randn(shape, seed).unwrap());
    let [q, k, v] = [1, 2, 3].map(|seed| upload(seed).unwrap());
    let performer = Attention::new(Method::Performer(Performer::new(64, 9)));
    let plan = GpuPlan::<bf16>::new(&gpu, &performer, shape, shape, shape).unwrap();
    assert_eq!(plan.output_shape(), shape);
    // The ω the plan uploaded once is the one every call through it, and a call without
    // a plan (which draws it again from the same seed), uses.
    let direct = performer.forward(&q, &k, &v).unwrap().download().unwrap();
    for _ in 0..2 {
        let planned = plan.forward(&q, &k, &v).unwrap().download().unwrap();
        assert_eq!(planned, direct);
    }
    let other = Attention::new(Method::Performer(Performer::new(64, 10)));
    let other = other.forward(&q, &k, &v).unwrap().download().unwrap();
    assert_ne!(other, direct, "another seed draws another ω");
    // Shapes other than the planned ones are refused, not computed.
    let longer =
        GpuTensor::<bf16>::upload(&gpu, &Tensor::randn([2, 101, 2, 32], 0).unwrap()).unwrap();
    assert!(matches!(
        plan.forward(&longer, &longer, &longer),
        Err(Error::ShapeMismatch { .. })
    ));
    // What the GPU does not take is refused at planning.
    let cosformer = Attention::new(Method::Cosformer(Cosformer::default()));
    assert!(matches!(
        GpuPlan::<bf16>::new(&gpu, &cosformer, shape, shape, shape),
        Err(Error::Unsupported(_))
    ));
}

fn non_finite_and_out_of_range_uploads_are_refused() {
    let gpu = gpu();
    let mut x = Tensor::<f32>::zeros([1, 4, 1, 2]).unwrap();
    x.as_mut_slice()[3] = f32::NAN;
    assert!(matches!(
        GpuTensor::<f32>::upload(&gpu, &x),
        Err(Error::NonFinite { .. })
    ));
    x.as_mut_slice()[3] = 1e6;
    assert!(matches!(
        GpuTensor::<half::f16>::upload(&gpu, &x),
        Err(Error::Unsupported(_))
    ));
    assert!(GpuTensor::<bf16>::upload(&gpu, &x).is_ok());
}

fn backward_matches_the_cpu_backward_and_names_what_it_does_not_take() {
    let gpu = gpu();
    let attention = Attention::new(Method::linear()).causal(true);
    // Off the chunk, several segments, both head dims.
    for (index, shape) in [[1, 150, 2, 64], [2, 1300, 2, 128]].into_iter().enumerate() {
        let seed = 60 + 4 * index as u64;
        let rounded = |x: Tensor<f32>| {
            let values = x
                .as_slice()
                .iter()
                .map(|&x| bf16::from_f32(x).to_f32())
                .collect();
            Tensor::from_vec(values, shape).unwrap()
        };
        let [q, k, v, d_out] =
            [0, 1, 2, 3].map(|i| rounded(Tensor::randn(shape, seed + i).unwrap()));
        let exact = attention
            .backward(&q.cast::<f64>(), &k.cast(), &v.cast(), &d_out.cast())
            .unwrap();
        let upload = |x: &Tensor<f32>| GpuTensor::<bf16>::upload(&gpu, x).unwrap();
        let (q, k, v, d_out) = (upload(&q), upload(&k), upload(&v), upload(&d_out));
        let forward = attention.forward_training(&q, &k, &v).unwrap();
        let kept = attention
            .backward_with(&forward, &q, &k, &v, &d_out)
            .unwrap();
        // The device-generic backward recomputes the forward: the same kernels.
        let recomputed = attention.backward(&q, &k, &v, &d_out).unwrap();
        for gradients in [kept, recomputed] {
            for (gpu_gradient, exact) in [
                (&gradients.dq, &exact.dq),
                (&gradients.dk, &exact.dk),
                (&gradients.dv, &exact.dv),
            ] {
                let error = relative_error(&gpu_gradient.download().unwrap(), exact);
                // Four roundings of bf16 (the H100 run measured 0.25-0.71%).
                assert!(error < 4.0 / 256.0, "{shape:?}: {error:.2e}");
            }
        }
    }
    let x = GpuTensor::<bf16>::upload(&gpu, &Tensor::randn([1, 64, 4, 64], 1).unwrap()).unwrap();
    let grouped =
        GpuTensor::<bf16>::upload(&gpu, &Tensor::randn([1, 64, 2, 64], 2).unwrap()).unwrap();
    let error = attention
        .forward_training(&x, &grouped, &grouped)
        .err()
        .unwrap();
    assert!(
        matches!(&error, Error::Unsupported(m) if m.contains("kv heads")),
        "{error}"
    );
    let forward = attention.forward_training(&x, &x, &x).unwrap();
    let wrong =
        GpuTensor::<bf16>::upload(&gpu, &Tensor::randn([1, 63, 4, 64], 3).unwrap()).unwrap();
    let error = attention
        .backward_with(&forward, &x, &x, &x, &wrong)
        .err()
        .unwrap();
    assert!(matches!(error, Error::ShapeMismatch { .. }), "{error}");
}
