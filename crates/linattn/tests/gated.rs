//! Why this file is long: it is the gated family's one public-API suite, and every test
//! shares its inputs, the family read from the catalogue and the comparisons.
//!
//! The gated and delta-rule family through the public API: every method of the family
//! (from the catalogue) continues from its final state, its forms agree, and bad inputs
//! are typed errors naming the tensor and the first bad position.

use linattn::{
    Attention, CausalForm, Error, GateInputs, GatedDeltaRule, Gla, HeadLayout, Method,
    MethodOptions, Tensor, TokenInput, reference,
};

/// q, k `[B, T, H, d_k]`, v `[B, T, HV, d_v]`, and the per-token inputs `method` reads:
/// log decays in [−1, 0] (per channel when `per_channel`), β in (0, 1).
struct Inputs<T: linattn::Element> {
    q: Tensor<T>,
    k: Tensor<T>,
    v: Tensor<T>,
    g: Option<Tensor<T>>,
    beta: Option<Tensor<T>>,
}

fn unit_interval(shape: [usize; 4], seed: u64) -> Tensor<f64> {
    let mut x = Tensor::<f64>::randn(shape, seed).unwrap();
    x.as_mut_slice()
        .iter_mut()
        .for_each(|a| *a = 1.0 / (1.0 + (-1.7 * *a).exp()));
    x
}

fn inputs(method: &Method, [b, t, h, hv, dk, dv]: [usize; 6], per_channel: bool) -> Inputs<f64> {
    let reads = |input| method.info().token_inputs.contains(&input);
    let g = reads(TokenInput::LogDecay).then(|| {
        let mut g = unit_interval([b, t, hv, if per_channel { dk } else { 1 }], 3);
        g.as_mut_slice().iter_mut().for_each(|x| *x = -*x);
        g
    });
    Inputs {
        q: Tensor::randn([b, t, h, dk], 0).unwrap(),
        k: Tensor::randn([b, t, h, dk], 1).unwrap(),
        v: Tensor::randn([b, t, hv, dv], 2).unwrap(),
        g,
        beta: reads(TokenInput::StepSize).then(|| unit_interval([b, t, hv, 1], 4)),
    }
}

impl<T: linattn::Element> Inputs<T> {
    fn gates<'a>(&'a self, initial_state: Option<&'a Tensor<T>>) -> GateInputs<'a, T> {
        GateInputs {
            g: self.g.as_ref(),
            beta: self.beta.as_ref(),
            initial_state,
            ..GateInputs::default()
        }
    }

    /// Tokens `range` of every tensor.
    fn slice(&self, range: std::ops::Range<usize>) -> Self {
        let part = |x: &Tensor<T>| x.slice_seq(range.clone()).unwrap();
        Inputs {
            q: part(&self.q),
            k: part(&self.k),
            v: part(&self.v),
            g: self.g.as_ref().map(part),
            beta: self.beta.as_ref().map(part),
        }
    }

    fn cast<U: linattn::Element>(&self) -> Inputs<U> {
        Inputs {
            q: self.q.cast(),
            k: self.k.cast(),
            v: self.v.cast(),
            g: self.g.as_ref().map(Tensor::cast),
            beta: self.beta.as_ref().map(Tensor::cast),
        }
    }
}

/// Every method of the family, with each of its catalogue examples' options.
fn family() -> Vec<(String, Method)> {
    let mut methods = Vec::new();
    for info in linattn::catalogue().filter(|info| info.layout == HeadLayout::GroupedValues) {
        for example in info.examples {
            let mut options = MethodOptions::new(0, 0);
            for (name, value) in example.iter() {
                options.set(name, value);
            }
            let method = Method::from_options(info.name, &options).unwrap();
            methods.push((format!("{}{example:?}", info.name), method));
        }
    }
    assert_eq!(
        methods
            .iter()
            .map(|(_, m)| m.name())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        4,
        "retention, gla, delta-rule and gated-delta-rule"
    );
    methods
}

fn max_relative(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-300);
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn widen<T: linattn::Element>(x: &Tensor<T>) -> Vec<f64> {
    x.as_slice().iter().map(|a| a.as_f64()).collect()
}

