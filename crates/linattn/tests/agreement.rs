//! Every fast path against the f64 reference, on fresh random inputs of awkward shapes:
//! each method of the catalogue (with each of its example options) × form (full, causal
//! chunked, causal parallel) × element type × shape is a test of its own, named like
//! `performer[features=16,seed=9]::causal_chunked::f32::B2-T7x7-H4x2-D32x32`, so that
//! one failure hides no other and `cargo test --test agreement performer` selects cases.
//! With the `cuda` feature the same cases run on the GPU too, wherever
//! `Attention::supports` says the GPU takes them (`…::cuda-f32::…`, `…::cuda-bf16::…`),
//! and are reported ignored where no GPU can be opened. A custom harness
//! (libtest-mimic): the cases come from the catalogue at run time.

mod common;

use common::{SHAPES, Shape, applies, attention, named_methods, relative_error};
use libtest_mimic::{Arguments, Failed, Trial};
use linattn::{CausalForm, Element, Tensor, reference};
use std::process::ExitCode;

/// Error of the f64 fast paths against the f64 reference: rounding only.
const F64_TOLERANCE: f64 = 1e-12;
/// Error of the f32 fast paths against the f64 reference: a few hundred f32 roundings
/// (ε = 6e-8) at these lengths.
const F32_TOLERANCE: f64 = 1e-5;

/// The forms, as the cases name them.
const FORMS: [(&str, bool, CausalForm); 3] = [
    ("full", false, CausalForm::Chunked),
    ("causal_chunked", true, CausalForm::Chunked),
    ("causal_parallel", true, CausalForm::Parallel),
];

fn main() -> ExitCode {
    let arguments = Arguments::from_args();
    let mut trials = Vec::new();
    for (index, (name, method)) in named_methods().into_iter().enumerate() {
        for (form, causal, causal_form) in FORMS {
            for (n, shape) in SHAPES.iter().enumerate() {
                if !applies(&method, shape, causal) {
                    continue;
                }
                let seed = 10_000 * index as u64 + 10 * n as u64;
                let shape_name = shape_name(shape);
                for (dtype, tolerance) in [("f64", F64_TOLERANCE), ("f32", F32_TOLERANCE)] {
                    let method = method.clone();
                    let shape = *shape;
                    trials.push(Trial::test(
                        format!("{name}::{form}::{dtype}::{shape_name}"),
                        move || {
                            let attention = attention(&method, causal).causal_form(causal_form);
                            if dtype == "f64" {
                                check::<f64>(&attention, &shape, seed, tolerance)
                            } else {
                                check::<f32>(&attention, &shape, seed, tolerance)
                            }
                        },
                    ));
                }
            }
        }
    }
    #[cfg(feature = "cuda")]
    trials.extend(gpu::trials());
    trials.push(Trial::test(
        "fused_non_causal_linear_matches_the_reference",
        || {
            fused_non_causal_linear_matches_the_reference();
            Ok(())
        },
    ));
    libtest_mimic::run(&arguments, trials).exit_code()
}

/// `B2-T5x9-H2x2-D4x4`: batch, query and key lengths, query and kv heads, dims.
fn shape_name(shape: &Shape) -> String {
    format!(
        "B{}-T{}x{}-H{}x{}-D{}x{}",
        shape.batch,
        shape.len_q,
        shape.len_k,
        shape.heads_q,
        shape.heads_kv,
        shape.dim,
        shape.dim_v
    )
}

/// The fast path in `T` against the f64 reference on fresh inputs of `shape`.
fn check<T: Element>(
    attention: &linattn::Attention,
    shape: &Shape,
    seed: u64,
    tolerance: f64,
) -> Result<(), Failed> {
    let [q, k, v] = shape.inputs::<f64>(seed);
    let expected = reference::forward(attention, &q, &k, &v).map_err(|e| e.to_string())?;
    let cast = |x: &Tensor<f64>| x.cast::<T>();
    let fast = attention
        .forward(&cast(&q), &cast(&k), &cast(&v))
        .map_err(|e| e.to_string())?;
    let error = relative_error(&fast, &expected);
    if error > tolerance {
        return Err(format!("{} error {error:e} > {tolerance:e}", T::NAME).into());
    }
    Ok(())
}

