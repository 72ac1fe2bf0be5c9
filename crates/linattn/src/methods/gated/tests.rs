//! The engine's recurrent, chunked and parallel forms against the f64 recurrences
//! ([`reference`](super::reference)) on awkward shapes, every decay, with and without the
//! delta rule, in f64 and f32; and strong decay, which overflows any form that multiplies
//! by a growing factor.

use super::reference::recurrence;
use super::{GateInputs, Rule, RuleDecay};
use crate::base::{Element, Problem, Tensor};
use crate::engine::gated::{Decay, Gates, chunked::chunked, recurrent::recurrent};
use crate::methods::gated::gated_shape;

/// Sizes of one case: batch, length, query/key heads, value heads, d_k, d_v.
type Sizes = (usize, usize, usize, usize, usize, usize);

/// Lengths of one token, odd, off the chunk and past several chunks; HV = H and 2H; d_k
/// unlike d_v; a d_v past the recurrent step's register block of 64 columns.
const SIZES: [Sizes; 6] = [
    (1, 1, 1, 1, 4, 3),
    (2, 37, 2, 4, 8, 5),
    (1, 100, 1, 2, 16, 16),
    (2, 65, 2, 2, 7, 9),
    (1, 130, 2, 2, 32, 24),
    (1, 67, 1, 1, 64, 136),
];

/// Which decay a case runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DecayKind {
    None,
    Fixed,
    Token,
    Channel,
}

const KINDS: [DecayKind; 4] = [
    DecayKind::None,
    DecayKind::Fixed,
    DecayKind::Token,
    DecayKind::Channel,
];

/// One case in f64: the problem, q, k (rows of unit length, as the delta rule wants), v,
/// log decays in [−strength, 0], β in [0, 1] and a random initial state.
struct Case {
    problem: Problem,
    rule: Rule,
    q: Tensor<f64>,
    k: Tensor<f64>,
    v: Tensor<f64>,
    g: Option<Tensor<f64>>,
    beta: Option<Tensor<f64>>,
    initial: Tensor<f64>,
}

impl Case {
    fn new(sizes: Sizes, kind: DecayKind, delta: bool, strength: f64, seed: u64) -> Self {
        let (batch, len, heads, heads_v, dk, dv) = sizes;
        let randn = |shape, seed| Tensor::<f64>::randn(shape, seed).unwrap();
        // Values in (0, 1): a logistic function of normal ones.
        let uniform = |shape: [usize; 4], seed| {
            let mut x = randn(shape, seed);
            x.as_mut_slice()
                .iter_mut()
                .for_each(|a| *a = 1.0 / (1.0 + (-1.7 * *a).exp()));
            x
        };
        let mut k = randn([batch, len, heads, dk], seed + 1);
        for row in k.as_mut_slice().chunks_exact_mut(dk) {
            let norm = row.iter().map(|a| a * a).sum::<f64>().sqrt();
            row.iter_mut().for_each(|a| *a /= norm);
        }
        let decay_values = |shape: [usize; 4]| {
            let mut g = uniform(shape, seed + 3);
            g.as_mut_slice().iter_mut().for_each(|x| *x *= -strength);
            g
        };
        let (decay, g) = match kind {
            DecayKind::None => (RuleDecay::None, None),
            DecayKind::Fixed => {
                let g = decay_values([1, 1, 1, heads_v]);
                (RuleDecay::Fixed(g.as_slice().to_vec()), None)
            }
            DecayKind::Token => (
                RuleDecay::Input,
                Some(decay_values([batch, len, heads_v, 1])),
            ),
            DecayKind::Channel => (
                RuleDecay::Input,
                Some(decay_values([batch, len, heads_v, dk])),
            ),
        };
        let rule = Rule {
            method: "test",
            decay,
            delta,
            beta_max: 1.0,
            scale: Some(0.7),
            l2norm_qk: false,
            chunk: 64,
        };
        let q = randn([batch, len, heads, dk], seed);
        let v = randn([batch, len, heads_v, dv], seed + 2);
        let problem = Problem::grouped_values(q.shape(), k.shape(), v.shape(), true).unwrap();
        Self {
            problem,
            rule,
            q,
            k,
            v,
            g,
            beta: delta.then(|| uniform([batch, len, heads_v, 1], seed + 4)),
            initial: randn([batch, heads_v, dk, dv], seed + 5),
        }
    }