#[test]
fn a_sequence_in_pieces_from_each_final_state_equals_one_call() {
    for (name, method) in family() {
        for per_channel in [false, true] {
            let attention = Attention::new(method.clone()).causal(true);
            let whole_inputs = inputs(&method, [2, 83, 2, 4, 12, 10], per_channel);
            let whole = attention
                .forward_gated(
                    &whole_inputs.q,
                    &whole_inputs.k,
                    &whole_inputs.v,
                    &whole_inputs.gates(None),
                )
                .unwrap();
            // Pieces of one token, of a few, and the rest, each from the last state.
            let mut state: Option<Tensor<f64>> = None;
            let mut outputs = Vec::new();
            for range in [0..1, 1..18, 18..19, 19..83] {
                let piece = whole_inputs.slice(range);
                let result = attention
                    .forward_gated(&piece.q, &piece.k, &piece.v, &piece.gates(state.as_ref()))
                    .unwrap();
                outputs.push(result.out);
                state = Some(result.final_state);
            }
            let what = format!("{name} per channel {per_channel}");
            let state = state.unwrap();
            let error = max_relative(&widen(&state), &widen(&whole.final_state));
            assert!(error < 1e-12, "{what}: final states differ by {error:.2e}");
            // The pieces' outputs in [B, T, HV, d_v] order.
            let row = 4 * 10;
            let mut joined = Vec::new();
            for b in 0..2 {
                for out in &outputs {
                    let rows = out.seq_len();
                    joined.extend_from_slice(&out.as_slice()[b * rows * row..(b + 1) * rows * row]);
                }
            }
            let error = max_relative(&joined, whole.out.as_slice());
            assert!(error < 1e-12, "{what}: outputs differ by {error:.2e}");
        }
    }
}

#[test]
fn chunked_parallel_and_reference_agree_in_f64_and_f32() {
    for (name, method) in family() {
        let chunked = Attention::new(method.clone()).causal(true);
        let parallel = chunked.clone().causal_form(CausalForm::Parallel);
        let inputs = inputs(&method, [1, 70, 1, 2, 16, 8], true);
        let initial = Tensor::<f64>::randn([1, 2, 16, 8], 9).unwrap();
        let gates = inputs.gates(Some(&initial));
        let reference =
            linattn::reference::forward_gated(&chunked, &inputs.q, &inputs.k, &inputs.v, &gates)
                .unwrap();
        for (form, attention) in [("chunked", &chunked), ("parallel", &parallel)] {
            let result = attention
                .forward_gated(&inputs.q, &inputs.k, &inputs.v, &gates)
                .unwrap();
            for (what, got, want) in [
                ("output", &result.out, &reference.out),
                ("final state", &result.final_state, &reference.final_state),
            ] {
                let error = max_relative(&widen(got), &widen(want));
                assert!(error < 1e-12, "{name} {form} f64 {what}: {error:.2e}");
            }
            let narrow = inputs.cast::<f32>();
            let initial = initial.cast::<f32>();
            let result = attention
                .forward_gated(
                    &narrow.q,
                    &narrow.k,
                    &narrow.v,
                    &narrow.gates(Some(&initial)),
                )
                .unwrap();
            let error = max_relative(&widen(&result.out), &widen(&reference.out));
            assert!(error < 1e-5, "{name} {form} f32 output: {error:.2e}");
        }
    }
}

#[test]
fn retention_runs_without_inputs_and_the_others_name_what_they_need() {
    for (name, method) in family() {
        let attention = Attention::new(method.clone()).causal(true);
        let x = Tensor::<f64>::randn([1, 20, 2, 8], 0).unwrap();
        let result = attention.forward(&x, &x, &x);
        if method.info().token_inputs.is_empty() {
            let gated = attention
                .forward_gated(&x, &x, &x, &GateInputs::default())
                .unwrap();
            assert_eq!(result.unwrap(), gated.out, "{name}");
        } else {
            let error = result.unwrap_err();
            assert!(
                matches!(error, Error::MissingInput { .. }),
                "{name}: {error}"
            );
        }
    }
}

