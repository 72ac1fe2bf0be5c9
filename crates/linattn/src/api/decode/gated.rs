//! Decoding the gated family: [`GatedDecoder`] holds one state per sequence and value
//! head and updates it in place, a token ([`GatedDecoder::step`], the recurrent form) or a
//! block ([`GatedDecoder::prefill`], the chunked form) at a time; its state saves to bytes.

use super::DecoderMemory;
use super::saved::{StateReader, put_floats, put_u64};
use crate::api::attention::Attention;
use crate::api::plan::{check_finite, check_results};
use crate::base::{Element, Error, Problem, Result, Tensor, memory};
use crate::methods::AttentionMethod;
use crate::methods::gated::{GateInputs, Rule, gated_shape};

/// Leads every saved state of a gated decoder, with the format's version.
const GATED_MAGIC: &[u8; 8] = b"LINATTNG";
const GATED_VERSION: u32 = 1;

/// Decoding state of the gated family for a batch of sequences: the `[B, HV, d_k, d_v]`
/// states, updated in place. Each step reads and writes every state once and allocates
/// only its output.
///
/// ```
/// use linattn::{Attention, GateInputs, Gla, Method, Tensor};
/// let attention = Attention::new(Method::Gla(Gla::default())).causal(true);
/// let x = Tensor::<f32>::randn([2, 40, 2, 16], 0)?;
/// let g = Tensor::from_vec(vec![-0.1f32; 2 * 40 * 2], [2, 40, 2, 1])?;
/// let prompt = GateInputs { g: Some(&g), ..GateInputs::default() };
/// let (_, mut decoder) = attention.prefill_gated(&x, &x, &x, &prompt)?;
/// let token = Tensor::<f32>::randn([2, 1, 2, 16], 1)?;
/// let g_token = Tensor::from_vec(vec![-0.1f32; 4], [2, 1, 2, 1])?;
/// let out = decoder.step(&token, &token, &token, Some(&g_token), None)?;
/// assert_eq!((out.shape(), decoder.positions()), ([2, 1, 2, 16], vec![41, 41]));
/// # Ok::<(), linattn::Error>(())
/// ```
pub struct GatedDecoder<T> {
    attention: Attention,
    rule: Rule,
    /// One token of every sequence, validated once.
    token: Problem,
    states: Tensor<T>,
    position: usize,
    /// The bytes a block may use, fixed at creation: steps read no system file.
    budget: u128,
}

impl Attention {
    /// A decoder of the gated family for `batch` empty sequences: q and k of `heads`
    /// heads of `dim_k`, v of `heads_v` heads of `dim_v`.
    pub fn gated_decoder<T: Element>(
        &self,
        batch: usize,
        heads: usize,
        heads_v: usize,
        dim_k: usize,
        dim_v: usize,
    ) -> Result<GatedDecoder<T>> {
        let attention = self.clone().causal(true);
        let qk = [batch, 1, heads, dim_k];
        let token = attention.problem(qk, qk, [batch, 1, heads_v, dim_v])?;
        let rule = attention.method().gated_rule(&token).ok_or_else(|| {
            Error::Unsupported(format!(
                "{} is not of the gated family; Attention::decoder decodes it",
                attention.method().name()
            ))
        })?;
        Ok(GatedDecoder {
            states: Tensor::zeros([batch, heads_v, dim_k, dim_v])?,
            budget: memory::budget(attention.limit()),
            attention,
            rule,
            token,
            position: 0,
        })
    }

