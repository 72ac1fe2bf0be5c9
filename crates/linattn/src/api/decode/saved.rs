//! A decoder's state as bytes: [`Decoder::to_bytes`] and [`Decoder::from_bytes`], whose
//! reader checks every size against the bytes present and the memory policy before it
//! allocates, so that no file, however made, can abort the process.

use super::Decoder;
use crate::api::attention::Attention;
use crate::base::{Element, Error, Result};

/// Leads every saved decoder state, with the format's version.
const STATE_MAGIC: &[u8; 8] = b"LINATTN\0";
const STATE_VERSION: u32 = 1;
/// Positions past this are corrupt: no sequence is 2⁴⁸ tokens long, and a decoder must
/// be able to count on from its position.
const MAX_POSITION: usize = 1 << 48;

impl<T: Element> Decoder<T> {
    /// The decoder's state as bytes (little-endian), to restore with
    /// [`Decoder::from_bytes`] under the same [`Attention`].
    ///
    /// ```
    /// use linattn::{Attention, Decoder, Method, Performer, Tensor};
    /// let attention = Attention::new(Method::Performer(Performer::new(32, 5)));
    /// let x = Tensor::<f32>::randn([1, 12, 2, 8], 0).unwrap();
    /// let (_, decoder) = attention.prefill(&x, &x, &x).unwrap();
    /// let restored = Decoder::<f32>::from_bytes(&attention, &decoder.to_bytes()).unwrap();
    /// assert_eq!(restored.positions(), vec![12]);
    /// ```
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.memory().state_bytes + 256);
        out.extend_from_slice(STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.push(size_of::<T>() as u8);
        let descriptor = format!("{:?}", self.attention.method());
        put_u64(&mut out, descriptor.len());
        out.extend_from_slice(descriptor.as_bytes());
        let l = &self.layout;
        for x in [
            l.heads_q,
            l.heads_kv,
            l.dim_qk,
            l.dim_v,
            l.split,
            l.capacity.unwrap_or(usize::MAX),
        ] {
            put_u64(&mut out, x);
        }
        put_u64(&mut out, self.sequences.len());
        for sequence in &self.sequences {
            put_u64(&mut out, sequence.position);
            put_floats(&mut out, &sequence.keys);
            put_floats(&mut out, &sequence.values);
            for state in &sequence.states {
                put_floats(&mut out, &state.kv);
                put_floats(&mut out, &state.k_sum);
                put_floats(&mut out, &[state.log_scale]);
                put_floats(&mut out, &state.v_sum);
                put_u64(&mut out, state.count);
                put_u64(&mut out, state.argmax);
            }
        }
        out
    }

    /// Restores a decoder saved by [`Decoder::to_bytes`]; `attention` must be the one it
    /// was made with (same method and options), and `T` the same precision.
    pub fn from_bytes(attention: &Attention, bytes: &[u8]) -> Result<Self> {
        let mut reader = StateReader { bytes };
        if reader.take(8)? != STATE_MAGIC {
            return Err(Error::InvalidState("not a linattn decoder state".into()));
        }
        let version = u32::from_le_bytes(reader.take(4)?.try_into().expect("4 bytes"));
        if version != STATE_VERSION {
            return Err(Error::InvalidState(format!(
                "format version {version}; this build reads version {STATE_VERSION}"
            )));
        }
        let element = reader.take(1)?[0] as usize;
        if element != size_of::<T>() {
            return Err(Error::InvalidState(format!(
                "saved with {element}-byte elements, restored as {}",
                T::NAME
            )));
        }
        let descriptor_len = reader.length(1)?;
        let descriptor = reader.take(descriptor_len)?;
        if descriptor != format!("{:?}", attention.method()).as_bytes() {
            return Err(Error::InvalidState(
                "saved by a different method or with other options".into(),
            ));
        }
        let [heads_q, heads_kv, dim_qk, dim_v, _, _] = [0; 6].map(|_| reader.u64());
        let (heads_q, heads_kv, dim_qk, dim_v) = (heads_q?, heads_kv?, dim_qk?, dim_v?);
        let batch = reader.length(8)?;
        let stored = Some(reader.bytes.len());
        let plan = Self::plan(attention, batch, heads_q, heads_kv, dim_qk, dim_v, stored).map_err(
            |e| match e {
                Error::InvalidState(_) => e,
                other => Error::InvalidState(format!("its sizes do not fit the method: {other}")),
            },
        )?;
        let mut decoder = plan.allocate(batch);
        let layout = decoder.layout;
        for sequence in &mut decoder.sequences {
            sequence.position = reader.u64()?;
            if sequence.position > MAX_POSITION {
                return Err(Error::InvalidState(format!(
                    "position {} is past any sequence",
                    sequence.position
                )));
            }
            sequence.keys = reader.floats()?;
            sequence.values = reader.floats()?;
            let cached = if layout.split > 0 {
                layout
                    .capacity
                    .map_or(sequence.position, |c| sequence.position.min(c))
            } else {
                0
            };
            let expected = |dim: usize| (cached as u128) * (layout.heads_kv * dim) as u128;
            if sequence.keys.len() as u128 != expected(layout.dim_qk)
                || sequence.values.len() as u128 != expected(layout.dim_v)
            {
                return Err(Error::InvalidState(format!(
                    "a cache of {} keys and {} values does not hold {cached} tokens",
                    sequence.keys.len(),
                    sequence.values.len()
                )));
            }
            for state in &mut sequence.states {
                let expected = (state.kv.len(), state.k_sum.len(), state.v_sum.len());
                state.kv = reader.floats()?;
                state.k_sum = reader.floats()?;
                state.log_scale = *reader.floats::<T>()?.first().ok_or_else(truncated)?;
                state.v_sum = reader.floats()?;
                state.count = reader.u64()?;
                state.argmax = reader.u64()?;
                if (state.kv.len(), state.k_sum.len(), state.v_sum.len()) != expected {
                    return Err(Error::InvalidState("a state of the wrong size".into()));
                }
                // −∞ is the stabiliser's value before the first key; nothing else may be
                // non-finite.
                let log_scale_ok = state.log_scale.is_finite()
                    || (state.log_scale == T::neg_infinity() && state.count == 0);
                let sums = [&state.kv, &state.k_sum, &state.v_sum];
                if !log_scale_ok || sums.iter().any(|xs| xs.iter().any(|x| !x.is_finite())) {
                    return Err(Error::InvalidState("a state holds NaN or infinity".into()));
                }
            }
            if [&sequence.keys, &sequence.values]
                .iter()
                .any(|xs| xs.iter().any(|x| !x.is_finite()))
            {
                return Err(Error::InvalidState(
                    "the cache holds NaN or infinity".into(),
                ));
            }
        }
        if !reader.bytes.is_empty() {
            return Err(Error::InvalidState(format!(
                "{} bytes past the end",
                reader.bytes.len()
            )));
        }
        Ok(decoder)
    }
}