#[test]
fn bad_inputs_are_typed_errors_naming_the_first_bad_position() {
    let gdn = Attention::new(Method::GatedDeltaRule(GatedDeltaRule::default())).causal(true);
    let good = inputs(gdn.method(), [1, 10, 2, 4, 8, 8], false);
    let call = |attention: &Attention, g: Option<&Tensor<f64>>, beta: Option<&Tensor<f64>>| {
        let gates = GateInputs {
            g,
            beta,
            ..GateInputs::default()
        };
        attention
            .forward_gated(&good.q, &good.k, &good.v, &gates)
            .unwrap_err()
    };
    let (g, beta) = (good.g.as_ref().unwrap(), good.beta.as_ref().unwrap());
    // A positive log decay at [0, 6, 3, 0].
    let mut positive = g.clone();
    positive.as_mut_slice()[6 * 4 + 3] = 0.25;
    let error = call(&gdn, Some(&positive), Some(beta));
    assert!(
        matches!(&error, Error::OutOfRange { tensor: "g", index, value, .. } if index == &[0, 6, 3, 0] && *value == 0.25),
        "{error}"
    );
    // A non-finite one.
    let mut nan = g.clone();
    nan.as_mut_slice()[5] = f64::NAN;
    assert!(matches!(
        call(&gdn, Some(&nan), Some(beta)),
        Error::NonFinite { tensor: "g", .. }
    ));
    // β past 1, and past 2 where negative eigenvalues allow up to 2.
    let mut large = beta.clone();
    large.as_mut_slice()[9] = 1.5;
    let error = call(&gdn, Some(g), Some(&large));
    assert!(
        matches!(&error, Error::OutOfRange { tensor: "beta", index, .. } if index == &[0, 2, 1, 0]),
        "{error}"
    );
    let negative = Attention::new(Method::GatedDeltaRule(GatedDeltaRule {
        negative_eigenvalues: true,
        ..GatedDeltaRule::default()
    }))
    .causal(true);
    let gates = GateInputs {
        g: Some(g),
        beta: Some(&large),
        ..GateInputs::default()
    };
    assert!(
        negative
            .forward_gated(&good.q, &good.k, &good.v, &gates)
            .is_ok()
    );
    large.as_mut_slice()[9] = 2.5;
    assert!(matches!(
        call(&negative, Some(g), Some(&large)),
        Error::OutOfRange { tensor: "beta", .. }
    ));
    // Missing inputs, and inputs the method does not read.
    assert!(
        matches!(call(&gdn, None, Some(beta)), Error::MissingInput { input, .. } if input.starts_with('g'))
    );
    assert!(
        matches!(call(&gdn, Some(g), None), Error::MissingInput { input, .. } if input.starts_with("beta"))
    );
    let gla = Attention::new(Method::Gla(Gla::default())).causal(true);
    assert!(matches!(
        call(&gla, Some(g), Some(beta)),
        Error::InvalidConfig(_)
    ));
    // Gates of another head count, HV not a multiple of H, and a wrong initial state.
    let other_heads = Tensor::<f64>::zeros([1, 10, 2, 1]).unwrap();
    assert!(matches!(
        call(&gdn, Some(&other_heads), Some(beta)),
        Error::ShapeMismatch { .. }
    ));
    let v3 = Tensor::<f64>::zeros([1, 10, 3, 8]).unwrap();
    let error = gdn
        .forward_gated(&good.q, &good.k, &v3, &good.gates(None))
        .unwrap_err();
    assert!(matches!(error, Error::ShapeMismatch { .. }), "{error}");
    let wrong_state = Tensor::<f64>::zeros([1, 4, 8, 7]).unwrap();
    let error = gdn
        .forward_gated(&good.q, &good.k, &good.v, &good.gates(Some(&wrong_state)))
        .unwrap_err();
    assert!(matches!(error, Error::ShapeMismatch { .. }), "{error}");
    // The family is causal only.
    let full = gdn.clone().causal(false);
    assert!(matches!(
        full.forward_gated(&good.q, &good.k, &good.v, &good.gates(None)),
        Err(Error::InvalidConfig(_))
    ));
    // Another family's method through forward_gated.
    let linear = Attention::new(Method::linear()).causal(true);
    let q = Tensor::<f64>::zeros([1, 10, 2, 8]).unwrap();
    assert!(matches!(
        linear.forward_gated(&q, &q, &q, &GateInputs::default()),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn values_checked_as_the_chunked_form_reads_them_are_named_like_those_checked_before() {
    // A channel gate and q, k, v are checked while the chunked form reads them; what it
    // finds must be the same typed error, at the first bad position, in every form, and
    // an output that overflows from finite inputs is named as such.
    let kda = Attention::new(Method::GatedDeltaRule(GatedDeltaRule::default())).causal(true);
    let good = inputs(kda.method(), [2, 70, 2, 4, 8, 8], true);
    let g = good.g.as_ref().unwrap();
    let forms = [CausalForm::Chunked, CausalForm::Parallel];
    for (form, attention) in forms.map(|form| (form, kda.clone().causal_form(form))) {
        let call = |q: &Tensor<f64>, v: &Tensor<f64>, g: &Tensor<f64>| {
            let gates = GateInputs {
                g: Some(g),
                ..good.gates(None)
            };
            attention.forward_gated(q, &good.k, v, &gates).unwrap_err()
        };
        // g [2, 70, 4, 8]: positive at [1, 65, 2, 3], then also NaN later in the same row.
        let mut positive = g.clone();
        let at = |[b, t, h, c]: [usize; 4]| ((b * 70 + t) * 4 + h) * 8 + c;
        positive.as_mut_slice()[at([1, 65, 2, 3])] = 0.5;
        positive.as_mut_slice()[at([1, 65, 2, 5])] = f64::NAN;
        let error = call(&good.q, &good.v, &positive);
        assert!(
            matches!(&error, Error::OutOfRange { tensor: "g", index, .. } if index == &[1, 65, 2, 3]),
            "{form:?}: {error}"
        );
        let mut nan = g.clone();
        nan.as_mut_slice()[at([0, 3, 1, 0])] = f64::NEG_INFINITY;
        let error = call(&good.q, &good.v, &nan);
        assert!(
            matches!(&error, Error::NonFinite { tensor: "g", index, .. } if index == &[0, 3, 1, 0]),
            "{form:?}: {error}"
        );
        let mut q = good.q.clone();
        q.as_mut_slice()[(70 + 40) * 2 * 8 + 8 + 1] = f64::INFINITY;
        let error = call(&q, &good.v, g);
        assert!(
            matches!(&error, Error::NonFinite { tensor: "q", index, .. } if index == &[1, 40, 1, 1]),
            "{form:?}: {error}"
        );
        let mut huge = good.v.clone();
        huge.as_mut_slice().iter_mut().for_each(|x| *x *= 1e306);
        let error = call(&good.q, &huge, g);
        assert!(
            matches!(&error, Error::NonFiniteOutput { .. }),
            "{form:?}: {error}"
        );
    }
}

#[test]
fn l2norm_inside_equals_normalising_q_and_k_before() {
    let inner = Method::GatedDeltaRule(GatedDeltaRule {
        l2norm_qk: true,
        ..GatedDeltaRule::default()
    });
    let outer = Method::GatedDeltaRule(GatedDeltaRule::default());
    let x = inputs(&inner, [1, 40, 2, 2, 16, 16], false);
    let normalised = |t: &Tensor<f64>| {
        let mut t = t.clone();
        for row in t.as_mut_slice().chunks_exact_mut(16) {
            let norm = (row.iter().map(|a| a * a).sum::<f64>() + 1e-6).sqrt();
            row.iter_mut().for_each(|a| *a /= norm);
        }
        t
    };
    let a = Attention::new(inner)
        .causal(true)
        .forward_gated(&x.q, &x.k, &x.v, &x.gates(None))
        .unwrap();
    let (q, k) = (normalised(&x.q), normalised(&x.k));
    let b = Attention::new(outer)
        .causal(true)
        .forward_gated(&q, &k, &x.v, &x.gates(None))
        .unwrap();
    assert!(max_relative(a.out.as_slice(), b.out.as_slice()) < 1e-13);
}

/// `Σ d_out ∘ out + Σ d_final ∘ final_state` of the f64 reference.
fn loss(
    attention: &Attention,
    x: &Inputs<f64>,
    initial: &Tensor<f64>,
    [d_out, d_final]: [&Tensor<f64>; 2],
) -> f64 {
    let result =
        linattn::reference::forward_gated(attention, &x.q, &x.k, &x.v, &x.gates(Some(initial)))
            .unwrap();
    let dot = |a: &Tensor<f64>, b: &Tensor<f64>| {
        a.as_slice()
            .iter()
            .zip(b.as_slice())
            .map(|(x, y)| x * y)
            .sum::<f64>()
    };
    dot(&result.out, d_out) + dot(&result.final_state, d_final)
}

#[test]
fn gradients_match_finite_differences_of_the_reference() {
    for (name, method) in family() {
        for per_channel in [false, true] {
            let attention = Attention::new(method.clone()).causal(true);
            let (b, t, h, hv, dk, dv) = (2, 9, 1, 2, 3, 2);
            let mut x = inputs(&method, [b, t, h, hv, dk, dv], per_channel);
            // Log decays kept away from 0, where a step up would leave their range.
            if let Some(g) = &mut x.g {
                g.as_mut_slice().iter_mut().for_each(|a| *a -= 0.05);
            }
            let initial = Tensor::<f64>::randn([b, hv, dk, dv], 5).unwrap();
            let d_out = Tensor::<f64>::randn([b, t, hv, dv], 6).unwrap();
            let d_final = Tensor::<f64>::randn([b, hv, dk, dv], 7).unwrap();
            let grads = attention
                .backward_gated(
                    &x.q,
                    &x.k,
                    &x.v,
                    &x.gates(Some(&initial)),
                    &d_out,
                    Some(&d_final),
                )
                .unwrap();
            let what = format!("{name} per channel {per_channel}");
            // Each input (q, k, v, the initial state, g, β), perturbed element by element.
            let numeric = |which: usize, count: usize| {
                (0..count)
                    .map(|i| {
                        let at = |step: f64| {
                            let (mut x, mut initial) = (x.slice(0..t), initial.clone());
                            let input = match which {
                                0 => &mut x.q,
                                1 => &mut x.k,
                                2 => &mut x.v,
                                3 => &mut initial,
                                4 => x.g.as_mut().unwrap(),
                                _ => x.beta.as_mut().unwrap(),
                            };
                            input.as_mut_slice()[i] += step;
                            loss(&attention, &x, &initial, [&d_out, &d_final])
                        };
                        let h = 1e-6;
                        (at(h) - at(-h)) / (2.0 * h)
                    })
                    .collect::<Vec<f64>>()
            };
            let len = |x: &Tensor<f64>| x.as_slice().len();
            let mut checks: Vec<(&str, &Tensor<f64>, Vec<f64>)> = vec![
                ("dq", &grads.dq, numeric(0, len(&x.q))),
                ("dk", &grads.dk, numeric(1, len(&x.k))),
                ("dv", &grads.dv, numeric(2, len(&x.v))),
                (
                    "d_initial_state",
                    &grads.d_initial_state,
                    numeric(3, len(&initial)),
                ),
            ];
            if let (Some(dg), Some(g)) = (&grads.dg, &x.g) {
                checks.push(("dg", dg, numeric(4, len(g))));
            }
            if let (Some(dbeta), Some(beta)) = (&grads.dbeta, &x.beta) {
                checks.push(("dbeta", dbeta, numeric(5, len(beta))));
            }
            assert_eq!(grads.dg.is_some(), x.g.is_some(), "{what}");
            assert_eq!(grads.dbeta.is_some(), x.beta.is_some(), "{what}");
            for (input, analytic, numeric) in checks {
                let error = max_relative(analytic.as_slice(), &numeric);
                assert!(error < 1e-6, "{what} {input}: {error:.2e}");
            }
        }
    }
}

#[test]
fn f32_gradients_match_f64_gradients() {
    for (name, method) in family() {
        let attention = Attention::new(method.clone()).causal(true);
        let x = inputs(&method, [1, 150, 2, 4, 16, 8], true);
        let initial = Tensor::<f64>::randn([1, 4, 16, 8], 5).unwrap();
        let d_out = Tensor::<f64>::randn([1, 150, 4, 8], 6).unwrap();
        let exact = attention
            .backward_gated(&x.q, &x.k, &x.v, &x.gates(Some(&initial)), &d_out, None)
            .unwrap();
        let narrow = x.cast::<f32>();
        let initial = initial.cast::<f32>();
        let single = attention
            .backward_gated(
                &narrow.q,
                &narrow.k,
                &narrow.v,
                &narrow.gates(Some(&initial)),
                &d_out.cast(),
                None,
            )
            .unwrap();
        let pairs = [
            ("dq", Some(&single.dq), Some(&exact.dq)),
            ("dk", Some(&single.dk), Some(&exact.dk)),
            ("dv", Some(&single.dv), Some(&exact.dv)),
            ("dg", single.dg.as_ref(), exact.dg.as_ref()),
            ("dbeta", single.dbeta.as_ref(), exact.dbeta.as_ref()),
            (
                "d_initial_state",
                Some(&single.d_initial_state),
                Some(&exact.d_initial_state),
            ),
        ];
        for (input, a, b) in pairs {
            if let (Some(a), Some(b)) = (a, b) {
                let error = max_relative(&widen(a), &widen(b));
                assert!(error < 1e-4, "{name} {input}: {error:.2e}");
            }
        }
    }
}

#[test]
fn packed_sequences_run_as_separate_calls_each_from_its_own_state() {
    let lengths = [5, 0, 37, 1, 20];
    let total: usize = lengths.iter().sum();
    let cu: Vec<usize> = std::iter::once(0)
        .chain(lengths.iter().scan(0, |end, &l| {
            *end += l;
            Some(*end)
        }))
        .collect();
    for (name, method) in family() {
        let attention = Attention::new(method.clone()).causal(true);
        let x = inputs(&method, [1, total, 2, 4, 8, 6], true);
        let initial = Tensor::<f64>::randn([lengths.len(), 4, 8, 6], 3).unwrap();
        let d_out = Tensor::<f64>::randn([1, total, 4, 6], 4).unwrap();
        let packed_inputs = GateInputs {
            cu_seqlens: Some(&cu),
            ..x.gates(Some(&initial))
        };
        let packed = attention
            .forward_gated(&x.q, &x.k, &x.v, &packed_inputs)
            .unwrap();
        let grads = attention
            .backward_gated(&x.q, &x.k, &x.v, &packed_inputs, &d_out, None)
            .unwrap();
        assert_eq!(packed.final_state.shape(), initial.shape(), "{name}");
        // The f64 reference takes packed sequences too, each from its own state.
        let exact = reference::forward_gated(&attention, &x.q, &x.k, &x.v, &packed_inputs).unwrap();
        let error = max_relative(exact.out.as_slice(), packed.out.as_slice());
        assert!(
            error < 1e-12,
            "{name}: packed reference outputs {error:.2e}"
        );
        let error = max_relative(exact.final_state.as_slice(), packed.final_state.as_slice());
        assert!(error < 1e-12, "{name}: packed reference states {error:.2e}");
        let state = |t: &Tensor<f64>, n: usize| {
            let size = 4 * 8 * 6;
            Tensor::from_vec(
                t.as_slice()[n * size..(n + 1) * size].to_vec(),
                [1, 4, 8, 6],
            )
            .unwrap()
        };
        for (n, range) in cu.windows(2).map(|w| w[0]..w[1]).enumerate() {
            let own = state(&initial, n);
            if range.is_empty() {
                // No token: the state passes through, and so does its gradient (none).
                assert_eq!(state(&packed.final_state, n), own, "{name}");
                continue;
            }
            let piece = x.slice(range.clone());
            let alone = attention
                .forward_gated(&piece.q, &piece.k, &piece.v, &piece.gates(Some(&own)))
                .unwrap();
            let rows = |t: &Tensor<f64>| t.slice_seq(range.clone()).unwrap();
            let error = max_relative(rows(&packed.out).as_slice(), alone.out.as_slice());
            assert!(error < 1e-12, "{name} sequence {n}: outputs {error:.2e}");
            let error = max_relative(
                state(&packed.final_state, n).as_slice(),
                alone.final_state.as_slice(),
            );
            assert!(
                error < 1e-12,
                "{name} sequence {n}: final state {error:.2e}"
            );
            let alone_grads = attention
                .backward_gated(
                    &piece.q,
                    &piece.k,
                    &piece.v,
                    &piece.gates(Some(&own)),
                    &rows(&d_out),
                    None,
                )
                .unwrap();
            let error = max_relative(rows(&grads.dk).as_slice(), alone_grads.dk.as_slice());
            assert!(error < 1e-12, "{name} sequence {n}: dk {error:.2e}");
            let error = max_relative(
                state(&grads.d_initial_state, n).as_slice(),
                alone_grads.d_initial_state.as_slice(),
            );
            assert!(
                error < 1e-12,
                "{name} sequence {n}: d initial state {error:.2e}"
            );
        }
        // Offsets that do not cover the tokens, or go back, are named.
        for bad in [vec![0, 5, 3, total], vec![1, total], vec![0, total - 1]] {
            let inputs = GateInputs {
                cu_seqlens: Some(&bad),
                ..x.gates(None)
            };
            let error = attention
                .forward_gated(&x.q, &x.k, &x.v, &inputs)
                .unwrap_err();
            assert!(
                matches!(error, Error::InvalidConfig(ref m) if m.contains("cu_seqlens")),
                "{error}"
            );
        }
    }
}

#[test]
fn decoders_continue_a_prefill_in_steps_and_blocks_and_restore_from_bytes() {
    use linattn::GatedDecoder;
    for (name, method) in family() {
        for per_channel in [false, true] {
            let attention = Attention::new(method.clone()).causal(true);
            let (b, t) = (2, 60);
            let x = inputs(&method, [b, t, 2, 4, 8, 6], per_channel);
            let whole = attention
                .forward_gated(&x.q, &x.k, &x.v, &x.gates(None))
                .unwrap();
            let prompt = x.slice(0..30);
            let (first, mut decoder) = attention
                .prefill_gated(&prompt.q, &prompt.k, &prompt.v, &prompt.gates(None))
                .unwrap();
            let mut pieces = vec![first];
            // Single steps, a block, a save and restore, single steps again.
            for range in [30..31, 31..32, 32..45, 45..46, 46..60] {
                if range.start == 45 {
                    let bytes = decoder.to_bytes();
                    decoder = GatedDecoder::from_bytes(&attention, &bytes).unwrap();
                }
                for piece_range in if range.len() == 14 {
                    (range.start..range.end)
                        .map(|i| i..i + 1)
                        .collect::<Vec<_>>()
                } else {
                    vec![range]
                } {
                    let p = x.slice(piece_range.clone());
                    let out = if piece_range.len() == 1 {
                        decoder.step(&p.q, &p.k, &p.v, p.g.as_ref(), p.beta.as_ref())
                    } else {
                        decoder.prefill(&p.q, &p.k, &p.v, p.g.as_ref(), p.beta.as_ref())
                    }
                    .unwrap();
                    pieces.push(out);
                }
            }
            assert_eq!(decoder.positions(), vec![t; b], "{name}");
            let what = format!("{name} per channel {per_channel}");
            let error = max_relative(decoder.state().as_slice(), whole.final_state.as_slice());
            assert!(error < 1e-12, "{what}: final state {error:.2e}");
            let row = 4 * 6;
            let mut joined = Vec::new();
            for batch in 0..b {
                for piece in &pieces {
                    let rows = piece.seq_len();
                    joined.extend_from_slice(
                        &piece.as_slice()[batch * rows * row..(batch + 1) * rows * row],
                    );
                }
            }
            let error = max_relative(&joined, whole.out.as_slice());
            assert!(error < 1e-12, "{what}: outputs {error:.2e}");
        }
    }
}

#[test]
fn decoder_misuse_and_corrupt_state_are_typed_errors() {
    use linattn::GatedDecoder;
    let attention = Attention::new(Method::Gla(Gla::default())).causal(true);
    let mut decoder = attention.gated_decoder::<f32>(1, 2, 2, 4, 4).unwrap();
    let token = Tensor::<f32>::randn([1, 1, 2, 4], 0).unwrap();
    let g = Tensor::from_vec(vec![-0.1f32; 2], [1, 1, 2, 1]).unwrap();
    // Missing g, a block of two through step, a positive g.
    assert!(matches!(
        decoder.step(&token, &token, &token, None, None),
        Err(Error::MissingInput { .. })
    ));
    let two = Tensor::<f32>::randn([1, 2, 2, 4], 0).unwrap();
    let g2 = Tensor::from_vec(vec![-0.1f32; 4], [1, 2, 2, 1]).unwrap();
    assert!(matches!(
        decoder.step(&two, &two, &two, Some(&g2), None),
        Err(Error::ShapeMismatch { .. })
    ));
    let positive = Tensor::from_vec(vec![-0.1f32, 0.3], [1, 1, 2, 1]).unwrap();
    assert!(matches!(
        decoder.step(&token, &token, &token, Some(&positive), None),
        Err(Error::OutOfRange { .. })
    ));
    assert_eq!(decoder.positions(), vec![0], "refused steps change nothing");
    decoder
        .step(&token, &token, &token, Some(&g), None)
        .unwrap();
    let bytes = decoder.to_bytes();
    for cut in [0, 8, 20, bytes.len() - 1] {
        let error = GatedDecoder::<f32>::from_bytes(&attention, &bytes[..cut])
            .err()
            .unwrap();
        assert!(
            matches!(error, Error::InvalidState(_)),
            "cut at {cut}: {error}"
        );
    }
    let other = Attention::new(Method::Gla(Gla {
        chunk: 8,
        ..Gla::default()
    }))
    .causal(true);
    assert!(matches!(
        GatedDecoder::<f32>::from_bytes(&other, &bytes),
        Err(Error::InvalidState(_))
    ));
    assert!(matches!(
        GatedDecoder::<f64>::from_bytes(&attention, &bytes),
        Err(Error::InvalidState(_))
    ));
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        GatedDecoder::<f32>::from_bytes(&attention, &longer),
        Err(Error::InvalidState(_))
    ));
    let restored = GatedDecoder::<f32>::from_bytes(&attention, &bytes).unwrap();
    assert_eq!(restored.state(), decoder.state());
    // Methods outside the family have their own decoder.
    assert!(matches!(
        Attention::new(Method::linear()).gated_decoder::<f32>(1, 2, 2, 4, 4),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn raw_gates_and_beta_logits_match_their_values_and_their_gradients() {
    use linattn::RawGate;
    for per_channel in [false, true] {
        let attention = Attention::new(Method::GatedDeltaRule(GatedDeltaRule {
            l2norm_qk: true,
            ..GatedDeltaRule::default()
        }))
        .causal(true);
        let (b, t, hv, dk) = (1, 11, 2, 3);
        let x = inputs(attention.method(), [b, t, 1, hv, dk, 2], false);
        let width = if per_channel { dk } else { 1 };
        let a = Tensor::<f64>::randn([b, t, hv, width], 21).unwrap();
        let logits = Tensor::<f64>::randn([b, t, hv, 1], 22).unwrap();
        let a_log = vec![0.3, -0.4];
        let dt_bias: Vec<f64> = (0..hv * width).map(|i| 0.1 * i as f64 - 0.2).collect();
        let raw = |a: &Tensor<f64>,
                   a_log: &[f64],
                   dt_bias: &[f64],
                   logits: &Tensor<f64>|
         -> (Tensor<f64>, Tensor<f64>) {
            let gate = RawGate { a, a_log, dt_bias };
            let inputs = GateInputs {
                raw_gate: Some(gate),
                beta_logits: Some(logits),
                ..GateInputs::default()
            };
            let result =
                linattn::reference::forward_gated(&attention, &x.q, &x.k, &x.v, &inputs).unwrap();
            (result.out, result.final_state)
        };
        // The same as g and β given: g = −exp(A_log)·softplus(a + dt_bias), β = σ(logits).
        let g: Vec<f64> = a
            .as_slice()
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                let (h, c) = ((i / width) % hv, i % width);
                -f64::exp(a_log[h]) * (1.0 + f64::exp(a + dt_bias[h * width + c])).ln()
            })
            .collect();
        let g = Tensor::from_vec(g, a.shape()).unwrap();
        let beta = Tensor::from_vec(
            logits
                .as_slice()
                .iter()
                .map(|&z| 1.0 / (1.0 + (-z).exp()))
                .collect(),
            logits.shape(),
        )
        .unwrap();
        let given = GateInputs {
            g: Some(&g),
            beta: Some(&beta),
            ..GateInputs::default()
        };
        let expected = attention.forward_gated(&x.q, &x.k, &x.v, &given).unwrap();
        let (out, _) = raw(&a, &a_log, &dt_bias, &logits);
        assert!(max_relative(out.as_slice(), expected.out.as_slice()) < 1e-12);
        // Gradients of Σ d_out ∘ out against central differences of the reference.
        let d_out = Tensor::<f64>::randn([b, t, hv, 2], 23).unwrap();
        let gate = RawGate {
            a: &a,
            a_log: &a_log,
            dt_bias: &dt_bias,
        };
        let inputs = GateInputs {
            raw_gate: Some(gate),
            beta_logits: Some(&logits),
            ..GateInputs::default()
        };
        let grads = attention
            .backward_gated(&x.q, &x.k, &x.v, &inputs, &d_out, None)
            .unwrap();
        let raw_grads = grads.raw_gate.expect("a raw gate was given");
        let loss = |a: &Tensor<f64>, a_log: &[f64], dt_bias: &[f64], logits: &Tensor<f64>| {
            let (out, _) = raw(a, a_log, dt_bias, logits);
            out.as_slice()
                .iter()
                .zip(d_out.as_slice())
                .map(|(o, d)| o * d)
                .sum::<f64>()
        };
        let h = 1e-6;
        let numeric = |which: usize, count: usize| -> Vec<f64> {
            (0..count)
                .map(|i| {
                    let at = |step: f64| {
                        let (mut a, mut a_log, mut dt_bias, mut logits) =
                            (a.clone(), a_log.clone(), dt_bias.clone(), logits.clone());
                        match which {
                            0 => a.as_mut_slice()[i] += step,
                            1 => a_log[i] += step,
                            2 => dt_bias[i] += step,
                            _ => logits.as_mut_slice()[i] += step,
                        }
                        loss(&a, &a_log, &dt_bias, &logits)
                    };
                    (at(h) - at(-h)) / (2.0 * h)
                })
                .collect()
        };
        let dbeta_logits = grads.dbeta_logits.expect("logits were given");
        for (input, analytic, numeric) in [
            (
                "da",
                raw_grads.da.as_slice(),
                numeric(0, a.as_slice().len()),
            ),
            ("dA_log", &raw_grads.d_a_log[..], numeric(1, a_log.len())),
            (
                "ddt_bias",
                &raw_grads.d_dt_bias[..],
                numeric(2, dt_bias.len()),
            ),
            (
                "dlogits",
                dbeta_logits.as_slice(),
                numeric(3, logits.as_slice().len()),
            ),
        ] {
            let error = max_relative(analytic, &numeric);
            assert!(
                error < 1e-6,
                "per channel {per_channel} {input}: {error:.2e}"
            );
        }
        // Given both ways, or with parameters of the wrong length: named.
        let both = GateInputs {
            g: Some(&g),
            ..inputs
        };
        assert!(matches!(
            attention.forward_gated(&x.q, &x.k, &x.v, &both),
            Err(Error::InvalidConfig(_))
        ));
        let short = GateInputs {
            raw_gate: Some(RawGate {
                a_log: &a_log[..1],
                ..gate
            }),
            ..inputs
        };
        assert!(matches!(
            attention.forward_gated(&x.q, &x.k, &x.v, &short),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
