//! The recurrent form: token-by-token decoding, prefill handed to the decoder, and saved
//! state agree with one causal call; memory stays constant where it should.

mod common;

use common::{Shape, relative_error};
use linattn::{
    Attention, CausalForm, Cosformer, Decoder, Element, Error, HeadLayout, Linear, Linformer,
    Method, Performer, Tensor, Window,
};

/// Every method of the catalogue that decodes, with chunks short enough that a few dozen
/// tokens cross several and cosFormer's fixed length (which decoding needs) set.
fn decodable_methods() -> Vec<Method> {
    let methods: Vec<Method> = common::shrunk_methods(&[("chunk", "8"), ("max-len", "64")])
        .into_iter()
        .map(|(_, method)| method)
        .filter(|method| {
            let attention = Attention::new(method.clone()).causal(true);
            attention.decoder::<f64>(1, 4, 2, 8, 8).is_ok()
        })
        .collect();
    // softmax ×3, window ×2, linear, performer ×2, cosformer, hybrid ×2.
    assert!(methods.len() >= 11, "only {methods:?} decode");
    methods
}

/// Decodes `q`, `k`, `v` after a prompt of `prompt` tokens and returns every output,
/// prompt included, as one tensor.
fn prefill_then_decode<T: Element>(
    attention: &Attention,
    [q, k, v]: &[Tensor<T>; 3],
    prompt: usize,
) -> Tensor<T> {
    let len = q.seq_len();
    let (mut outputs, mut decoder) = if prompt == 0 {
        let [b, _, hq, d] = q.shape();
        let [_, _, hk, dv] = v.shape();
        (
            Vec::new(),
            attention.decoder::<T>(b, hq, hk, d, dv).unwrap(),
        )
    } else {
        let slice = |x: &Tensor<T>| x.slice_seq(0..prompt).unwrap();
        let (out, decoder) = attention.prefill(&slice(q), &slice(k), &slice(v)).unwrap();
        (vec![out], decoder)
    };
    for t in prompt..len {
        let token = |x: &Tensor<T>| x.slice_seq(t..t + 1).unwrap();
        outputs.push(decoder.step(&token(q), &token(k), &token(v)).unwrap());
    }
    assert_eq!(decoder.positions(), vec![len; q.batch()]);
    concat_seq(&outputs)
}

fn concat_seq<T: Element>(parts: &[Tensor<T>]) -> Tensor<T> {
    let [batch, _, heads, dim] = parts[0].shape();
    let len: usize = parts.iter().map(Tensor::seq_len).sum();
    let mut data = Vec::with_capacity(batch * len * heads * dim);
    for b in 0..batch {
        for part in parts {
            let row = part.seq_len() * heads * dim;
            data.extend_from_slice(&part.as_slice()[b * row..(b + 1) * row]);
        }
    }
    Tensor::from_vec(data, [batch, len, heads, dim]).unwrap()
}

#[test]
fn parallel_chunked_and_recurrent_forms_agree() {
    let shape = Shape::new(2, 37, 4, 2, 16, 8);
    let inputs = shape.inputs::<f64>(21);
    for method in decodable_methods() {
        let attention = Attention::new(method.clone()).causal(true);
        let expected = attention
            .forward(&inputs[0], &inputs[1], &inputs[2])
            .unwrap();
        let parallel = attention.clone().causal_form(CausalForm::Parallel);
        let parallel = parallel
            .forward(&inputs[0], &inputs[1], &inputs[2])
            .unwrap();
        assert!(
            relative_error(&parallel, &expected) < 1e-12,
            "{method:?} parallel"
        );
        for prompt in [0, 1, 20, 36] {
            let decoded = prefill_then_decode(&attention, &inputs, prompt);
            let error = relative_error(&decoded, &expected);
            assert!(error < 1e-12, "{method:?} prompt {prompt}: {error:e}");
        }
        let single = inputs.clone().map(|x| x.cast::<f32>());
        let decoded = prefill_then_decode(&attention, &single, 13);
        let error = relative_error(&decoded, &expected);
        assert!(error < 1e-5, "{method:?} f32: {error:e}");
    }
}

