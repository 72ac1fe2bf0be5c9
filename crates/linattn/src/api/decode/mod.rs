//! The recurrent form: generating one token at a time. Kernelized methods keep a state of
//! fixed size per head (`Σ φ(kⱼ) vⱼᵀ` and `Σ φ(kⱼ)`, with FAVOR+'s running stabiliser), a
//! sliding window a ring buffer of its last keys and values, and exact softmax the
//! growing KV cache it is measured against.

use crate::api::attention::Attention;
use crate::api::device::DeviceTensor;
use crate::base::memory;
use crate::base::{CausalForm, Element, Error, Problem, Result, Tensor};
use crate::engine::{FeatureMap, Kernel, LinearState, Start};
use crate::methods::AttentionMethod;
use rayon::prelude::*;

mod gated;
mod saved;

pub use gated::GatedDecoder;

/// How a [`Decoder`]'s memory behaves as the sequences grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderMemory {
    /// Bytes the state holds now.
    pub state_bytes: usize,
    /// Bytes each further token adds (over the whole batch): 0 for the linear methods
    /// and bounded windows, whose memory is constant.
    pub bytes_per_token: usize,
}

/// Decoding state for a batch of sequences: feed one token per sequence with
/// [`Decoder::step`] and get its attention output.
///
/// ```
/// use linattn::{Attention, Method, Tensor};
/// let attention = Attention::new(Method::linear()).causal(true);
/// let [q, k, v] = [0, 1, 2].map(|s| Tensor::<f64>::randn([2, 10, 4, 16], s).unwrap());
/// let prompt = |x: &Tensor<f64>| x.slice_seq(0..9).unwrap();
/// let last = |x: &Tensor<f64>| x.slice_seq(9..10).unwrap();
/// // Prefill 9 tokens, then decode the 10th: the same as one causal call over 10.
/// let (_, mut decoder) = attention.prefill(&prompt(&q), &prompt(&k), &prompt(&v)).unwrap();
/// let stepped = decoder.step(&last(&q), &last(&k), &last(&v)).unwrap();
/// let whole = attention.forward(&q, &k, &v).unwrap();
/// let expected = last(&whole);
/// assert!(stepped.as_slice().iter().zip(expected.as_slice()).all(|(a, b)| (a - b).abs() < 1e-12));
/// assert_eq!(decoder.memory().bytes_per_token, 0); // constant memory
/// ```
#[derive(Clone, Debug)]
pub struct Decoder<T> {
    /// The bytes it may hold and use, decided when it was made.
    budget: u128,
    attention: Attention,
    layout: Layout,
    /// The exact heads' score scale.
    scale: T,
    /// The kernel of the other heads.
    kernel: Option<Kernel<T>>,
    sequences: Vec<Sequence<T>>,
}

/// Sizes shared by every sequence of a decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    heads_q: usize,
    heads_kv: usize,
    dim_qk: usize,
    dim_v: usize,
    /// Query heads below this attend exactly over the cache; the others read the states.
    split: usize,
    /// Keys the exact heads keep (`None`: all of them).
    capacity: Option<usize>,
    /// Tokens past which the method cannot continue (cosFormer's fixed M).
    max_len: Option<usize>,
}

impl Layout {
    fn group(&self) -> usize {
        self.heads_q / self.heads_kv
    }

    /// Whether kv head `g` serves a kernelized head.
    fn serves_kernelized(&self, g: usize) -> bool {
        (g + 1) * self.group() > self.split
    }
}

/// The sizes a decoder's blocks of tokens must have, on either device.
pub(crate) struct BlockSizes {
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub dim_qk: usize,
    pub dim_v: usize,
}

impl BlockSizes {
    /// The tokens per sequence of a block of q, k and v of these `shapes` (`tokens` of
    /// them for a step, any number but 0 for a block), or which one does not fit.
    pub fn check(&self, shapes: [[usize; 4]; 3], tokens: Option<usize>) -> Result<usize> {
        let len = tokens.unwrap_or(shapes[0][1]);
        let expected = [
            ("q", [self.batch, len, self.heads_q, self.dim_qk]),
            ("k", [self.batch, len, self.heads_kv, self.dim_qk]),
            ("v", [self.batch, len, self.heads_kv, self.dim_v]),
        ];
        for ((name, expected), shape) in expected.into_iter().zip(shapes) {
            if shape != expected || len == 0 {
                let what = if tokens.is_some() { "step" } else { "block" };
                return Err(Error::ShapeMismatch {
                    detail: format!(
                        "a decoding {what} takes {name} of shape {expected:?}, got {shape:?}"
                    ),
                });
            }
        }
        Ok(len)
    }
}

