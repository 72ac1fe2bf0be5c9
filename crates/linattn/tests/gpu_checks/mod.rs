//! The GPU's kernels against the f64 reference on awkward shapes, one named case per
//! kernel family, shape and element type (`checks::linear::causal::bf16::q[2, 77, 4, 32]
//! kv 4 dv 32`). f32 must match the reference to 1e-4; bf16 and f16 within twice the
//! error the peers' arithmetic makes in that type (PyTorch's linear attention, SDPA,
//! performer-pytorch), emulated here in f64 with their roundings, capped at eight
//! roundings of the type so that every check can fail.

use half::{bf16, f16};
use libtest_mimic::{Failed, Trial};
use linattn::cuda::{Gpu, GpuDecoder, GpuElement, GpuTensor};
use linattn::{Attention, Method, Performer, Tensor, Window, reference};
use std::sync::Arc;

pub mod gated;
mod peers;
use peers::{exact_peer_error, peer_error, peer_tolerance, performer_peer_error};

type Result<T> = std::result::Result<T, Failed>;

/// One way of checking a case on the GPU.
type Check = fn(&Case, &Gpu) -> Result<()>;

/// The linear method's epsilon in the denominator (as in the library).
const EPSILON: f64 = 1e-6;

/// One element type on the GPU, with the rounding its inputs and outputs go through.
trait Precision: GpuElement {
    const LABEL: &'static str;
    /// Half the spacing of values near 1: the relative error of one rounding.
    const UNIT_ROUNDOFF: f64;
    fn round(x: f64) -> f64;
}

impl Precision for f32 {
    const LABEL: &'static str = "f32";
    const UNIT_ROUNDOFF: f64 = f32::EPSILON as f64 / 2.0;
    fn round(x: f64) -> f64 {
        x as f32 as f64
    }
}

impl Precision for bf16 {
    const LABEL: &'static str = "bf16";
    const UNIT_ROUNDOFF: f64 = 1.0 / 256.0;
    fn round(x: f64) -> f64 {
        bf16::from_f64(x).to_f64()
    }
}

impl Precision for f16 {
    const LABEL: &'static str = "f16";
    const UNIT_ROUNDOFF: f64 = 1.0 / 2048.0;
    fn round(x: f64) -> f64 {
        f16::from_f64(x).to_f64()
    }
}

fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    let (diff, norm) = a.iter().zip(b).fold((0.0, 0.0), |(d, n), (&x, &y)| {
        (d + (x - y).powi(2), n + y * y)
    });
    (diff / norm).sqrt()
}

fn as_f64(x: &Tensor<f32>) -> Vec<f64> {
    x.as_slice().iter().map(|&x| x as f64).collect()
}

/// f32 inputs must match the reference to this relative error.
const F32_TOLERANCE: f64 = 1e-4;

fn random(shape: [usize; 4], seed: u64) -> Result<Tensor<f32>> {
    Ok(Tensor::<f32>::randn(shape, seed)?)
}

/// q of `shape`, and k, v of `len_k` rows, `heads_kv` heads, v of width `dim_v`.
fn inputs(
    shape: [usize; 4],
    len_k: usize,
    heads_kv: usize,
    dim_v: usize,
    seed: u64,
) -> Result<[Tensor<f32>; 3]> {
    let [b, _, _, d] = shape;
    Ok([
        random(shape, seed)?,
        random([b, len_k, heads_kv, d], seed + 1)?,
        random([b, len_k, heads_kv, dim_v], seed + 2)?,
    ])
}

/// Sides of a window: keys visible before and after each query, `None` unbounded.
type Sides = (Option<usize>, Option<usize>);

/// Which peer's arithmetic sets the 16-bit tolerances.
#[derive(Clone, Copy)]
enum Peer {
    /// PyTorch's linear attention (causal or not).
    Linear(bool),
    /// SDPA over the keys these sides (the causal mask applied) leave visible.
    Exact(Sides),
    /// performer-pytorch's non-causal FAVOR+ with these features drawn from this seed.
    Performer { features: usize, seed: u64 },
}