#[test]
fn performer_decoding_stays_finite_for_keys_of_large_norm() {
    let shape = Shape::new(1, 40, 2, 2, 32, 8);
    let [q, k, v] = shape.inputs::<f64>(2);
    // Later keys grow to norms near 100: the running stabiliser must rescale the state.
    let grown: Vec<f64> = k
        .as_slice()
        .iter()
        .enumerate()
        .map(|(i, x)| x * (1.0 + (i / 64) as f64 * 0.5))
        .collect();
    let k = Tensor::from_vec(grown, k.shape()).unwrap();
    let attention = Attention::new(Method::Performer(Performer::new(64, 9))).causal(true);
    let expected = attention.forward(&q, &k, &v).unwrap();
    let inputs = [q, k, v];
    let decoded = prefill_then_decode(&attention, &inputs, 0);
    assert!(decoded.as_slice().iter().all(|x| x.is_finite()));
    assert!(relative_error(&decoded, &expected) < 1e-12);
    let decoded = prefill_then_decode(&attention, &inputs.map(|x| x.cast::<f32>()), 17);
    assert!(decoded.as_slice().iter().all(|x| x.is_finite()));
    assert!(relative_error(&decoded, &expected) < 1e-5);
}

#[test]
fn linear_state_memory_is_constant_and_the_kv_cache_grows() {
    let token = |seed| Tensor::<f32>::randn([3, 1, 4, 16], seed).unwrap();
    let memory_after = |method: Method, steps: u64| {
        let mut decoder = Attention::new(method)
            .decoder::<f32>(3, 4, 4, 16, 16)
            .unwrap();
        for s in 0..steps {
            decoder
                .step(&token(s), &token(s + 100), &token(s + 200))
                .unwrap();
        }
        decoder.memory()
    };
    for method in [
        Method::linear(),
        Method::Performer(Performer::new(32, 0)),
        Method::Window(Window::new(Some(8), None)),
    ] {
        let (early, late) = (
            memory_after(method.clone(), 10),
            memory_after(method.clone(), 60),
        );
        assert_eq!(early.state_bytes, late.state_bytes, "{method:?}");
        assert_eq!(late.bytes_per_token, 0, "{method:?}");
    }
    let (early, late) = (
        memory_after(Method::softmax(), 10),
        memory_after(Method::softmax(), 60),
    );
    assert_eq!(late.bytes_per_token, 3 * 4 * 32 * 4);
    assert_eq!(
        late.state_bytes - early.state_bytes,
        50 * late.bytes_per_token
    );
}

#[test]
fn saved_state_restores_exactly() {
    let shape = Shape::new(2, 30, 4, 2, 8, 8);
    let [q, k, v] = shape.inputs::<f32>(5);
    for method in decodable_methods() {
        let attention = Attention::new(method.clone()).causal(true);
        let prompt = |x: &Tensor<f32>| x.slice_seq(0..20).unwrap();
        let (_, mut original) = attention
            .prefill(&prompt(&q), &prompt(&k), &prompt(&v))
            .unwrap();
        let bytes = original.to_bytes();
        let mut restored = Decoder::<f32>::from_bytes(&attention, &bytes).unwrap();
        assert_eq!(restored.to_bytes(), bytes, "{method:?}");
        for t in 20..30 {
            let token = |x: &Tensor<f32>| x.slice_seq(t..t + 1).unwrap();
            let a = original.step(&token(&q), &token(&k), &token(&v)).unwrap();
            let b = restored.step(&token(&q), &token(&k), &token(&v)).unwrap();
            assert_eq!(a, b, "{method:?} at {t}");
        }
    }
}