/// One sequence's share of the decoder.
#[derive(Clone, Debug, PartialEq)]
struct Sequence<T> {
    /// Tokens seen.
    position: usize,
    /// The exact heads' keys, slots × kv heads × d (a ring when the capacity is bounded).
    keys: Vec<T>,
    /// Their values, slots × kv heads × d_v.
    values: Vec<T>,
    /// One state per kv head (empty without kernelized heads).
    states: Vec<LinearState<T>>,
}

impl<T: Element> Sequence<T> {
    /// Caches the keys and values of the token at `self.position`.
    fn insert<'a>(
        &mut self,
        layout: &Layout,
        key: impl Fn(usize) -> &'a [T],
        value: impl Fn(usize) -> &'a [T],
    ) where
        T: 'a,
    {
        let slot = layout.capacity.map_or(self.position, |c| self.position % c);
        for (store, row, dim) in [
            (
                &mut self.keys,
                &key as &dyn Fn(usize) -> &'a [T],
                layout.dim_qk,
            ),
            (&mut self.values, &value, layout.dim_v),
        ] {
            let start = slot * layout.heads_kv * dim;
            if store.len() < start + layout.heads_kv * dim {
                store.resize(start + layout.heads_kv * dim, T::zero());
            }
            for g in 0..layout.heads_kv {
                store[start + g * dim..start + (g + 1) * dim].copy_from_slice(row(g));
            }
        }
    }

    /// Softmax attention of `query` over the cached keys of kv head `g`.
    fn attend(&self, layout: &Layout, scale: T, g: usize, query: &[T], out: &mut [T]) {
        let slots = layout
            .capacity
            .map_or(self.position, |c| self.position.min(c));
        let key = |s: usize| {
            let start = (s * layout.heads_kv + g) * layout.dim_qk;
            &self.keys[start..start + layout.dim_qk]
        };
        let scores: Vec<T> = (0..slots)
            .map(|s| scale * key(s).iter().zip(query).map(|(&a, &b)| a * b).sum::<T>())
            .collect();
        let max = scores.iter().copied().fold(T::neg_infinity(), T::max);
        out.fill(T::zero());
        let mut total = T::zero();
        for (s, &score) in scores.iter().enumerate() {
            let weight = (score - max).exp();
            total += weight;
            let start = (s * layout.heads_kv + g) * layout.dim_v;
            out.iter_mut()
                .zip(&self.values[start..start + layout.dim_v])
                .for_each(|(o, &v)| *o += weight * v);
        }
        out.iter_mut().for_each(|o| *o /= total);
    }

    /// Takes one token and writes its output for every q head into `out` (heads × d_v).
    #[allow(clippy::too_many_arguments)]
    fn step<'a>(
        &mut self,
        layout: &Layout,
        scale: T,
        kernel: Option<&Kernel<T>>,
        query: impl Fn(usize) -> &'a [T],
        key: impl Fn(usize) -> &'a [T],
        value: impl Fn(usize) -> &'a [T],
        out: &mut [T],
    ) where
        T: 'a,
    {
        let position = self.position;
        self.attend_exact(layout, scale, &query, &key, &value, out);
        let Some(kernel) = kernel else { return };
        let dim_v = layout.dim_v;
        for g in (0..layout.heads_kv).filter(|&g| layout.serves_kernelized(g)) {
            kernel.step(&mut self.states[g], position, key(g), value(g));
            let heads = (g * layout.group()).max(layout.split)..(g + 1) * layout.group();
            for h in heads {
                let dst = &mut out[h * dim_v..(h + 1) * dim_v];
                kernel.read(&self.states[g], position, query(h), dst);
            }
        }
    }

    /// Takes one token into the cache and writes the exact heads' outputs into `out`
    /// (heads × d_v): all of a step for exact methods, the exact heads' share of one
    /// otherwise (a block's kernelized heads the engine computes).
    fn attend_exact<'a>(
        &mut self,
        layout: &Layout,
        scale: T,
        query: impl Fn(usize) -> &'a [T],
        key: impl Fn(usize) -> &'a [T],
        value: impl Fn(usize) -> &'a [T],
        out: &mut [T],
    ) where
        T: 'a,
    {
        if layout.split > 0 {
            self.insert(layout, &key, &value);
        }
        self.position += 1;
        for h in 0..layout.split {
            let dst = &mut out[h * layout.dim_v..(h + 1) * layout.dim_v];
            self.attend(layout, scale, h / layout.group(), query(h), dst);
        }
    }

    fn bytes(&self) -> usize {
        let states: usize = self
            .states
            .iter()
            .map(|s| s.kv.len() + s.k_sum.len() + s.v_sum.len() + 1)
            .sum();
        (self.keys.len() + self.values.len() + states) * size_of::<T>()
    }
}