    /// [`Attention::forward_gated`] over a prompt, and the decoder that continues it from
    /// its final state (or from `inputs.initial_state` onwards).
    pub fn prefill_gated<T: Element>(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        inputs: &GateInputs<'_, T>,
    ) -> Result<(Tensor<T>, GatedDecoder<T>)> {
        if inputs.cu_seqlens.is_some() {
            return Err(Error::InvalidConfig(
                "a decoder continues a batch of sequences; give them as batch rows, not packed \
                 by cu_seqlens"
                    .into(),
            ));
        }
        let [batch, len, heads, dim_k] = q.shape();
        let [_, _, heads_v, dim_v] = v.shape();
        let mut decoder = self.gated_decoder(batch, heads, heads_v, dim_k, dim_v)?;
        let result = self.forward_gated(q, k, v, inputs)?;
        decoder.states = result.final_state;
        decoder.position = len;
        Ok((result.out, decoder))
    }
}

impl<T: Element> GatedDecoder<T> {
    /// Feeds one token per sequence (`[B, 1, ·, ·]`, g and β `[B, 1, HV, ·]` where the
    /// method reads them) through the recurrence and returns its output `[B, 1, HV,
    /// d_v]`.
    pub fn step(
        &mut self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        g: Option<&Tensor<T>>,
        beta: Option<&Tensor<T>>,
    ) -> Result<Tensor<T>> {
        self.block([q, k, v], g, beta, Some(1))
    }

    /// Feeds a block of tokens per sequence through the chunked form from the states so
    /// far and returns their outputs, leaving the states after them.
    pub fn prefill(
        &mut self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        g: Option<&Tensor<T>>,
        beta: Option<&Tensor<T>>,
    ) -> Result<Tensor<T>> {
        self.block([q, k, v], g, beta, None)
    }

    /// Tokens seen by each sequence.
    pub fn positions(&self) -> Vec<usize> {
        vec![self.position; self.token.batch]
    }

    /// The states, `[B, HV, d_k, d_v]`: what `forward_gated` takes as `initial_state`.
    pub fn state(&self) -> &Tensor<T> {
        &self.states
    }

    /// The memory the states hold, which does not grow.
    pub fn memory(&self) -> DecoderMemory {
        DecoderMemory {
            state_bytes: std::mem::size_of_val(self.states.as_slice()),
            bytes_per_token: 0,
        }
    }