pub(super) fn put_u64(out: &mut Vec<u8>, x: usize) {
    out.extend_from_slice(&(x as u64).to_le_bytes());
}

pub(super) fn put_floats<T: Element>(out: &mut Vec<u8>, xs: &[T]) {
    put_u64(out, xs.len());
    for &x in xs {
        match size_of::<T>() {
            4 => out.extend_from_slice(&(x.as_f64() as f32).to_le_bytes()),
            _ => out.extend_from_slice(&x.as_f64().to_le_bytes()),
        }
    }
}

pub(super) fn truncated() -> Error {
    Error::InvalidState("truncated".into())
}

/// Reads saved state, checking every length against the bytes left before allocating.
pub(super) struct StateReader<'a> {
    pub(super) bytes: &'a [u8],
}

impl<'a> StateReader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.bytes.len() {
            return Err(truncated());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    pub(super) fn u64(&mut self) -> Result<usize> {
        let x = u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"));
        usize::try_from(x).map_err(|_| Error::InvalidState(format!("{x} does not fit in memory")))
    }

    /// A count of items of `item_bytes` each, no more than the bytes left could hold.
    pub(super) fn length(&mut self, item_bytes: usize) -> Result<usize> {
        let n = self.u64()?;
        if n.saturating_mul(item_bytes) > self.bytes.len() {
            return Err(truncated());
        }
        Ok(n)
    }

    pub(super) fn floats<T: Element>(&mut self) -> Result<Vec<T>> {
        let n = self.length(size_of::<T>())?;
        self.floats_of(n)
    }

    /// `n` floats, their count already read.
    pub(super) fn floats_of<T: Element>(&mut self, n: usize) -> Result<Vec<T>> {
        let size = size_of::<T>();
        Ok(self
            .take(n * size)?
            .chunks_exact(size)
            .map(|b| match size {
                4 => T::of_f64(f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64),
                _ => T::of_f64(f64::from_le_bytes(b.try_into().expect("8 bytes"))),
            })
            .collect())
    }
}