/// A decoder without its sequences: what [`Decoder::plan`] decided.
struct DecoderPlan<T> {
    /// The bytes the decoder may hold and use: the limit, or what was available when it
    /// was made.
    budget: u128,
    attention: Attention,
    layout: Layout,
    scale: T,
    kernel: Option<Kernel<T>>,
}

impl<T: Element> DecoderPlan<T> {
    /// The empty state of one kv head, if the decoder has kernelized heads.
    fn empty_state(&self) -> Option<LinearState<T>> {
        let kernel = self.kernel.as_ref()?;
        let (m, stabilised) = (kernel.map.features(), kernel.map.stabiliser().is_some());
        Some(LinearState::new(m, self.layout.dim_v, stabilised))
    }

    /// Elements of one sequence's states (kv, key sums, value sums and log-scale per kv
    /// head), without allocating them.
    fn state_elements(&self) -> u128 {
        let Some(kernel) = &self.kernel else { return 0 };
        let (m, dim_v) = (kernel.map.features() as u128, self.layout.dim_v as u128);
        let v_sum = if kernel.map.stabiliser().is_some() {
            dim_v
        } else {
            0
        };
        self.layout.heads_kv as u128 * (m * dim_v + m + v_sum + 1)
    }

    fn ensure_state_fits(&self, batch: usize) -> Result<()> {
        let bytes = batch as u128 * self.state_elements() * size_of::<T>() as u128;
        memory::ensure_within(
            &format!("the states of a decoder of {batch} sequences"),
            bytes,
            self.budget,
        )
    }

    fn allocate(self, batch: usize) -> Decoder<T> {
        let states = match self.empty_state() {
            Some(state) => vec![state; self.layout.heads_kv],
            None => Vec::new(),
        };
        let sequence = Sequence {
            position: 0,
            keys: Vec::new(),
            values: Vec::new(),
            states,
        };
        Decoder {
            budget: self.budget,
            attention: self.attention,
            layout: self.layout,
            scale: self.scale,
            kernel: self.kernel,
            sequences: vec![sequence; batch],
        }
    }
}

impl Attention {
    /// A decoder for `batch` empty sequences with the given head counts and sizes.
    ///
    /// ```
    /// use linattn::{Attention, Method};
    /// let decoder = Attention::new(Method::softmax()).decoder::<f32>(4, 8, 2, 64, 64).unwrap();
    /// // The KV cache grows by one key and value per kv head and sequence each step.
    /// assert_eq!(decoder.memory().bytes_per_token, 4 * 2 * (64 + 64) * 4);
    /// ```
    pub fn decoder<T: Element>(
        &self,
        batch: usize,
        heads_q: usize,
        heads_kv: usize,
        dim_qk: usize,
        dim_v: usize,
    ) -> Result<Decoder<T>> {
        Decoder::empty(self, batch, heads_q, heads_kv, dim_qk, dim_v)
    }

    /// Causal attention over a prompt, and the decoder that continues it: stepping it
    /// gives what one causal call over the longer sequence would. On the device the
    /// tensors are on ([`DeviceTensor`]); the decoder holds its state there.
    pub fn prefill<X: DeviceTensor>(&self, q: &X, k: &X, v: &X) -> Result<(X, X::Decoder)> {
        X::prefill(self, q, k, v)
    }