#[test]
fn bad_saved_state_and_bad_steps_are_errors() {
    let attention = Attention::new(Method::linear());
    let x = Tensor::<f32>::randn([1, 5, 2, 4], 0).unwrap();
    let (_, mut decoder) = attention.prefill(&x, &x, &x).unwrap();
    let bytes = decoder.to_bytes();
    let invalid =
        |result: linattn::Result<Decoder<f32>>| matches!(result, Err(Error::InvalidState(_)));
    assert!(invalid(Decoder::from_bytes(
        &attention,
        &bytes[..bytes.len() - 3]
    )));
    assert!(invalid(Decoder::from_bytes(&attention, b"not a state")));
    let other = Attention::new(Method::Linear(Linear { chunk: 7 }));
    assert!(invalid(Decoder::from_bytes(&other, &bytes)));
    assert!(matches!(
        Decoder::<f64>::from_bytes(&attention, &bytes),
        Err(Error::InvalidState(_))
    ));
    let mut corrupt = bytes.clone();
    corrupt.push(0);
    assert!(invalid(Decoder::from_bytes(&attention, &corrupt)));

    let wrong = Tensor::<f32>::randn([1, 2, 2, 4], 0).unwrap();
    let token = x.slice_seq(0..1).unwrap();
    assert!(matches!(
        decoder.step(&wrong, &token, &token),
        Err(Error::ShapeMismatch { .. })
    ));

    let no_causal = Attention::new(Method::Linformer(Linformer::new(8, 2, 0)));
    assert!(matches!(
        no_causal.decoder::<f32>(1, 2, 2, 4, 4),
        Err(Error::CausalUnsupported { .. })
    ));
    let unbounded_cosformer = Attention::new(Method::Cosformer(Cosformer::default()));
    assert!(matches!(
        unbounded_cosformer.decoder::<f32>(1, 2, 2, 4, 4),
        Err(Error::InvalidConfig(_))
    ));
    let short = Attention::new(Method::Cosformer(Cosformer {
        max_len: Some(5),
        ..Cosformer::default()
    }));
    let (_, mut decoder) = short.prefill(&x, &x, &x).unwrap();
    assert!(matches!(
        decoder.step(&token, &token, &token),
        Err(Error::SequenceTooLong {
            len: 6,
            max_len: 5,
            ..
        })
    ));
    // A block is checked as a whole: the shapes, then the length it would reach.
    let (_, mut decoder) = short.prefill(&token, &token, &token).unwrap();
    let narrow = Tensor::<f32>::randn([1, 3, 2, 2], 0).unwrap();
    assert!(matches!(
        decoder.prefill(&x.slice_seq(0..3).unwrap(), &narrow, &narrow),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        decoder.prefill(&x, &x, &x),
        Err(Error::SequenceTooLong {
            len: 6,
            max_len: 5,
            ..
        })
    ));
    assert_eq!(decoder.positions(), [1], "a refused block changes nothing");
}

/// Restores `bytes` and, when that succeeds, steps the decoder once: neither may panic,
/// abort or allocate past the attention's memory limit, whatever the bytes.
fn restore_and_step(attention: &Attention, bytes: &[u8], token: &[Tensor<f32>; 3]) {
    if let Ok(mut decoder) = Decoder::<f32>::from_bytes(attention, bytes) {
        let _ = decoder.step(&token[0], &token[1], &token[2]);
    }
}

/// A small generator for the fuzzing below (xorshift: the test needs no statistics).
struct Bytes(u64);