    fn inputs(&self) -> GateInputs<'_, f64> {
        GateInputs {
            g: self.g.as_ref(),
            beta: self.beta.as_ref(),
            initial_state: Some(&self.initial),
            ..GateInputs::default()
        }
    }

    /// One form of the engine in `T` (`None`: recurrent; else chunks of that many
    /// tokens): outputs and final states, widened to f64.
    fn run<T: Element>(&self, form: Option<usize>) -> (Vec<f64>, Vec<f64>) {
        let cast = |x: &Tensor<f64>| x.cast::<T>();
        let [q, k, v] = [&self.q, &self.k, &self.v].map(cast);
        let g = self.g.as_ref().map(cast);
        let beta = self.beta.as_ref().map(cast);
        let fixed: Vec<T>;
        let decay = match (&self.rule.decay, &g) {
            (RuleDecay::None, _) => Decay::None,
            (RuleDecay::Fixed(per_head), _) => {
                fixed = per_head.iter().map(|&x| T::of_f64(x)).collect();
                Decay::Fixed(&fixed)
            }
            (RuleDecay::Input, Some(g)) if g.head_dim() == 1 => Decay::Token(g.as_slice()),
            (RuleDecay::Input, Some(g)) => Decay::Channel(g.as_slice()),
            (RuleDecay::Input, None) => unreachable!(),
        };
        let gates = Gates {
            decay,
            beta: beta.as_ref().map(Tensor::as_slice),
            l2norm_qk: self.rule.l2norm_qk,
            cu_seqlens: None,
        };
        let shape = gated_shape(&self.problem);
        let mut states = cast(&self.initial);
        let mut out = Tensor::<T>::zeros(self.problem.shapes()[2]).unwrap();
        let scale = T::of_f64(0.7);
        let states_slice = states.as_mut_slice();
        match form {
            None => recurrent(&shape, [&q, &k, &v], &gates, scale, states_slice, &mut out),
            Some(chunk) => {
                let inputs = [&q, &k, &v];
                let verified =
                    chunked(&shape, inputs, &gates, scale, chunk, states_slice, &mut out);
                assert!(verified, "finite inputs and results, found otherwise");
            }
        }
        let widen = |x: &[T]| x.iter().map(|a| a.as_f64()).collect::<Vec<_>>();
        (widen(out.as_slice()), widen(states.as_slice()))
    }
}

fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    let (diff, norm) = a.iter().zip(b).fold((0.0, 0.0), |(d, n), (x, y)| {
        (d + (x - y).powi(2), n + y * y)
    });
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// Every form (recurrent, chunks of `chunks`, the whole sequence as one chunk), in f64
/// and f32, against the reference: outputs and final states.
fn check_all(strength: f64, chunks: &[usize]) {
    for (index, sizes) in SIZES.into_iter().enumerate() {
        for kind in KINDS {
            for delta in [false, true] {
                let case = Case::new(sizes, kind, delta, strength, 10 * index as u64);
                let expected = recurrence(
                    &case.rule,
                    &case.problem,
                    [&case.q, &case.k, &case.v],
                    &case.inputs(),
                )
                .unwrap();
                let (out, states) = (expected.out.as_slice(), expected.final_state.as_slice());
                let len = sizes.1;
                let forms = std::iter::once(None)
                    .chain(chunks.iter().map(|&c| Some(c.min(len))))
                    .chain([Some(len)]);
                for form in forms {
                    let what = format!(
                        "{sizes:?} {kind:?} delta {delta} chunk {form:?} strength {strength}"
                    );
                    let (o64, s64) = case.run::<f64>(form);
                    let (o32, s32) = case.run::<f32>(form);
                    for (name, got, want, tolerance) in [
                        ("f64 outputs", &o64[..], out, 1e-11),
                        ("f64 states", &s64[..], states, 1e-11),
                        ("f32 outputs", &o32[..], out, 2e-5),
                        ("f32 states", &s32[..], states, 2e-5),
                    ] {
                        let error = relative_error(got, want);
                        assert!(
                            error < tolerance,
                            "{what}: {name} relative error {error:.2e}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn recurrent_chunked_and_parallel_forms_match_the_recurrence() {
    check_all(0.5, &[1, 16, 64]);
}

#[test]
fn strong_decay_stays_finite_and_exact() {
    // Log decays down to −30 a token: e^{±30·64} overflows any float unless every
    // exponent stays ≤ 0.
    check_all(30.0, &[16, 64]);
}