    /// [`Attention::prefill`] of host tensors.
    pub(crate) fn prefill_on_host<T: Element>(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
    ) -> Result<(Tensor<T>, Decoder<T>)> {
        // The chunked form is the one that ends with the decoder's states.
        let causal = self.clone().causal(true).causal_form(CausalForm::Chunked);
        let [batch, len, heads_q, dim_qk] = q.shape();
        let [_, _, heads_kv, dim_v] = v.shape();
        let mut decoder = Decoder::empty(&causal, batch, heads_q, heads_kv, dim_qk, dim_v)?;
        let (out, mut states) = causal.forward_with_states(q, k, v)?;
        let layout = decoder.layout;
        let first_kept = layout.capacity.map_or(0, |c| len.saturating_sub(c));
        for (b, sequence) in decoder.sequences.iter_mut().enumerate() {
            if layout.split > 0 {
                for t in first_kept..len {
                    sequence.position = t;
                    sequence.insert(&layout, |g| k.head(b, g).row(t), |g| v.head(b, g).row(t));
                }
            }
            sequence.position = len;
        }
        if decoder.kernel.is_some() {
            for (b, sequence) in decoder.sequences.iter_mut().enumerate() {
                for (g, state) in sequence.states.iter_mut().enumerate() {
                    if let Some(final_state) = states[b * heads_kv + g].take() {
                        *state = final_state;
                    }
                }
            }
        }
        Ok((out, decoder))
    }
}

impl<T: Element> Decoder<T> {
    fn empty(
        attention: &Attention,
        batch: usize,
        heads_q: usize,
        heads_kv: usize,
        dim_qk: usize,
        dim_v: usize,
    ) -> Result<Self> {
        let plan = Self::plan(attention, batch, heads_q, heads_kv, dim_qk, dim_v, None)?;
        plan.ensure_state_fits(batch)?;
        Ok(plan.allocate(batch))
    }

    /// Everything a decoder of these sizes needs but its sequences; fails when the
    /// sizes do not fit the method or its one-token workspace (Performer's ω, say)
    /// exceeds the memory limit, before anything of that size is allocated. With
    /// `stored`, the bytes a saved state has left for its sequences: sizes whose states
    /// could not be in them are refused before the kernel is built.
    #[allow(clippy::too_many_arguments)]
    fn plan(
        attention: &Attention,
        batch: usize,
        heads_q: usize,
        heads_kv: usize,
        dim_qk: usize,
        dim_v: usize,
        stored: Option<usize>,
    ) -> Result<DecoderPlan<T>> {
        let attention = attention.clone().causal(true);
        let one = |heads, dim| [batch, 1, heads, dim];
        let (q, k, v) = (
            one(heads_q, dim_qk),
            one(heads_kv, dim_qk),
            one(heads_kv, dim_v),
        );
        // Bounds every size before any arithmetic on them or allocation of them (the
        // sizes may come from a saved state): a step's tensors first, then (kernelized
        // heads) a d × d_v state per kv head and sequence.
        let element = size_of::<T>() as u128;
        let wide = |dims: &[usize]| {
            dims.iter()
                .fold(element, |a, &x| a.saturating_mul(x as u128))
        };
        let what = format!(
            "a decoder of {batch} sequences with {heads_q} query and {heads_kv} kv heads \
             of {dim_qk} and {dim_v} dims"
        );
        let tokens = wide(&[batch, heads_q, dim_qk])
            .saturating_add(wide(&[batch, heads_kv, dim_qk]))
            .saturating_add(wide(&[batch, heads_kv, dim_v]));
        // The memory decision of every later step too: steps read no system table.
        let budget = memory::budget(attention.limit());
        memory::ensure_within(&what, tokens, budget)?;
        attention.output_shape(q, k, v)?;
        let recurrent = attention.method().recurrent(heads_q, dim_qk)?;
        let split = recurrent.exact_heads;
        let layout = Layout {
            heads_q,
            heads_kv,
            dim_qk,
            dim_v,
            split,
            capacity: recurrent.capacity,
            max_len: recurrent.max_len,
        };
        let kernelized = recurrent.state_features.is_some() && split < heads_q;
        let states = if kernelized {
            wide(&[batch, heads_kv, dim_qk, dim_v])
        } else {
            0
        };
        memory::ensure_within(&what, tokens.saturating_add(states), budget)?;
        if let Some(stored) = stored
            && kernelized
        {
            // Each kv head's m × d_v sums are saved in full.
            let features = recurrent.state_features.unwrap_or(0);
            let saved = wide(&[batch, heads_kv, features, dim_v]);
            if saved > stored as u128 {
                return Err(Error::InvalidState(format!(
                    "its sizes need {} of states but {stored} bytes are left",
                    crate::ByteSize(saved)
                )));
            }
        }
        let workspace = attention.workspace_bytes(q, k, v, size_of::<T>())?;
        memory::ensure_within(&what, workspace, budget)?;
        let kernel = if kernelized {
            let kernel = kernel_of::<T>(&attention, &layout)?;
            debug_assert_eq!(Some(kernel.map.features()), recurrent.state_features);
            Some(kernel)
        } else {
            None
        };
        Ok(DecoderPlan {
            budget,
            attention,
            layout,
            scale: T::of_f64(recurrent.scale),
            kernel,
        })
    }