impl Bytes {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn saved_state_reader_survives_every_mutation() {
    let shape = Shape::new(2, 6, 4, 2, 3, 2);
    let [q, k, v] = shape.inputs::<f32>(11);
    let token = [&q, &k, &v].map(|x| x.slice_seq(0..1).unwrap());
    let mut rng = Bytes(0x9e37_79b9_7f4a_7c15);
    for method in decodable_methods() {
        // Performer's ω is drawn in d × d blocks: a corrupt d must not cost minutes.
        let attention = Attention::new(method.clone())
            .causal(true)
            .memory_limit(64 << 20);
        let (_, decoder) = attention.prefill(&q, &k, &v).unwrap();
        let valid = decoder.to_bytes();
        // Every byte set to values that make lengths huge, zero, or off by a little.
        for position in 0..valid.len() {
            for value in [0x00, 0x01, 0x7f, 0x80, 0xff, valid[position] ^ 0x04] {
                let mut bytes = valid.clone();
                bytes[position] = value;
                restore_and_step(&attention, &bytes, &token);
            }
        }
        // Several bytes at once, truncations and extensions.
        for _ in 0..2000 {
            let mut bytes = valid.clone();
            for _ in 0..1 + rng.below(8) {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next() as u8;
            }
            match rng.below(3) {
                0 => bytes.truncate(rng.below(bytes.len() + 1)),
                1 => bytes.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
                _ => {}
            }
            restore_and_step(&attention, &bytes, &token);
        }
        // A valid header, then noise; and noise alone.
        let header = 8 + 4 + 1 + 8 + format!("{method:?}").len();
        for _ in 0..500 {
            let noise = (0..rng.below(300)).map(|_| rng.next() as u8);
            let bytes: Vec<u8> = valid[..header].iter().copied().chain(noise).collect();
            restore_and_step(&attention, &bytes, &token);
            let noise: Vec<u8> = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
            restore_and_step(&attention, &noise, &token);
        }
    }
}

#[test]
fn saved_state_with_huge_sizes_is_refused_without_allocating() {
    // The default memory policy (what the machine has): sizes read from the bytes must be
    // checked against the bytes present before anything of their size is allocated.
    let attention = Attention::new(Method::linear()).causal(true);
    let x = Tensor::<f32>::randn([1, 5, 2, 4], 0).unwrap();
    let (_, decoder) = attention.prefill(&x, &x, &x).unwrap();
    let valid = decoder.to_bytes();
    let sizes = 8 + 4 + 1 + 8 + format!("{:?}", attention.method()).len();
    // heads_kv, dim_qk, dim_v (fields 1 to 3 after heads_q): each in turn, then the last
    // two together, set to sizes whose states would need tens of gigabytes.
    for fields in [[1].as_slice(), &[2], &[3], &[2, 3]] {
        let mut bytes = valid.clone();
        for field in fields {
            let at = sizes + 8 * field;
            bytes[at..at + 8].copy_from_slice(&(1u64 << 30).to_le_bytes());
        }
        assert!(
            matches!(
                Decoder::<f32>::from_bytes(&attention, &bytes),
                Err(Error::InvalidState(_))
            ),
            "fields {fields:?}"
        );
    }
}

/// Every method of the catalogue that decodes, continued from the state a first block
/// left (its initial state) in blocks and single steps of awkward lengths, against one
/// causal call over the whole sequence.
#[test]
fn decoders_continue_from_their_state_in_blocks_of_any_length() {
    let shape = Shape::new(2, 150, 4, 2, 16, 8);
    let inputs = shape.inputs::<f64>(31);
    let cuts = [0, 41, 42, 107, 108, 150];
    let mut continued = Vec::new();
    for (name, method) in common::named_methods() {
        let attention = Attention::new(method).causal(true);
        if attention.decoder::<f64>(2, 4, 2, 16, 8).is_err() {
            // The gated family decodes through GatedDecoder (tests/gated.rs).
            assert!(
                attention.method().info().layout == HeadLayout::GroupedValues
                    || ["linformer", "fnet", "cosformer"]
                        .iter()
                        .any(|m| name.starts_with(m)),
                "{name} does not decode"
            );
            continue;
        }
        let expected = attention
            .forward(&inputs[0], &inputs[1], &inputs[2])
            .unwrap();
        for (element, tolerance) in [("f64", 1e-12), ("f32", 1e-5)] {
            let blocks = |decoder: &mut dyn FnMut(usize, usize) -> Tensor<f64>| {
                let parts: Vec<Tensor<f64>> =
                    cuts.windows(2).map(|w| decoder(w[0], w[1])).collect();
                concat_seq(&parts)
            };
            let decoded = if element == "f64" {
                let mut decoder = attention.decoder::<f64>(2, 4, 2, 16, 8).unwrap();
                blocks(&mut |from, to| {
                    let part = |x: &Tensor<f64>| x.slice_seq(from..to).unwrap();
                    let [q, k, v] = inputs.each_ref().map(part);
                    decoder.prefill(&q, &k, &v).unwrap()
                })
            } else {
                let mut decoder = attention.decoder::<f32>(2, 4, 2, 16, 8).unwrap();
                blocks(&mut |from, to| {
                    let part = |x: &Tensor<f64>| x.slice_seq(from..to).unwrap().cast::<f32>();
                    let [q, k, v] = inputs.each_ref().map(part);
                    decoder.prefill(&q, &k, &v).unwrap().cast::<f64>()
                })
            };
            let error = relative_error(&decoded, &expected);
            assert!(error < tolerance, "{name} {element}: {error:e}");
        }
        continued.push(name);
    }
    // cosFormer's position reweighting is what checks the blocks' offsets.
    assert!(
        continued.len() >= 10 && continued.iter().any(|n| n.starts_with("cosformer")),
        "only {continued:?} decode"
    );
}
