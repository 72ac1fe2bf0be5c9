//! Variable-length batches: sequences packed end to end along the sequence axis of a
//! batch of one, delimited by cumulative offsets (`cu_seqlens`, FlashAttention's
//! convention), so that no padding is stored or computed.

use crate::api::attention::{Attention, Gradients};
use crate::base::{Element, Tensor};
use crate::base::{Error, Result};
use rayon::prelude::*;

impl Attention {
    /// Attention over packed sequences: q, k, v are `[1, total, heads, dim]` and sequence
    /// s holds positions `cu_seqlens[s]..cu_seqlens[s + 1]`. Each sequence is attended
    /// on its own — causal or not, no query sees a key of another sequence.
    ///
    /// ```
    /// use linattn::{Attention, Method, Tensor};
    /// let x = Tensor::<f32>::randn([1, 10, 2, 8], 0).unwrap();
    /// let attention = Attention::new(Method::linear()).causal(true);
    /// let packed = attention.forward_varlen(&x, &x, &x, &[0, 3, 10]).unwrap();
    /// let second = x.slice_seq(3..10).unwrap();
    /// let alone = attention.forward(&second, &second, &second).unwrap();
    /// assert_eq!(packed.slice_seq(3..10).unwrap(), alone);
    /// ```
    pub fn forward_varlen<T: Element>(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        cu_seqlens: &[usize],
    ) -> Result<Tensor<T>> {
        let segments = segments(cu_seqlens, [q, k, v])?;
        let outputs = segments
            .par_iter()
            .map(|range| {
                let slice = |x: &Tensor<T>| x.slice_seq(range.clone());
                self.forward(&slice(q)?, &slice(k)?, &slice(v)?)
            })
            .collect::<Result<Vec<_>>>()?;
        concat_seq(&outputs)
    }

    /// Gradients of [`Attention::forward_varlen`]; Linformer's projection gradients are
    /// summed over the sequences.
    pub fn backward_varlen<T: Element>(
        &self,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        d_out: &Tensor<T>,
        cu_seqlens: &[usize],
    ) -> Result<Gradients<T>> {
        let segments = segments(cu_seqlens, [q, k, v])?;
        if d_out.batch() != 1 || d_out.seq_len() != q.seq_len() {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "the output gradient has shape {:?}; packed sequences need [1, {}, ..]",
                    d_out.shape(),
                    q.seq_len()
                ),
            });
        }
        let parts = segments
            .par_iter()
            .map(|range| {
                let slice = |x: &Tensor<T>| x.slice_seq(range.clone());
                self.backward(&slice(q)?, &slice(k)?, &slice(v)?, &slice(d_out)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let gather = |pick: fn(&Gradients<T>) -> &Tensor<T>| {
            concat_seq(&parts.iter().map(|g| pick(g).clone()).collect::<Vec<_>>())
        };
        let projections = parts.iter().filter_map(|g| g.projections.clone()).reduce(
            |(mut e, mut f), (e2, f2)| {
                e.iter_mut().zip(&e2).for_each(|(a, b)| *a += b);
                f.iter_mut().zip(&f2).for_each(|(a, b)| *a += b);
                (e, f)
            },
        );
        Ok(Gradients {
            dq: gather(|g| &g.dq)?,
            dk: gather(|g| &g.dk)?,
            dv: gather(|g| &g.dv)?,
            projections,
        })
    }
}

/// The position ranges of the packed sequences, after checking the offsets against the
/// inputs.
fn segments<T: Element>(
    cu_seqlens: &[usize],
    [q, k, v]: [&Tensor<T>; 3],
) -> Result<Vec<std::ops::Range<usize>>> {
    for (name, tensor) in [("q", q), ("k", k), ("v", v)] {
        if tensor.batch() != 1 {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "packed sequences go in a batch of one, but {name} has batch {}",
                    tensor.batch()
                ),
            });
        }
    }
    let total = q.seq_len();
    if k.seq_len() != total || v.seq_len() != total {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "packed q, k and v share their offsets, so their lengths must agree (q {total}, k {}, v {})",
                k.seq_len(),
                v.seq_len()
            ),
        });
    }
    let valid = cu_seqlens.len() >= 2
        && cu_seqlens[0] == 0
        && cu_seqlens.windows(2).all(|w| w[0] < w[1])
        && cu_seqlens.last() == Some(&total);
    if !valid {
        return Err(Error::InvalidConfig(format!(
            "cu_seqlens must rise strictly from 0 to the packed length {total}, got {cu_seqlens:?}"
        )));
    }
    Ok(cu_seqlens.windows(2).map(|w| w[0]..w[1]).collect())
}

/// Tensors of batch one joined along the sequence.
fn concat_seq<T: Element>(parts: &[Tensor<T>]) -> Result<Tensor<T>> {
    let [_, _, heads, dim] = parts[0].shape();
    let len = parts.iter().map(Tensor::seq_len).sum();
    let mut data = Vec::with_capacity(len * heads * dim);
    for part in parts {
        data.extend_from_slice(part.as_slice());
    }
    Tensor::from_vec(data, [1, len, heads, dim])
}
