//! The scratch memory each method really allocates stays within what
//! `Attention::workspace_bytes` promises (the figure the memory check relies on), and
//! the linear methods' scratch does not grow with the sequence.

mod common;

use common::{Shape, attention, methods};
use linattn::CausalForm;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(now, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak heap growth during `f`, minus what `f` returns still holding.
fn scratch_of<R>(f: impl FnOnce() -> R, kept: impl Fn(&R) -> usize) -> (usize, R) {
    let start = CURRENT.load(Ordering::SeqCst);
    PEAK.store(start, Ordering::SeqCst);
    let result = f();
    let peak = PEAK.load(Ordering::SeqCst);
    (peak - start - kept(&result), result)
}

// One test only: a second running in parallel would count its allocations here too.
#[test]
fn measured_scratch_stays_within_the_estimate() {
    let shape = Shape::new(2, 700, 4, 2, 32, 24);
    let [q, k, v] = shape.inputs::<f32>(3);
    let settings = [
        (false, CausalForm::Chunked),
        (true, CausalForm::Chunked),
        (true, CausalForm::Parallel),
    ];
    for method in methods() {
        for (causal, form) in settings {
            let attention = attention(&method, causal).causal_form(form);
            // A first call starts the thread pool, whose allocations are not the method's.
            if attention.forward(&q, &k, &v).is_err() {
                continue;
            }
            let (scratch, out) = scratch_of(
                || attention.forward(&q, &k, &v).unwrap(),
                |out| out.size_bytes(),
            );
            let estimate = attention
                .workspace_bytes(q.shape(), k.shape(), v.shape(), 4)
                .unwrap();
            assert!(
                scratch as u128 <= estimate,
                "{method:?} causal={causal} {form:?}: allocated {scratch} B of scratch, estimated {estimate} B"
            );
            let d_out = linattn::Tensor::<f32>::randn(out.shape(), 4).unwrap();
            drop(out);
            let (scratch, grads) = scratch_of(
                || attention.backward(&q, &k, &v, &d_out).unwrap(),
                |g| g.dq.size_bytes() + g.dk.size_bytes() + g.dv.size_bytes(),
            );
            drop(grads);
            let estimate = attention
                .backward_workspace_bytes(q.shape(), k.shape(), v.shape(), 4)
                .unwrap();
            assert!(
                scratch as u128 <= estimate,
                "{method:?} causal={causal}: backward allocated {scratch} B of scratch, estimated {estimate} B"
            );
        }
    }

    // Causal linear attention: the bound is the same at 2k and 16k tokens, and holds.
    let linear = attention(&linattn::Method::linear(), true);
    let mut bounds = Vec::new();
    for len in [2048, 16384] {
        let [q, k, v] = Shape::new(1, len, 2, 2, 32, 32).inputs::<f32>(len as u64);
        let bound = linear
            .workspace_bytes(q.shape(), k.shape(), v.shape(), 4)
            .unwrap();
        let (scratch, _) = scratch_of(|| linear.forward(&q, &k, &v).unwrap(), |o| o.size_bytes());
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
