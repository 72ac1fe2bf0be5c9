//! The floor a benchmark reads its times against: measured ceilings and least costs.

use linattn::{Attention, Ceilings, Method, Performer, Window};

#[test]
fn ceilings_are_measured_not_assumed() {
    let ceilings = Ceilings::measure();
    // Any machine this runs on copies more than 100 MB/s and multiplies faster than
    // 100 MFLOP/s, and nothing reaches a PB/s.
    assert!(
        (1e8..1e15).contains(&ceilings.copy_bytes_per_second),
        "{ceilings:?}"
    );
    assert!(
        (1e8..1e15).contains(&ceilings.matmul_flops_per_second),
        "{ceilings:?}"
    );
}

#[test]
fn costs_follow_the_work_of_each_method() {
    let shape = [2, 1000, 4, 32];
    let cost = |method: Method, causal: bool| {
        Attention::new(method)
            .causal(causal)
            .cost(shape, shape, shape, 4)
            .unwrap()
    };
    let (full, causal) = (
        cost(Method::softmax(), false),
        cost(Method::softmax(), true),
    );
    // Full: 2·(d + d_v) per query-key pair; causal sees n(n+1)/2 of the n² pairs.
    assert_eq!(full.flops, 2.0 * 8.0 * 1000.0 * 1000.0 * 64.0);
    assert_eq!(causal.flops, full.flops * 1001.0 / 2000.0);
    assert_eq!(full.bytes, 4.0 * 2.0 * 1000.0 * 4.0 * 32.0 * 4.0);
    let window = cost(Method::Window(Window::new(Some(10), Some(10))), false);
    assert!(window.flops < full.flops / 40.0);
    let linear = cost(Method::linear(), false);
    assert_eq!(linear.flops, 4.0 * 8.0 * 1000.0 * 32.0 * 32.0);
    assert_eq!(cost(Method::linear(), true).flops, linear.flops);
    let favor = cost(Method::Performer(Performer::new(64, 0)), false);
    assert!(favor.flops > 2.0 * linear.flops);
}
