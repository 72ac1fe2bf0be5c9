//! Every method of the catalogue, full and causal, at a few lengths: `cargo bench -p
//! linattn`.
//! (`linattn bench` sweeps lengths and reads each time against the machine's floor.)

use divan::Bencher;
use linattn::{Attention, Method, MethodOptions, Tensor};

fn main() {
    divan::main();
}

const HEADS: usize = 8;
const DIM: usize = 64;

/// `name` from the catalogue with the options `linattn bench` uses by default.
fn method(name: &str, len: usize) -> Method {
    let mut options = MethodOptions::new(DIM, len);
    let info = linattn::find_method(name).expect("a catalogue name").0;
    for (option, value) in [
        ("window", "256,256"),
        ("features", "256"),
        ("k-proj", "256"),
        ("local-heads", "4"),
    ] {
        if info.options.iter().any(|o| o.name == option) {
            options.set(option, value);
        }
    }
    Method::from_options(name, &options).unwrap()
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

/// Every method and variant of the catalogue, or those with a causal form on the CPU.
fn names(causal: bool) -> Vec<&'static str> {
    linattn::catalogue()
        .filter(|info| !causal || info.cpu.causal)
        .flat_map(|info| std::iter::once(info.name).chain(info.variants.iter().map(|v| v.name)))
        .collect()
}

#[divan::bench(args = names(false), consts = [1024, 4096], sample_count = 5)]
fn full<const LEN: usize>(bencher: Bencher, name: &str) {
    run(bencher, name, LEN, false);
}

#[divan::bench(args = names(true), consts = [1024, 4096], sample_count = 5)]
fn causal<const LEN: usize>(bencher: Bencher, name: &str) {
    run(bencher, name, LEN, true);
}
