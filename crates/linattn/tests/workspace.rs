//! The scratch memory each method really allocates stays within what
//! `Attention::workspace_bytes` promises (the figure the memory check relies on), and
//! the linear methods' scratch does not grow with the sequence.

mod common;
mod counting;

use common::{Shape, attention, methods};
use counting::scratch_of;
use linattn::{CausalForm, Fnet, Linformer, Method, Retention, Tensor};
use rayon::ThreadPoolBuilder;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Runs `f` on a new pool of `threads` threads, started before and gone after, so that
/// what the threads allocate when they start or free when they end falls outside `f`,
/// and what they allocate on first use (gemm's per-thread buffer) inside it.
fn on_fresh_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    let exited = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&exited);
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .exit_handler(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    pool.broadcast(|_| ());
    let result = pool.install(f);
    drop(pool);
    while exited.load(Ordering::SeqCst) < threads {
        std::thread::yield_now();
    }
    result
}

const SETTINGS: [(bool, CausalForm); 3] = [
    (false, CausalForm::Chunked),
    (true, CausalForm::Chunked),
    (true, CausalForm::Parallel),
];

/// Every method's forward and backward on `shape`, in each causal setting it takes,
/// each call on a fresh pool of `threads` threads.
fn check_every_method(shape: Shape, methods: &[Method], threads: usize) {
    let [q, k, v] = shape.inputs::<f32>(3);
    for method in methods {
        for (causal, form) in SETTINGS {
            let attention = attention(method, causal).causal_form(form);
            if attention.forward(&q, &k, &v).is_err() {
                continue;
            }
            let (scratch, out, estimate) = on_fresh_pool(threads, || {
                let (scratch, out) = scratch_of(
                    || attention.forward(&q, &k, &v).unwrap(),
                    |out| out.size_bytes(),
                );
                let estimate = attention.workspace_bytes(q.shape(), k.shape(), v.shape(), 4);
                (scratch, out, estimate.unwrap())
            });
            assert!(
                scratch as u128 <= estimate,
                "{threads} threads, {shape:?}, {method:?} causal={causal} {form:?}: \
                 allocated {scratch} B of scratch, estimated {estimate} B"
            );
            let d_out = Tensor::<f32>::randn(out.shape(), 4).unwrap();
            drop(out);
            let (scratch, estimate) = on_fresh_pool(threads, || {
                let (scratch, grads) = scratch_of(
                    || attention.backward(&q, &k, &v, &d_out).unwrap(),
                    |g| g.dq.size_bytes() + g.dk.size_bytes() + g.dv.size_bytes(),
                );
                drop(grads);
                let estimate =
                    attention.backward_workspace_bytes(q.shape(), k.shape(), v.shape(), 4);
                (scratch, estimate.unwrap())
            });
            assert!(
                scratch as u128 <= estimate,
                "{threads} threads, {shape:?}, {method:?} causal={causal}: backward \
                 allocated {scratch} B of scratch, estimated {estimate} B"
            );
        }
    }
}

// One test only: a second running in parallel would count its allocations here too.
#[test]
fn measured_scratch_stays_within_the_estimate_at_any_thread_count() {
    let mut methods = methods();
    // The common list's Linformer is too short for this sequence.
    methods.push(Method::Linformer(Linformer::new(1024, 12, 5)));
    let shapes = [
        (Shape::new(2, 700, 4, 2, 32, 24), methods.as_slice()),
        // The gated family pairs q and k heads: retention, which needs no gates.
        (
            Shape::new(2, 700, 2, 2, 32, 24),
            &[Method::Retention(Retention::default())][..],
        ),
        // FFT plans of prime (701, 5), power-of-two and mixed-radix lengths.
        (Shape::new(1, 701, 1, 1, 4, 5), &[Method::Fnet(Fnet)]),
        (Shape::new(1, 512, 3, 3, 8, 12), &[Method::Fnet(Fnet)]),
    ];
    // What is allocated once per process (statics of the libraries) is no call's
    // scratch: every call runs once before anything is measured.
    for (shape, methods) in shapes {
        let [q, k, v] = shape.inputs::<f32>(3);
        for method in methods {
            for (causal, form) in SETTINGS {
                let attention = attention(method, causal).causal_form(form);
                if let Ok(out) = attention.forward(&q, &k, &v) {
                    attention.backward(&q, &k, &v, &out).unwrap();
                }
            }
        }
    }
    for threads in [1, 2, 8, 16] {
        for (shape, methods) in shapes {
            check_every_method(shape, methods, threads);
        }
    }

    // Causal linear attention: the bound is the same at 2k and 16k tokens, and holds.
    let linear = attention(&Method::linear(), true);
    let mut bounds = Vec::new();
    for len in [2048, 16384] {
        let [q, k, v] = Shape::new(1, len, 2, 2, 32, 32).inputs::<f32>(len as u64);
        let (bound, scratch) = on_fresh_pool(2, || {
            let bound = linear.workspace_bytes(q.shape(), k.shape(), v.shape(), 4);
            let (scratch, _) =
                scratch_of(|| linear.forward(&q, &k, &v).unwrap(), |o| o.size_bytes());
            (bound.unwrap(), scratch)
        });
        assert!(
            scratch as u128 <= bound,
            "{len} tokens: {scratch} B > {bound} B"
        );
        bounds.push(bound);
    }
    assert_eq!(
        bounds[0], bounds[1],
        "causal linear scratch grows with the sequence"
    );
}
