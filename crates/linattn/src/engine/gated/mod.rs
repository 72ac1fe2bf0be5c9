//! The gated and delta-rule family: the engine's state updates beyond the plain sum. One
//! state `S` of `d_k × d_v` per (sequence, value head) absorbs each token after decaying,
//! and the output reads it without a denominator, `o_t = s · S_tᵀ q_t`:
//!
//! - decay: `S_t = Diag(e^{g_t}) S_{t−1} + k_t v_tᵀ`, the log decay `g_t ≤ 0` fixed per head
//!   (retention), one per token and head (Mamba-2, simple GLA) or per key channel (GLA);
//! - delta rule: `S' = Diag(e^{g_t}) S_{t−1}`, `S_t = S' + β_t k_t (v_t − S'ᵀ k_t)ᵀ`
//!   (DeltaNet without decay, Gated DeltaNet with a scalar gate, KDA per channel).
//!
//! q and k are `[B, T, H, d_k]`, v `[B, T, HV, d_v]` with HV a multiple of H (value head
//! `hv` reads query and key head `hv / (HV / H)`), as in flash-linear-attention. Two forms:
//! [`recurrent`] one token at a time, and [`chunked`], whose chunk may span the whole
//! sequence (the parallel form: the masked quadratic product, and for the delta rule the
//! triangular solve over every token).

pub(crate) mod backward;
pub(crate) mod chunked;
pub(crate) mod recurrent;

use crate::base::Element;
pub(crate) use crate::base::GatedShape;

/// How each state decays before a token is absorbed, in log space (every value ≤ 0).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Decay<'a, T> {
    /// Nothing decays (DeltaNet).
    None,
    /// One log decay per value head, the same for every token (RetNet's γ): `[heads_v]`.
    Fixed(&'a [T]),
    /// One per token and value head: `[batch, len, heads_v]`.
    Token(&'a [T]),
    /// One per token, value head and key channel: `[batch, len, heads_v, dim_k]`.
    Channel(&'a [T]),
}

/// The per-token inputs of the state update, and how q and k are read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gates<'a, T> {
    pub decay: Decay<'a, T>,
    /// The delta rule's step sizes `[batch, len, heads_v]`; `None` for the plain
    /// (decayed) sum.
    pub beta: Option<&'a [T]>,
    /// Whether each row of q and k is divided by `sqrt(Σ x² + 1e-6)` as it is read
    /// (flash-linear-attention's `use_qk_l2norm_in_kernel`).
    pub l2norm_qk: bool,
    /// Sequences packed along the length of a batch of one, sequence n over tokens
    /// `cu_seqlens[n]..cu_seqlens[n + 1]` with a state of its own; `None`: each batch
    /// row is a sequence.
    pub cu_seqlens: Option<&'a [usize]>,
}

/// The tokens of one unit (a sequence and value head), which share a state: `len` tokens
/// from `first` in batch row `b`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Span {
    pub b: usize,
    pub hv: usize,
    pub first: usize,
    pub len: usize,
}

impl<T: Element> Gates<'_, T> {
    /// Units (sequences × value heads): the states of a call.
    pub fn units(&self, shape: &GatedShape) -> usize {
        let sequences = self.cu_seqlens.map_or(shape.batch, |cu| cu.len() - 1);
        sequences * shape.heads_v
    }

    /// The tokens of `unit`, whose state is the `unit`-th.
    pub fn span(&self, shape: &GatedShape, unit: usize) -> Span {
        let (sequence, hv) = (unit / shape.heads_v, unit % shape.heads_v);
        match self.cu_seqlens {
            None => Span {
                b: sequence,
                hv,
                first: 0,
                len: shape.len,
            },
            Some(cu) => Span {
                b: 0,
                hv,
                first: cu[sequence],
                len: cu[sequence + 1] - cu[sequence],
            },
        }
    }

    /// Log decays of tokens `start..start + len` of sequence `b`, value head `hv`, into
    /// `out` (`len × width`, [`Self::width`]); nothing for [`Decay::None`].
    fn log_decays(&self, shape: &GatedShape, b: usize, hv: usize, start: usize, out: &mut [T]) {
        let len = out.len() / self.width(shape).max(1);
        let token = |t: usize| shape.token(b, start + t, hv);
        match self.decay {
            Decay::None => {}
            Decay::Fixed(per_head) => out.fill(per_head[hv]),
            Decay::Token(g) => (0..len).for_each(|t| out[t] = g[token(t)]),
            Decay::Channel(g) => {
                let d = shape.dim_k;
                for (t, row) in out.chunks_exact_mut(d).enumerate() {
                    row.copy_from_slice(&g[token(t) * d..token(t) * d + d]);
                }
            }
        }
    }

    /// Log decays per token: 0 without decay, 1 for a scalar gate, `dim_k` per channel.
    fn width(&self, shape: &GatedShape) -> usize {
        match self.decay {
            Decay::None => 0,
            Decay::Fixed(_) | Decay::Token(_) => 1,
            Decay::Channel(_) => shape.dim_k,
        }
    }

    /// β of the `out.len()` tokens from `start` of sequence `b`, value head `hv`, into
    /// `out`; false, with `out` untouched, for the plain sum.
    fn step_sizes(
        &self,
        shape: &GatedShape,
        b: usize,
        hv: usize,
        start: usize,
        out: &mut [T],
    ) -> bool {
        let Some(beta) = self.beta else {
            return false;
        };
        for (t, out) in out.iter_mut().enumerate() {
            *out = beta[shape.token(b, start + t, hv)];
        }
        true
    }

    /// β of token `t` of sequence `b`, value head `hv`.
    fn beta(&self, shape: &GatedShape, b: usize, hv: usize, t: usize) -> Option<T> {
        self.beta.map(|beta| beta[shape.token(b, t, hv)])
    }
}

/// What flash-linear-attention's `l2norm` adds to the sum of squares.
pub(crate) const L2NORM_EPSILON: f64 = 1e-6;

/// Divides each `d`-element row of `rows` by `sqrt(Σ x² + 1e-6)`.
pub(crate) fn l2_normalise_rows<T: Element>(rows: &mut [T], d: usize) {
    let epsilon = T::of_f64(L2NORM_EPSILON);
    for row in rows.chunks_exact_mut(d) {
        let norm = (crate::base::simd::dot(row, row) + epsilon).sqrt();
        crate::base::simd::scale(row, T::one() / norm);
    }
}
