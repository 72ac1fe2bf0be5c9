//! A prepared plan gives what unplanned calls give, refuses other shapes, builds what
//! does not change between calls once (Performer's ω, FNet's FFT plans, Linformer's
//! projections), and its calls, like decoding steps, read no system file.

mod common;
mod counting;

use common::{Shape, applies, named_methods};
use counting::scratch_of;
use linattn::{Attention, Error, Fnet, Linformer, Method, Performer, Tensor};

/// Bytes this process has read through read(2) so far (Linux's `rchar`).
#[cfg(target_os = "linux")]
fn bytes_read() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("Linux has /proc/self/io");
    io.lines()
        .find_map(|line| line.strip_prefix("rchar: "))
        .and_then(|n| n.parse().ok())
        .expect("/proc/self/io has rchar")
}

// One test function: the allocation and read counters are process-wide, so nothing may
// run beside the measurements.
#[test]
fn plans() {
    plan_calls_equal_unplanned_calls_for_every_method();
    plans_refuse_other_shapes();
    planned_calls_build_nothing_again();
    #[cfg(target_os = "linux")]
    planned_calls_and_decoding_steps_read_no_system_file();
}

fn plan_calls_equal_unplanned_calls_for_every_method() {
    let shape = Shape::new(2, 70, 4, 2, 16, 8);
    let [q, k, v] = shape.inputs::<f64>(3);
    let d_out = Tensor::<f64>::randn([2, 70, 4, 8], 9).unwrap();
    for causal in [false, true] {
        for (name, method) in named_methods() {
            if !applies(&method, &shape, causal) {
                continue;
            }
            let attention = Attention::new(method).causal(causal);
            let plan = attention
                .plan::<f64>(q.shape(), k.shape(), v.shape())
                .unwrap();
            let expected = attention.forward(&q, &k, &v).unwrap();
            for _ in 0..2 {
                assert_eq!(plan.forward(&q, &k, &v).unwrap(), expected, "{name}");
            }
            if name != "fnet" {
                let grads = plan.backward(&q, &k, &v, &d_out).unwrap();
                assert_eq!(
                    grads,
                    attention.backward(&q, &k, &v, &d_out).unwrap(),
                    "{name}"
                );
            }
        }
    }
}

fn plans_refuse_other_shapes() {
    let x = Tensor::<f32>::randn([1, 20, 2, 8], 0).unwrap();
    let longer = Tensor::<f32>::randn([1, 21, 2, 8], 0).unwrap();
    let plan = Attention::new(Method::linear())
        .plan::<f32>(x.shape(), x.shape(), x.shape())
        .unwrap();
    assert!(matches!(
        plan.forward(&longer, &longer, &longer),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut wrong_out = Tensor::<f32>::zeros([1, 20, 2, 4]).unwrap();
    assert!(matches!(
        plan.forward_into(&x, &x, &x, &mut wrong_out),
        Err(Error::ShapeMismatch { .. })
    ));
    // Planning validates as a call would, and checks its memory.
    let limited = Attention::new(Method::linear()).memory_limit(1000);
    assert!(matches!(
        limited.plan::<f32>(x.shape(), x.shape(), x.shape()),
        Err(Error::OutOfMemory { .. })
    ));
}

/// A planned call's peak allocation is smaller than an unplanned one's by at least what
/// the plan built: the call does not build it again.
fn planned_calls_build_nothing_again() {
    let shape = Shape::new(1, 211, 2, 2, 64, 64);
    let [q, k, v] = shape.inputs::<f64>(1);
    let element = size_of::<f64>();
    for (method, prepared_bytes) in [
        // ω: m × d.
        (
            Method::Performer(Performer::new(256, 0)),
            256 * 64 * element,
        ),
        // E and F: max_len × k each.
        (
            Method::Linformer(Linformer::new(211, 32, 0)),
            2 * 211 * 32 * element,
        ),
        // Twiddles of a prime-length transform, at least its points.
        (Method::Fnet(Fnet), 211 * 2 * element),
    ] {
        let attention = Attention::new(method.clone());
        let plan = attention
            .plan::<f64>(q.shape(), k.shape(), v.shape())
            .unwrap();
        plan.forward(&q, &k, &v).unwrap();
        // The output is what both keep; the rest is scratch.
        let kept = |out: &Tensor<f64>| out.size_bytes();
        let (planned, _) = scratch_of(|| plan.forward(&q, &k, &v).unwrap(), kept);
        let (unplanned, _) = scratch_of(|| attention.forward(&q, &k, &v).unwrap(), kept);
        assert!(
            planned + prepared_bytes <= unplanned,
            "{method:?}: planned {planned} B, unplanned {unplanned} B"
        );
    }
}

#[cfg(target_os = "linux")]
fn planned_calls_and_decoding_steps_read_no_system_file() {
    let x = Tensor::<f32>::randn([2, 64, 4, 16], 0).unwrap();
    let token = Tensor::<f32>::randn([2, 1, 4, 16], 1).unwrap();
    let read_alone = {
        let before = bytes_read();
        bytes_read() - before
    };
    for method in [
        Method::linear(),
        Method::Performer(Performer::new(32, 0)),
        Method::softmax(),
    ] {
        let attention = Attention::new(method.clone()).causal(true);
        let plan = attention
            .plan::<f32>(x.shape(), x.shape(), x.shape())
            .unwrap();
        let (_, mut decoder) = attention.prefill(&x, &x, &x).unwrap();
        // Warm: first uses read the caches' sizes (gemm) once per process.
        plan.forward(&x, &x, &x).unwrap();
        decoder.step(&token, &token, &token).unwrap();
        let before = bytes_read();
        for _ in 0..5 {
            plan.forward(&x, &x, &x).unwrap();
            decoder.step(&token, &token, &token).unwrap();
        }
        let read = bytes_read() - before - read_alone;
        assert_eq!(read, 0, "{method:?}: {read} bytes read");
    }
}