/// The fused non-causal kernels for φ = elu + 1 in f32 (widths multiples of 64, every
/// head in one call): grouped heads, more keys than queries, tiles and key blocks cut
/// short at the end of the sequence, one batch split across threads.
fn fused_non_causal_linear_matches_the_reference() {
    let shapes = [
        Shape::new(1, 5, 1, 1, 64, 64),
        Shape::new(2, 301, 4, 2, 64, 128),
        Shape::new(1, 1000, 2, 2, 128, 64),
        Shape {
            batch: 3,
            len_q: 49,
            len_k: 97,
            heads_q: 6,
            heads_kv: 3,
            dim: 64,
            dim_v: 64,
        },
    ];
    for (n, shape) in shapes.iter().enumerate() {
        let attention = attention(&linattn::Method::linear(), false);
        let [q, k, v] = shape.inputs::<f64>(3000 + n as u64);
        let expected = reference::forward(&attention, &q, &k, &v).unwrap();
        let fast = attention
            .forward(&q.cast::<f32>(), &k.cast::<f32>(), &v.cast::<f32>())
            .unwrap();
        let error = relative_error(&fast, &expected);
        assert!(error <= F32_TOLERANCE, "{shape:?}: error {error:e}");
    }
}

/// The agreement cases on the GPU.
#[cfg(feature = "cuda")]
mod gpu {
    use super::{FORMS, SHAPES, Shape, applies, attention, named_methods, relative_error};
    use half::bf16;
    use libtest_mimic::{Failed, Trial};
    use linattn::cuda::{Gpu, GpuElement, GpuTensor};
    use linattn::{Attention, Device, Tensor, reference};
    use std::sync::{Arc, OnceLock};

    /// f32 on the GPU against the f64 reference: f32 products, f32 accumulation.
    const F32_TOLERANCE: f64 = 1e-4;
    /// bf16 on the GPU against the f64 reference of the same bf16-rounded inputs: what
    /// the kernels round themselves (the output, and the tensor cores' operands), at
    /// most eight roundings of bf16 (2⁻⁸ each), the cap tests/gpu_checks puts on 16-bit
    /// errors.
    const BF16_TOLERANCE: f64 = 8.0 / 256.0;

    fn gpu() -> Option<&'static Arc<Gpu>> {
        static GPU: OnceLock<Option<Arc<Gpu>>> = OnceLock::new();
        GPU.get_or_init(|| Gpu::open(0).ok()).as_ref()
    }

    pub fn trials() -> Vec<Trial> {
        let absent = gpu().is_none();
        if let Err(error) = Gpu::open(0) {
            eprintln!("agreement: no usable GPU ({error}); its cases are reported ignored");
        }
        let mut trials = Vec::new();
        for (index, (name, method)) in named_methods().into_iter().enumerate() {
            // The GPU has one causal form: the chunked one.
            for (form, causal, _) in FORMS.into_iter().take(2) {
                for (n, shape) in SHAPES.iter().enumerate() {
                    let attention = attention(&method, causal);
                    let [q, k, v] = shape_of(shape);
                    if !applies(&method, shape, causal)
                        || attention.supports(q, k, v, Device::Cuda).is_err()
                    {
                        continue;
                    }
                    let seed = 10_000 * index as u64 + 10 * n as u64 + 5;
                    let shape_name = super::shape_name(shape);
                    for dtype in ["f32", "bf16"] {
                        let (attention, shape) = (attention.clone(), *shape);
                        trials.push(
                            Trial::test(
                                format!("{name}::{form}::cuda-{dtype}::{shape_name}"),
                                move || {
                                    let gpu = gpu().ok_or("no GPU")?;
                                    if dtype == "f32" {
                                        check::<f32>(gpu, &attention, &shape, seed, F32_TOLERANCE)
                                    } else {
                                        check::<bf16>(gpu, &attention, &shape, seed, BF16_TOLERANCE)
                                    }
                                },
                            )
                            .with_ignored_flag(absent),
                        );
                    }
                }
            }
        }
        trials
    }

    fn shape_of(shape: &Shape) -> [[usize; 4]; 3] {
        [
            [shape.batch, shape.len_q, shape.heads_q, shape.dim],
            [shape.batch, shape.len_k, shape.heads_kv, shape.dim],
            [shape.batch, shape.len_k, shape.heads_kv, shape.dim_v],
        ]
    }

    /// The GPU in `T` against the f64 reference of the inputs as `T` holds them.
    fn check<T: GpuElement>(
        gpu: &Arc<Gpu>,
        attention: &Attention,
        shape: &Shape,
        seed: u64,
        tolerance: f64,
    ) -> Result<(), Failed> {
        let to_device = |x: Tensor<f32>| GpuTensor::<T>::upload(gpu, &x);
        let [q, k, v] = shape.inputs::<f32>(seed);
        let [q, k, v] = [to_device(q)?, to_device(k)?, to_device(v)?];
        let held = |x: &GpuTensor<T>| -> Result<Tensor<f64>, Failed> { Ok(x.download()?.cast()) };
        let expected = reference::forward(attention, &held(&q)?, &held(&k)?, &held(&v)?)?;
        let out = attention.forward(&q, &k, &v)?.download()?;
        let error = relative_error(&out, &expected);
        if error > tolerance {
            return Err(format!("{} error {error:e} > {tolerance:e}", T::NAME).into());
        }
        Ok(())
    }
}