    fn block(
        &mut self,
        [q, k, v]: [&Tensor<T>; 3],
        g: Option<&Tensor<T>>,
        beta: Option<&Tensor<T>>,
        tokens: Option<usize>,
    ) -> Result<Tensor<T>> {
        let len = q.seq_len();
        let problem = Problem {
            len_q: len,
            len_k: len,
            ..self.token
        };
        let expected = problem.shapes();
        let given = [q.shape(), k.shape(), v.shape()];
        if given != expected || tokens.is_some_and(|n| n != len) {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "the decoder takes q, k, v of shapes {:?} (any length but 0{}), not {given:?}",
                    expected,
                    if tokens.is_some() {
                        "; a step takes 1"
                    } else {
                        ""
                    }
                ),
            });
        }
        check_finite([("q", q), ("k", k), ("v", v)])?;
        let shape = gated_shape(&problem);
        let inputs = GateInputs {
            g,
            beta,
            ..GateInputs::default()
        };
        let checked = self.rule.check_inputs(&shape, &inputs)?;
        // The output has v's shape: a row of d_v per token and value head.
        let method = self.attention.method();
        let out_bytes = std::mem::size_of_val(v.as_slice()) as u128;
        let needed = out_bytes + method.workspace_bytes(&problem, size_of::<T>());
        let what = format!("a block of {len} tokens of {}", method.name());
        memory::ensure_within(&what, needed, self.budget)?;
        let mut out = Tensor::zeros_planned(expected[2])?;
        let states = self.states.as_mut_slice();
        if !self
            .rule
            .run(&shape, [q, k, v], &checked, false, states, &mut out)
        {
            check_results(method.name(), [("output", &out)])?;
        }
        self.position += len;
        Ok(out)
    }

    /// The decoder as bytes (little-endian), to restore with
    /// [`GatedDecoder::from_bytes`] under the same [`Attention`].
    ///
    /// ```
    /// use linattn::{Attention, GateInputs, GatedDecoder, Method, Retention, Tensor};
    /// let attention = Attention::new(Method::Retention(Retention::default())).causal(true);
    /// let x = Tensor::<f64>::randn([1, 12, 2, 8], 0)?;
    /// let (_, decoder) = attention.prefill_gated(&x, &x, &x, &GateInputs::default())?;
    /// let restored = GatedDecoder::<f64>::from_bytes(&attention, &decoder.to_bytes())?;
    /// assert_eq!((restored.positions(), restored.state()), (vec![12], decoder.state()));
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.memory().state_bytes + 128);
        out.extend_from_slice(GATED_MAGIC);
        out.extend_from_slice(&GATED_VERSION.to_le_bytes());
        out.push(size_of::<T>() as u8);
        let descriptor = format!("{:?}", self.attention.method());
        put_u64(&mut out, descriptor.len());
        out.extend_from_slice(descriptor.as_bytes());
        let t = &self.token;
        for x in [
            t.batch,
            t.heads_q,
            t.heads_v,
            t.dim_qk,
            t.dim_v,
            self.position,
        ] {
            put_u64(&mut out, x);
        }
        put_floats(&mut out, self.states.as_slice());
        out
    }

    /// Restores a decoder saved by [`GatedDecoder::to_bytes`]; `attention` must be the
    /// one it was made with, and `T` the same precision. Every size is checked against
    /// the bytes present before anything is allocated.
    pub fn from_bytes(attention: &Attention, bytes: &[u8]) -> Result<Self> {
        let mut reader = StateReader { bytes };
        if reader.take(8)? != GATED_MAGIC {
            return Err(Error::InvalidState(
                "not a linattn gated decoder state".into(),
            ));
        }
        let version = u32::from_le_bytes(reader.take(4)?.try_into().expect("4 bytes"));
        if version != GATED_VERSION {
            return Err(Error::InvalidState(format!(
                "format version {version}; this build reads version {GATED_VERSION}"
            )));
        }
        if reader.take(1)?[0] as usize != size_of::<T>() {
            return Err(Error::InvalidState(format!(
                "saved in another precision than {}",
                T::NAME
            )));
        }
        let descriptor_len = reader.length(1)?;
        if reader.take(descriptor_len)? != format!("{:?}", attention.method()).as_bytes() {
            return Err(Error::InvalidState(
                "saved by a different method or with other options".into(),
            ));
        }
        let [batch, heads, heads_v, dim_k, dim_v, position] = [0; 6].map(|_| reader.u64());
        let (batch, heads, heads_v, dim_k, dim_v) = (batch?, heads?, heads_v?, dim_k?, dim_v?);
        let position = position?;
        let count = batch
            .checked_mul(heads_v)
            .and_then(|x| x.checked_mul(dim_k))
            .and_then(|x| x.checked_mul(dim_v));
        // The states' length comes next: it must be the sizes' product, and present.
        let stored = reader.length(size_of::<T>())?;
        if count != Some(stored) {
            return Err(Error::InvalidState(format!(
                "{stored} state values for sizes {batch} × {heads_v} × {dim_k} × {dim_v}"
            )));
        }
        let mut decoder = attention
            .gated_decoder(batch, heads, heads_v, dim_k, dim_v)
            .map_err(|e| Error::InvalidState(format!("its sizes do not fit the method: {e}")))?;
        let values = reader.floats_of(stored)?;
        if values.iter().any(|x: &T| !x.is_finite()) {
            return Err(Error::InvalidState("a state holds NaN or infinity".into()));
        }
        if !reader.bytes.is_empty() {
            return Err(Error::InvalidState(format!(
                "{} bytes past the end",
                reader.bytes.len()
            )));
        }
        decoder.states = Tensor::from_vec(values, decoder.states.shape())?;
        decoder.position = position;
        Ok(decoder)
    }
}