impl Peer {
    fn tolerance<P: Precision>(self, inputs: [&Tensor<f32>; 3], exact: &[f64]) -> f64 {
        peer_tolerance::<P>(match self {
            Peer::Linear(causal) => peer_error::<P>(causal, inputs, exact),
            Peer::Exact(sides) => exact_peer_error::<P>(sides, inputs, exact),
            Peer::Performer { features, seed } => {
                performer_peer_error::<P>(features, seed, inputs, exact)
            }
        })
    }
}

/// `window` with these sides, or plain softmax when both are unbounded.
fn exact_attention(causal: bool, (left, right): Sides) -> Attention {
    let method = if left.is_none() && right.is_none() {
        Method::softmax()
    } else {
        Method::Window(Window::new(left, right))
    };
    Attention::new(method).causal(causal)
}

/// One case: the attention, its inputs and the peer whose arithmetic sets the 16-bit
/// tolerance.
struct Case {
    attention: Attention,
    inputs: [Tensor<f32>; 3],
    peer: Peer,
    /// For a decoder: the lengths of the blocks it is fed in turn (a decode step for one
    /// token, prefill for more); empty for one call.
    blocks: Vec<usize>,
}

impl Case {
    fn inputs(&self) -> [&Tensor<f32>; 3] {
        let [q, k, v] = &self.inputs;
        [q, k, v]
    }

    /// The f64 reference's output and the tolerance in `P`.
    fn judge<P: Precision>(&self) -> Result<(Vec<f64>, f64)> {
        let [q, k, v] = self.inputs();
        let exact =
            reference::forward(&self.attention, &q.cast(), &k.cast(), &v.cast())?.into_vec();
        let tolerance = if P::LABEL == "f32" {
            F32_TOLERANCE
        } else {
            self.peer.tolerance::<P>([q, k, v], &exact)
        };
        Ok((exact, tolerance))
    }

    /// One forward call on the GPU in `P` against the reference.
    fn check<P: Precision>(&self, gpu: &Gpu) -> Result<()> {
        let (exact, tolerance) = self.judge::<P>()?;
        let [q, k, v] = self.inputs();
        let upload = |x| GpuTensor::<P>::upload(gpu, x);
        let out = self
            .attention
            .forward(&upload(q)?, &upload(k)?, &upload(v)?)?
            .download()?;
        verdict(relative_error(&as_f64(&out), &exact), tolerance)
    }

    /// The tokens through a decoder in the case's blocks (prefill for a block of more than
    /// one token, a decode step for one), in `P`, against the reference's one causal call
    /// over all of them.
    fn check_decode<P: Precision>(&self, gpu: &Gpu) -> Result<()> {
        let (exact, tolerance) = self.judge::<P>()?;
        let [q, k, v] = self.inputs();
        let [batch, len, _, dim_k] = q.shape();
        assert_eq!(
            self.blocks.iter().sum::<usize>(),
            len,
            "the blocks cover the tokens"
        );
        let part = |x: &Tensor<f32>, range| -> Result<GpuTensor<P>> {
            Ok(GpuTensor::upload(gpu, &x.slice_seq(range)?)?)
        };
        let mut decoder = GpuDecoder::<P>::new(
            gpu,
            &self.attention,
            batch,
            q.heads(),
            k.heads(),
            dim_k,
            v.head_dim(),
        )?;
        let mut pieces = Vec::new();
        let mut start = 0;
        for &block in &self.blocks {
            let range = start..start + block;
            let [q, k, v] = [q, k, v].map(|x| part(x, range.clone()));
            let (q, k, v) = (q?, k?, v?);
            let out = if block == 1 {
                decoder.step(&q, &k, &v)?
            } else {
                decoder.prefill(&q, &k, &v)?
            };
            pieces.push(out.download()?);
            start += block;
        }
        if decoder.positions() != vec![len; batch] {
            return Err(format!("positions {:?} after {len} tokens", decoder.positions()).into());
        }
        // The pieces back in [B, T, H, D] order.
        let row = q.heads() * v.head_dim();
        let mut out = Vec::with_capacity(exact.len());
        for b in 0..batch {
            for piece in &pieces {
                let rows = piece.seq_len();
                out.extend(
                    piece.as_slice()[b * rows * row..(b + 1) * rows * row]
                        .iter()
                        .map(|&x| x as f64),
                );
            }
        }
        verdict(relative_error(&out, &exact), tolerance)
    }

