//! Helpers shared by the integration tests.
#![allow(dead_code)]

use linattn::{Attention, Element, HeadLayout, Method, MethodOptions, Tensor};

/// One problem shape: q `[batch, len_q, heads_q, dim]`, k `[batch, len_k, heads_kv, dim]`,
/// v `[batch, len_k, heads_kv, dim_v]`.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub batch: usize,
    pub len_q: usize,
    pub len_k: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub dim: usize,
    pub dim_v: usize,
}

impl Shape {
    pub const fn new(
        batch: usize,
        len: usize,
        heads_q: usize,
        heads_kv: usize,
        dim: usize,
        dim_v: usize,
    ) -> Self {
        Self {
            batch,
            len_q: len,
            len_k: len,
            heads_q,
            heads_kv,
            dim,
            dim_v,
        }
    }

    pub fn self_attention(&self) -> bool {
        self.len_q == self.len_k
    }

    /// Fresh random q, k, v (scaled so scores spread over a few units, as in models).
    pub fn inputs<T: Element>(&self, seed: u64) -> [Tensor<T>; 3] {
        let q = Tensor::<T>::randn([self.batch, self.len_q, self.heads_q, self.dim], seed).unwrap();
        let k = Tensor::<T>::randn([self.batch, self.len_k, self.heads_kv, self.dim], seed + 1)
            .unwrap();
        let v = Tensor::<T>::randn(
            [self.batch, self.len_k, self.heads_kv, self.dim_v],
            seed + 2,
        )
        .unwrap();
        [q, k, v]
    }
}

/// Awkward shapes: a single token, odd lengths, lengths that are not multiples of any
/// chunk or tile, several blocks of the non-causal state pass, d = 1, 32, 64, 128,
/// batch > 1, GQA and MQA, d_v ≠ d, and (non-causal only) len_q ≠ len_k.
pub const SHAPES: &[Shape] = &[
    Shape::new(1, 1, 1, 1, 1, 1),
    Shape::new(2, 7, 4, 2, 32, 32),
    Shape::new(1, 65, 3, 1, 64, 16),
    Shape::new(2, 130, 2, 2, 128, 128),
    Shape::new(1, 300, 2, 1, 8, 5),
    Shape::new(1, 13, 2, 2, 1, 3),
    Shape {
        batch: 2,
        len_q: 5,
        len_k: 9,
        heads_q: 2,
        heads_kv: 2,
        dim: 4,
        dim_v: 4,
    },
];

/// Every method of the catalogue with each of its example option sets, which exercise
/// more than one chunk or tile on these shapes.
pub fn methods() -> Vec<Method> {
    named_methods()
        .into_iter()
        .map(|(_, method)| method)
        .collect()
}

/// [`methods`], each with a name for test cases: `performer[features=16,seed=9]`.
pub fn named_methods() -> Vec<(String, Method)> {
    shrunk_methods(&[])
}

/// [`named_methods`] with every option in `sizes` that a method takes set as given
/// there (chunks of 3, a few features, narrow windows: sizes for tiny problems), by
/// option name, so that a new method's options shrink too; duplicates dropped.
pub fn shrunk_methods(sizes: &[(&str, &str)]) -> Vec<(String, Method)> {
    let mut methods: Vec<(String, Method)> = Vec::new();
    for info in linattn::catalogue() {
        for example in info.examples {
            let mut settings: Vec<(&str, &str)> = example.to_vec();
            let mut options = MethodOptions::new(0, 0);
            for &(name, value) in sizes {
                // Given by the example: replaced. Otherwise a fallback, which applies
                // only where the method's other options make it apply (hybrid's
                // features with performer heads).
                if let Some(given) = settings.iter_mut().find(|(given, _)| *given == name) {
                    given.1 = value;
                } else if info.options.iter().any(|option| option.name == name) {
                    options.fallback(name, value);
                }
            }
            for (name, value) in &settings {
                options.set(name, value);
            }
            let method = Method::from_options(info.name, &options)
                .unwrap_or_else(|e| panic!("{}'s example {settings:?}: {e}", info.name));
            let written: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let name = if written.is_empty() {
                info.name.to_string()
            } else {
                format!("{}[{}]", info.name, written.join(","))
            };
            if !methods.iter().any(|(_, known)| *known == method) {
                methods.push((name, method));
            }
        }
    }
    methods
}

/// Whether `method` accepts `shape` (and causality) at all; the rest are error cases
/// tested elsewhere.
pub fn applies(method: &Method, shape: &Shape, causal: bool) -> bool {
    let needs_self = causal || matches!(method, Method::Window(_) | Method::Hybrid(_));
    let no_causal = matches!(method, Method::Linformer(_) | Method::Fnet(_));
    let local_heads_fit = match method {
        Method::Hybrid(h) => h.local_heads <= shape.heads_q,
        _ => true,
    };
    // The f64 reference of FNet is a direct O((T·H·D)²) sum; keep it to small planes.
    let reference_affordable = match method {
        Method::Fnet(_) => shape.len_k * shape.heads_kv * shape.dim_v <= 4096,
        _ => true,
    };
    // The gated family is causal, pairs query and key heads, and (but for retention)
    // reads per-token inputs these suites do not make: tests/gated.rs runs all of it.
    let info = method.info();
    let family_fits = match info.layout {
        HeadLayout::SharedKeysValues => true,
        HeadLayout::GroupedValues => {
            causal && shape.heads_q == shape.heads_kv && info.token_inputs.is_empty()
        }
    };
    (!needs_self || shape.self_attention())
        && !(causal && no_causal)
        && local_heads_fit
        && reference_affordable
        && family_fits
}

/// ‖a − b‖ / ‖b‖: the library's one measure of closeness ([`Tensor::relative_error`]).
pub fn relative_error<T: Element>(a: &Tensor<T>, b: &Tensor<f64>) -> f64 {
    a.relative_error(b).expect("the shapes agree")
}

pub fn attention(method: &Method, causal: bool) -> Attention {
    Attention::new(method.clone()).causal(causal)
}