    /// Tokens seen by each sequence.
    pub fn positions(&self) -> Vec<usize> {
        self.sequences.iter().map(|s| s.position).collect()
    }

    /// The memory the state holds now, and how it grows.
    pub fn memory(&self) -> DecoderMemory {
        let layout = &self.layout;
        let bytes_per_token = match layout.capacity {
            None if layout.split > 0 => {
                self.sequences.len()
                    * layout.heads_kv
                    * (layout.dim_qk + layout.dim_v)
                    * size_of::<T>()
            }
            _ => 0,
        };
        DecoderMemory {
            state_bytes: self.sequences.iter().map(Sequence::bytes).sum(),
            bytes_per_token,
        }
    }

    /// Feeds one token per sequence — `q` `[batch, 1, heads_q, d]`, `k` `[batch, 1,
    /// heads_kv, d]`, `v` `[batch, 1, heads_kv, d_v]` — and returns its output
    /// `[batch, 1, heads_q, d_v]`.
    pub fn step(&mut self, q: &Tensor<T>, k: &Tensor<T>, v: &Tensor<T>) -> Result<Tensor<T>> {
        let layout = self.layout;
        let mut out = self.check_block(q, k, v, Some(1))?;
        let (scale, kernel) = (self.scale, self.kernel.as_ref());
        out.as_mut_slice()
            .par_chunks_mut(layout.heads_q * layout.dim_v)
            .zip(self.sequences.par_iter_mut())
            .enumerate()
            .for_each(|(b, (out_row, sequence))| {
                sequence.step(
                    &layout,
                    scale,
                    kernel,
                    |h| q.head(b, h).row(0),
                    |g| k.head(b, g).row(0),
                    |g| v.head(b, g).row(0),
                    out_row,
                );
            });
        self.check_output(&out)?;
        Ok(out)
    }

