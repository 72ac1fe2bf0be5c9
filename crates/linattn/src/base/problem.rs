//! The problem every backend and method shares: the shapes of one attention call,
//! validated, and how its causal kernelized form is computed.

use super::error::{Error, Result};

/// Shapes of one attention call, validated: q is `[batch, len_q, heads_q, dim_qk]`,
/// k is `[batch, len_k, heads_kv, dim_qk]`, v is `[batch, len_k, heads_v, dim_v]`: as many
/// value heads as key heads (which groups of query heads share), or for the gated family
/// ([`Problem::grouped_values`]) as many query as key heads and groups of value heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Problem {
    pub batch: usize,
    pub len_q: usize,
    pub len_k: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub heads_v: usize,
    pub dim_qk: usize,
    pub dim_v: usize,
    pub causal: bool,
    /// The algorithm of causal kernelized attention.
    pub causal_form: CausalForm,
}

impl Problem {
    /// Checks that the shapes fit together (GQA/MQA: q heads a multiple of k/v heads).
    pub fn new(q: [usize; 4], k: [usize; 4], v: [usize; 4], causal: bool) -> Result<Self> {
        for (name, shape) in [("q", q), ("k", k), ("v", v)] {
            if shape.contains(&0) {
                return Err(Error::Empty {
                    tensor: name,
                    shape: shape.to_vec(),
                });
            }
        }
        let mismatch = |detail: String| Err(Error::ShapeMismatch { detail });
        if q[0] != k[0] || k[0] != v[0] {
            return mismatch(format!(
                "batch sizes differ: q {}, k {}, v {}",
                q[0], k[0], v[0]
            ));
        }
        if k[1] != v[1] {
            return mismatch(format!(
                "k has {} positions but v has {}; they must be the same",
                k[1], v[1]
            ));
        }
        if k[2] != v[2] {
            return mismatch(format!(
                "k has {} heads but v has {}; they must be the same",
                k[2], v[2]
            ));
        }
        if q[3] != k[3] {
            return mismatch(format!(
                "q head_dim {} differs from k head_dim {}",
                q[3], k[3]
            ));
        }
        if !q[2].is_multiple_of(k[2]) {
            return Err(Error::HeadMismatch {
                q_heads: q[2],
                kv_heads: k[2],
            });
        }
        if causal && q[1] != k[1] {
            return mismatch(format!(
                "causal attention needs as many queries as keys (q has {}, k has {}); \
                 continue a sequence through the recurrent state instead",
                q[1], k[1]
            ));
        }
        Ok(Self {
            batch: q[0],
            len_q: q[1],
            len_k: k[1],
            heads_q: q[2],
            heads_kv: k[2],
            heads_v: v[2],
            dim_qk: q[3],
            dim_v: v[3],
            causal,
            causal_form: CausalForm::Chunked,
        })
    }

    /// The shapes of the gated family (flash-linear-attention's): q and k `[batch, len,
    /// heads, dim_k]`, v `[batch, len, heads_v, dim_v]` with `heads_v` a multiple of
    /// `heads` (value head `hv` reads query and key head `hv / (heads_v / heads)`); the
    /// family is causal, so as many positions in each.
    pub fn grouped_values(
        q: [usize; 4],
        k: [usize; 4],
        v: [usize; 4],
        causal: bool,
    ) -> Result<Self> {
        let mismatch = |detail: String| Err(Error::ShapeMismatch { detail });
        if v.contains(&0) {
            return Err(Error::Empty {
                tensor: "v",
                shape: v.to_vec(),
            });
        }
        if k[2] != q[2] {
            return mismatch(format!(
                "q has {} heads and k {}; here they must be the same (v may have a multiple \
                 of them)",
                q[2], k[2]
            ));
        }
        if !v[2].is_multiple_of(k[2].max(1)) {
            return mismatch(format!(
                "v has {} heads, not a multiple of q and k's {}",
                v[2], k[2]
            ));
        }
        // Everything else as for shared key and value heads: v read with k's head count.
        let mut problem = Self::new(q, k, [v[0], v[1], k[2], v[3]], causal)?;
        problem.heads_v = v[2];
        Ok(problem)
    }

    /// The k/v head that query head `h` reads (GQA: consecutive q heads share one).
    #[inline]
    pub fn kv_head(&self, h: usize) -> usize {
        h / (self.heads_q / self.heads_kv)
    }

    /// The shapes of q, k and v.
    pub fn shapes(&self) -> [[usize; 4]; 3] {
        let (b, lk) = (self.batch, self.len_k);
        [
            [b, self.len_q, self.heads_q, self.dim_qk],
            [b, lk, self.heads_kv, self.dim_qk],
            [b, lk, self.heads_v, self.dim_v],
        ]
    }

    /// Shape of the output of every method but FNet: one d_v row per query and head.
    pub fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.len_q, self.heads_q, self.dim_v]
    }
}

/// Chunk length of the causal kernelized forms unless chosen otherwise.
pub const DEFAULT_CHUNK: usize = 64;

/// How causal kernelized attention (linear, performer, cosformer, hybrid's global heads)
/// is computed; both give the same result to rounding, as does the recurrent
/// [`Decoder`](crate::Decoder).
///
/// ```
/// use linattn::{Attention, CausalForm, Method, Tensor};
/// let x = Tensor::<f64>::randn([1, 100, 2, 8], 0).unwrap();
/// let chunked = Attention::new(Method::linear()).causal(true);
/// let parallel = chunked.clone().causal_form(CausalForm::Parallel);
/// let (a, b) = (chunked.forward(&x, &x, &x).unwrap(), parallel.forward(&x, &x, &x).unwrap());
/// assert!(a.as_slice().iter().zip(b.as_slice()).all(|(x, y)| (x - y).abs() < 1e-12));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CausalForm {
    /// Exact products inside chunks of the method's `chunk` tokens, a running state
    /// across them: O(n) work.
    #[default]
    Chunked,
    /// Every weight of the causal mask formed tile by tile, no state: O(n²) work.
    Parallel,
}

/// The shapes of one call: q, k `[batch, len, heads, dim_k]`, v `[batch, len, heads_v,
/// dim_v]`, each state `dim_k × dim_v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GatedShape {
    pub batch: usize,
    pub len: usize,
    pub heads: usize,
    pub heads_v: usize,
    pub dim_k: usize,
    pub dim_v: usize,
}

impl GatedShape {
    /// The query and key head value head `hv` reads.
    pub fn qk_head(&self, hv: usize) -> usize {
        hv / (self.heads_v / self.heads)
    }

    /// Token `t` of batch row `b` at value head `hv`, as a flat index of
    /// `[batch, len, heads_v]` (a row of v, g or β).
    pub fn token(&self, b: usize, t: usize, hv: usize) -> usize {
        (b * self.len + t) * self.heads_v + hv
    }

    /// Elements of one state.
    pub fn state_len(&self) -> usize {
        self.dim_k * self.dim_v
    }
}

/// Scratch that every one of `tasks` parallel tasks holds at once, bounded by the
/// number of threads.
pub(crate) fn per_thread(tasks: usize, bytes_each: u128) -> u128 {
    tasks.min(rayon::current_num_threads()) as u128 * bytes_each
}

/// The list of tasks a kernel hands to rayon (a batch and two ranges at most).
pub(crate) fn task_list_bytes(tasks: usize) -> u128 {
    (tasks * 6 * size_of::<usize>()) as u128
}
