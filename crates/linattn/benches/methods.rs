//! Every method, full and causal, at a few lengths: `cargo bench -p linattn`.
//! (`linattn bench` sweeps lengths and reads each time against the machine's floor.)

use divan::Bencher;
use linattn::{
    Attention, Cosformer, Fnet, GlobalHeads, Hybrid, Linear, Linformer, Method, Performer, Softmax,
    SoftmaxAlgorithm, Tensor, Window,
};

fn main() {
    divan::main();
}

const HEADS: usize = 8;
const DIM: usize = 64;

fn method(name: &str, len: usize) -> Method {
    match name {
        "softmax" => Method::softmax(),
        "softmax-naive" => Method::Softmax(Softmax {
            algorithm: SoftmaxAlgorithm::Naive,
            ..Softmax::default()
        }),
        "window" => Method::Window(Window::new(Some(256), Some(256))),
        "linear" => Method::Linear(Linear::default()),
        "performer" => Method::Performer(Performer::new(256, 0)),
        "cosformer" => Method::Cosformer(Cosformer::default()),
        "linformer" => Method::Linformer(Linformer::new(len, 256, 0)),
        "fnet" => Method::Fnet(Fnet),
        "hybrid" => Method::Hybrid(Hybrid {
            local_heads: HEADS / 2,
            window: Window::new(Some(256), Some(0)),
            global: GlobalHeads::Linear(Linear::default()),
        }),
        other => unreachable!("no method {other}"),
    }
}

fn run(bencher: Bencher, name: &str, len: usize, causal: bool) {
    let shape = [1, len, HEADS, DIM];
    let [q, k, v] = [1, 2, 3].map(|seed| Tensor::<f32>::randn(shape, seed).unwrap());
    let attention = Attention::new(method(name, len)).causal(causal);
    let mut out = Tensor::zeros(attention.output_shape(shape, shape, shape).unwrap()).unwrap();
    bencher
        .counter(divan::counter::ItemsCount::new(len))
        .bench_local(|| attention.forward_into(&q, &k, &v, &mut out).unwrap());
}

const EXACT: &[&str] = &["softmax", "softmax-naive", "window", "hybrid"];
const LINEAR: &[&str] = &["linear", "performer", "cosformer"];
const FULL_ONLY: &[&str] = &["linformer", "fnet"];

#[divan::bench(args = EXACT, consts = [1024, 4096], sample_count = 5)]
fn exact_full<const LEN: usize>(bencher: Bencher, name: &str) {
    run(bencher, name, LEN, false);
}

#[divan::bench(args = EXACT, consts = [1024, 4096], sample_count = 5)]
fn exact_causal<const LEN: usize>(bencher: Bencher, name: &str) {
    run(bencher, name, LEN, true);
}

#[divan::bench(args = LINEAR, consts = [4096, 65536], sample_count = 5)]
fn linear_full<const LEN: usize>(bencher: Bencher, name: &str) {
    run(bencher, name, LEN, false);
}

#[divan::bench(args = LINEAR, consts = [4096, 65536], sample_count = 5)]
fn linear_causal<const LEN: usize>(bencher: Bencher, name: &str) {
    run(bencher, name, LEN, true);
}

#[divan::bench(args = FULL_ONLY, consts = [4096, 65536], sample_count = 5)]
fn mixing_full<const LEN: usize>(bencher: Bencher, name: &str) {
    run(bencher, name, LEN, false);
}