    /// The case's name after its family: q's shape, the keys' length, kv heads and dv.
    fn name(&self) -> String {
        let [q, k, v] = self.inputs();
        format!(
            "q{:?} k len {} kv {} dv {}",
            q.shape(),
            k.seq_len(),
            k.heads(),
            v.head_dim()
        )
    }
}

fn verdict(error: f64, tolerance: f64) -> Result<()> {
    if error.is_finite() && error <= tolerance {
        Ok(())
    } else {
        Err(format!("relative error {error:.3e} > tolerance {tolerance:.1e}").into())
    }
}

/// q's shape, the keys' length, kv heads, causal, window sides.
type ExactCase = ([usize; 4], usize, usize, bool, Sides);

/// Every case as a trial, ignored when `gpu` is `None`.
pub fn trials(gpu: Option<Arc<Gpu>>) -> Vec<Trial> {
    let mut trials = Vec::new();
    let mut add = |family: String, case: Result<Case>, check: Check| {
        let gpu = gpu.clone();
        let (name, case) = match case {
            Ok(case) => (format!("checks::{family}::{}", case.name()), Ok(case)),
            Err(error) => (format!("checks::{family}::inputs"), Err(error)),
        };
        let absent = gpu.is_none();
        trials.push(
            Trial::test(name, move || {
                let gpu = gpu.ok_or("no GPU")?;
                check(&case?, &gpu)
            })
            .with_ignored_flag(absent),
        );
    };
    fn every_precision(family: &str) -> [(String, Check); 3] {
        [
            (format!("{family}::f32"), |c, g| c.check::<f32>(g)),
            (format!("{family}::bf16"), |c, g| c.check::<bf16>(g)),
            (format!("{family}::f16"), |c, g| c.check::<f16>(g)),
        ]
    }

    // Linear: lengths off the chunk, GQA and MQA, head dims off the tensor-core tile,
    // value dims wider than one value block, one token, and lengths split into segments.
    let linear_cases = [
        ([2, 77, 4, 32], 4, 32),
        ([1, 130, 4, 64], 2, 64),
        ([1, 200, 2, 24], 1, 40),
        ([2, 64, 3, 128], 3, 128),
        ([1, 1, 2, 16], 2, 16),
        ([1, 333, 2, 8], 2, 136),
        ([1, 2000, 2, 64], 1, 64),
        ([2, 1100, 4, 128], 2, 96),
    ];
    for (index, (shape, heads_kv, dim_v)) in linear_cases.into_iter().enumerate() {
        for causal in [false, true] {
            let form = if causal { "causal" } else { "full" };
            for (family, check) in every_precision(&format!("linear::{form}")) {
                let case =
                    inputs(shape, shape[1], heads_kv, dim_v, 3 * index as u64).map(|inputs| Case {
                        attention: Attention::new(Method::linear()).causal(causal),
                        inputs,
                        peer: Peer::Linear(causal),
                        blocks: Vec::new(),
                    });
                add(family, case, check);
            }
        }
    }

    // Exact: query and key lengths off the tile (and unequal, without a causal mask), GQA
    // and MQA, windows narrower than a tile and wider than several, and head dims the
    // tensor cores do not take (the general kernel).
    let exact_cases: [ExactCase; 10] = [
        ([2, 77, 4, 64], 77, 2, false, (None, None)),
        ([2, 77, 4, 64], 77, 2, true, (None, None)),
        ([1, 200, 2, 128], 333, 1, false, (None, None)),
        ([1, 300, 3, 128], 300, 3, true, (None, None)),
        ([1, 1000, 2, 64], 1000, 2, true, (None, None)),
        ([1, 500, 4, 128], 500, 2, false, (Some(40), Some(7))),
        ([1, 700, 2, 64], 700, 1, true, (Some(150), None)),
        ([2, 130, 2, 128], 130, 2, false, (Some(0), Some(0))),
        ([2, 90, 4, 48], 90, 2, true, (None, None)),
        ([1, 260, 2, 96], 260, 1, false, (Some(30), None)),
    ];
    for (index, (shape, len_k, heads_kv, causal, sides)) in exact_cases.into_iter().enumerate() {
        let (left, right) = sides;
        let visible = (left, if causal { Some(0) } else { right });
        let form = match (causal, sides) {
            (true, (None, None)) => "softmax::causal".to_string(),
            (false, (None, None)) => "softmax::full".to_string(),
            (causal, (l, r)) => format!(
                "window[{l:?},{r:?}]::{}",
                if causal { "causal" } else { "full" }
            ),
        };
        for (family, check) in every_precision(&form) {
            let case =
                inputs(shape, len_k, heads_kv, shape[3], 200 + 3 * index as u64).map(|inputs| {
                    Case {
                        attention: exact_attention(causal, sides),
                        inputs,
                        peer: Peer::Exact(visible),
                        blocks: Vec::new(),
                    }
                });
            add(family, case, check);
        }
    }

    // Performer, non-causal: feature counts from one tile to the most the kernels hold,
    // GQA, value dims off and wider than a value block, lengths split into spans.
    let performer_cases = [
        ([2, 77, 4, 64], 2, 64, 256),
        ([1, 600, 2, 128], 1, 96, 128),
        ([1, 1500, 2, 32], 2, 32, 64),
        ([2, 130, 3, 16], 3, 40, 16),
    ];
    for (index, (shape, heads_kv, dim_v, features)) in performer_cases.into_iter().enumerate() {
        let seed = index as u64;
        for (family, check) in every_precision(&format!("performer[features={features}]::full")) {
            let case =
                inputs(shape, shape[1], heads_kv, dim_v, 400 + 3 * index as u64).map(|inputs| {
                    Case {
                        attention: Attention::new(Method::Performer(Performer::new(
                            features, seed,
                        ))),
                        inputs,
                        peer: Peer::Performer { features, seed },
                        blocks: Vec::new(),
                    }
                });
            add(family, case, check);
        }
    }

    // Decoders fed blocks and single tokens in turn, each case in one precision: linear
    // attention's state, and exact attention's cache of keys and values, grown past its
    // first allocation (64 rows) and, for windows, dropping keys no query sees again;
    // tensor-core (bf16 and f16, dims 64 and 128) and general kernels.
    // The method, q's shape, kv heads, the blocks (a prompt, then the rest one token at a
    // time but for one block of the given length), and the precision.
    type DecodeCase = (
        Attention,
        [usize; 4],
        usize,
        [usize; 3],
        (&'static str, Check),
    );
    let causal = |attention: Attention| attention.causal(true);
    let linear = causal(Attention::new(Method::linear()));
    let softmax = causal(Attention::new(Method::softmax()));
    let window = |left| {
        causal(Attention::new(Method::Window(Window::new(
            Some(left),
            None,
        ))))
    };
    let decode_cases: [DecodeCase; 9] = [
        (
            linear.clone(),
            [2, 150, 4, 64],
            2,
            [129, 0, 0],
            ("f32", |c, g| c.check_decode::<f32>(g)),
        ),
        (
            linear.clone(),
            [3, 100, 2, 128],
            2,
            [64, 0, 0],
            ("bf16", |c, g| c.check_decode::<bf16>(g)),
        ),
        (
            linear.clone(),
            [1, 70, 8, 32],
            1,
            [1, 30, 20],
            ("f16", |c, g| c.check_decode::<f16>(g)),
        ),
        (
            linear,
            [1, 1700, 2, 64],
            2,
            [1650, 0, 0],
            ("f32", |c, g| c.check_decode::<f32>(g)),
        ),
        (
            softmax.clone(),
            [2, 150, 4, 48],
            2,
            [70, 10, 45],
            ("f32", |c, g| c.check_decode::<f32>(g)),
        ),
        (
            softmax.clone(),
            [1, 300, 4, 128],
            2,
            [129, 5, 100],
            ("bf16", |c, g| c.check_decode::<bf16>(g)),
        ),
        (
            softmax,
            [2, 90, 2, 64],
            1,
            [1, 40, 3],
            ("f16", |c, g| c.check_decode::<f16>(g)),
        ),
        (
            window(40),
            [2, 260, 2, 64],
            1,
            [100, 30, 50],
            ("bf16", |c, g| c.check_decode::<bf16>(g)),
        ),
        (
            window(7),
            [1, 200, 3, 40],
            3,
            [20, 100, 70],
            ("f32", |c, g| c.check_decode::<f32>(g)),
        ),
    ];
    for (index, (attention, shape, heads_kv, [prompt, steps, block], (dtype, check))) in
        decode_cases.into_iter().enumerate()
    {
        let len = shape[1];
        let mut blocks = vec![prompt];
        blocks.extend(std::iter::repeat_n(1, steps));
        blocks.extend((block > 0).then_some(block));
        blocks.extend(std::iter::repeat_n(1, len - blocks.iter().sum::<usize>()));
        let peer = match attention.method() {
            Method::Linear(_) => Peer::Linear(true),
            Method::Window(window) => Peer::Exact((window.left, Some(0))),
            _ => Peer::Exact((None, Some(0))),
        };
        let name = attention.method().name();
        let case =
            inputs(shape, len, heads_kv, shape[3], 100 + 3 * index as u64).map(|inputs| Case {
                attention,
                inputs,
                peer,
                blocks,
            });
        add(
            format!("{name}::prefill[{prompt}]+decode[{steps}]+prefill[{block}]::{dtype}"),
            case,
            check,
        );
    }

    // Backward: a length inside one chunk, lengths off the chunk, several segments (and
    // their pieces), both head dims, more than one batch.
    for (index, shape) in [
        [2, 77, 3, 64],
        [1, 300, 2, 128],
        [2, 1000, 2, 64],
        [1, 2000, 2, 128],
    ]
    .into_iter()
    .enumerate()
    {
        let gpu = gpu.clone();
        let absent = gpu.is_none();
        trials.push(
            Trial::test(
                format!("checks::linear::backward::bf16::q{shape:?}"),
                move || {
                    let gpu = gpu.ok_or("no GPU")?;
                    check_backward(&gpu, shape, 400 + 5 * index as u64)
                },
            )
            .with_ignored_flag(absent),
        );
    }
    trials
}

/// The GPU backward of causal linear attention against the CPU's in f64, on the same
/// bf16-rounded inputs and output gradient. No peer's backward is emulated here: the
/// tolerance is four roundings of bf16 for each gradient (half the forward checks' cap;
/// the first H100 run measured 0.25-0.71%).
fn check_backward(gpu: &Gpu, shape: [usize; 4], seed: u64) -> Result<()> {
    let rounded = |x: Tensor<f32>| -> Result<Tensor<f32>> {
        let values = x
            .as_slice()
            .iter()
            .map(|&x| bf16::from_f32(x).to_f32())
            .collect();
        Ok(Tensor::from_vec(values, x.shape())?)
    };
    let [q, k, v] = inputs(shape, shape[1], shape[2], shape[3], seed)?;
    let [q, k, v, d_out] = [
        rounded(q)?,
        rounded(k)?,
        rounded(v)?,
        rounded(random(shape, seed + 3)?)?,
    ];
    let attention = Attention::new(Method::linear()).causal(true);
    let exact = attention.backward(&q.cast::<f64>(), &k.cast(), &v.cast(), &d_out.cast())?;
    let upload = |x: &Tensor<f32>| GpuTensor::<bf16>::upload(gpu, x);
    let (q, k, v, d_out) = (upload(&q)?, upload(&k)?, upload(&v)?, upload(&d_out)?);
    let forward = attention.forward_training(&q, &k, &v)?;
    let gradients = attention.backward_with(&forward, &q, &k, &v, &d_out)?;
    let tolerance = 4.0 * bf16::UNIT_ROUNDOFF;
    for (name, gpu_gradient, exact) in [
        ("dq", &gradients.dq, &exact.dq),
        ("dk", &gradients.dk, &exact.dk),
        ("dv", &gradients.dv, &exact.dv),
    ] {
        let error = relative_error(&as_f64(&gpu_gradient.download()?), exact.as_slice());
        verdict(error, tolerance).map_err(|e| format!("{name}: {}", e.message().unwrap_or("")))?;
    }
    Ok(())
}