    /// Feeds a block of tokens per sequence — `q` `[batch, n, heads_q, d]`, `k` and `v`
    /// `[batch, n, heads_kv, ·]` — and returns their outputs: what `n` steps would, with
    /// the kernelized heads' block computed by the chunked form from the states so far.
    /// This is how a causal call starts from an initial state: the decoder holds it,
    /// and holds the final state afterwards.
    ///
    /// ```
    /// use linattn::{Attention, Method, Tensor};
    /// let attention = Attention::new(Method::linear()).causal(true);
    /// let [q, k, v] = [0, 1, 2].map(|s| Tensor::<f64>::randn([2, 100, 4, 16], s).unwrap());
    /// let part = |x: &Tensor<f64>, r| x.slice_seq(r).unwrap();
    /// let (_, mut decoder) = attention.prefill(&part(&q, 0..60), &part(&k, 0..60), &part(&v, 0..60))?;
    /// let rest = decoder.prefill(&part(&q, 60..100), &part(&k, 60..100), &part(&v, 60..100))?;
    /// let whole = attention.forward(&q, &k, &v)?;
    /// assert!(rest.relative_error(&whole.slice_seq(60..100)?).unwrap() < 1e-12);
    /// assert_eq!(decoder.positions(), [100, 100]);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn prefill(&mut self, q: &Tensor<T>, k: &Tensor<T>, v: &Tensor<T>) -> Result<Tensor<T>> {
        let layout = self.layout;
        let mut out = self.check_block(q, k, v, None)?;
        let len = q.shape()[1];
        if let Some(kernel) = &self.kernel {
            let problem = Problem::new(q.shape(), k.shape(), v.shape(), true)?;
            let positions = self.positions();
            let states: Vec<LinearState<T>> = self
                .sequences
                .iter()
                .flat_map(|s| s.states.iter().cloned())
                .collect();
            let start = Start {
                positions: &positions,
                states: &states,
            };
            let mut pass = kernel.forward_from(
                &problem,
                [q, k, v],
                &mut out,
                layout.split..layout.heads_q,
                &start,
            );
            for (b, sequence) in self.sequences.iter_mut().enumerate() {
                for (g, state) in sequence.states.iter_mut().enumerate() {
                    if let Some(last) = pass.states[b * layout.heads_kv + g].take() {
                        *state = last;
                    }
                }
            }
        }
        let scale = self.scale;
        out.as_mut_slice()
            .par_chunks_mut(len * layout.heads_q * layout.dim_v)
            .zip(self.sequences.par_iter_mut())
            .enumerate()
            .for_each(|(b, (out_rows, sequence))| {
                for (t, out_row) in out_rows
                    .chunks_exact_mut(layout.heads_q * layout.dim_v)
                    .enumerate()
                {
                    sequence.attend_exact(
                        &layout,
                        scale,
                        |h| q.head(b, h).row(t),
                        |g| k.head(b, g).row(t),
                        |g| v.head(b, g).row(t),
                        out_row,
                    );
                }
            });
        self.check_output(&out)?;
        Ok(out)
    }

    /// Checks a block of tokens (`tokens` per sequence if given) against the decoder's
    /// sizes, its method's length limit and the memory limit; returns the zeroed output.
    fn check_block(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        tokens: Option<usize>,
    ) -> Result<Tensor<T>> {
        let layout = self.layout;
        let batch = self.sequences.len();
        let sizes = BlockSizes {
            batch,
            heads_q: layout.heads_q,
            heads_kv: layout.heads_kv,
            dim_qk: layout.dim_qk,
            dim_v: layout.dim_v,
        };
        let len = sizes.check([q.shape(), k.shape(), v.shape()], tokens)?;
        for (name, tensor) in [("q", q), ("k", k), ("v", v)] {
            if let Some((index, value)) = tensor.first_non_finite() {
                return Err(Error::NonFinite {
                    tensor: name,
                    index,
                    value,
                });
            }
        }
        if let Some(max_len) = layout.max_len
            && let Some(position) = self
                .sequences
                .iter()
                .map(|s| s.position)
                .find(|&p| p + len > max_len)
        {
            return Err(Error::SequenceTooLong {
                method: self.attention.method().name(),
                len: position + len,
                max_len,
            });
        }
        let growth = self.memory().bytes_per_token as u128 * len as u128;
        let out_bytes = (batch * len * layout.heads_q * layout.dim_v * size_of::<T>()) as u128;
        let scratch = if len > 1 && self.kernel.is_some() {
            self.attention
                .workspace_bytes(q.shape(), k.shape(), v.shape(), size_of::<T>())?
        } else {
            0
        };
        // Against the budget the decoder was made with, which the state it holds counts
        // against too.
        let held = self.memory().state_bytes as u128;
        memory::ensure_within(
            "a decoding step",
            held + growth + out_bytes + scratch,
            self.budget,
        )?;
        Tensor::zeros_planned([batch, len, layout.heads_q, layout.dim_v])
    }

    fn check_output(&self, out: &Tensor<T>) -> Result<()> {
        match out.first_non_finite() {
            Some((index, _)) => Err(Error::NonFiniteOutput {
                method: self.attention.method().name(),
                tensor: "output",
                index,
            }),
            None => Ok(()),
        }
    }
}

/// The kernel of the non-exact heads of `attention`, for a decoder's sizes.
fn kernel_of<T: Element>(attention: &Attention, layout: &Layout) -> Result<Kernel<T>> {
    let problem = Problem::new(
        [1, 1, layout.heads_q, layout.dim_qk],
        [1, 1, layout.heads_kv, layout.dim_qk],
        [1, 1, layout.heads_kv, layout.dim_v],
        true,
    )?;
    attention.method().kernel(&problem)?.ok_or_else(|| {
        Error::InvalidConfig(format!(
            "{} has no kernelized heads",
            attention.method().name()
        ))
    })
}
