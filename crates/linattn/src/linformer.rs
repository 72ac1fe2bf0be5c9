//! Linformer (Wang et al., 2020): keys and values projected along the sequence,
//! `K' = Eᵀ K`, `V' = Fᵀ V` with E, F of shape `[max_len, k]`, then exact softmax over
//! the k projected positions. Inputs shorter than `max_len` use the first rows of E and
//! F (as the reference implementation does); longer inputs and causal requests are
//! errors, since a projection along the sequence mixes future positions in.

use crate::attention::{Problem, per_thread};
use crate::error::{Error, Result};
use crate::feature_map::linformer_projections;
use crate::kernels::cpu::exact::{Mask, TILE_QUERIES, dense_rows};
use crate::kernels::cpu::matmul::{MatMut, MatRef, matmul, packing_bytes};
use crate::softmax::{resolve_scale, task_list_bytes};
use crate::tensor::{Element, Tensor};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

/// Where Linformer's E and F come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Projections {
    /// Drawn with [`linformer_projections`](crate::linformer_projections).
    Drawn {
        /// Seed of the draw.
        seed: u64,
    },
    /// Supplied, each `max_len × k` row-major.
    Given {
        /// Projection of the keys.
        e: Arc<[f64]>,
        /// Projection of the values.
        f: Arc<[f64]>,
    },
}

/// Options of Linformer attention.
///
/// ```
/// use linattn::{Attention, Error, Linformer, Method, Tensor};
/// let method = Method::Linformer(Linformer::new(128, 16, 0));
/// let x = Tensor::<f32>::randn([1, 100, 2, 8], 0).unwrap();
/// assert_eq!(Attention::new(method.clone()).forward(&x, &x, &x).unwrap().shape(), [1, 100, 2, 8]);
/// let long = Tensor::<f32>::randn([1, 129, 2, 8], 0).unwrap();
/// let err = Attention::new(method).forward(&long, &long, &long).unwrap_err();
/// assert!(matches!(err, Error::SequenceTooLong { len: 129, max_len: 128, .. }));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Linformer {
    /// The longest key sequence the projections cover (rows of E and F).
    pub max_len: usize,
    /// The projected length k (columns of E and F).
    pub k: usize,
    /// E and F.
    pub projections: Projections,
    /// Multiplies the scores; `None` means 1/√head_dim.
    pub scale: Option<f64>,
}

impl Linformer {
    /// Projections of `max_len` rows to `k` drawn from `seed`.
    pub fn new(max_len: usize, k: usize, seed: u64) -> Self {
        Self {
            max_len,
            k,
            projections: Projections::Drawn { seed },
            scale: None,
        }
    }

    /// Given projections E (keys) and F (values), each `max_len × k` row-major.
    pub fn with_projections(e: Vec<f64>, f: Vec<f64>, max_len: usize, k: usize) -> Self {
        Self {
            max_len,
            k,
            projections: Projections::Given {
                e: e.into(),
                f: f.into(),
            },
            scale: None,
        }
    }

    /// E and F, `max_len × k` each.
    pub fn projections(&self) -> Result<(Vec<f64>, Vec<f64>)> {
        match &self.projections {
            Projections::Drawn { seed } => Ok(linformer_projections(self.max_len, self.k, *seed)),
            Projections::Given { e, f } => {
                for (name, p) in [("linformer E", e), ("linformer F", f)] {
                    if p.len() != self.max_len * self.k {
                        return Err(Error::ShapeMismatch {
                            detail: format!(
                                "{name} has {} elements; max_len {} × k {} needs {}",
                                p.len(),
                                self.max_len,
                                self.k,
                                self.max_len * self.k
                            ),
                        });
                    }
                    if let Some(bad) = p.iter().position(|x| !x.is_finite()) {
                        return Err(Error::NonFinite {
                            tensor: if name.ends_with('E') { "E" } else { "F" },
                            index: vec![bad / self.k, bad % self.k],
                            value: p[bad],
                        });
                    }
                }
                Ok((e.to_vec(), f.to_vec()))
            }
        }
    }

    pub(crate) fn validate(&self, problem: &Problem) -> Result<()> {
        if problem.causal {
            return Err(Error::CausalUnsupported {
                method: "linformer",
                reason: "projecting keys along the sequence mixes every position into every projected key",
            });
        }
        if self.k == 0 || self.max_len == 0 {
            return Err(Error::InvalidConfig(format!(
                "linformer needs max_len ≥ 1 and k ≥ 1, got max_len {} and k {}",
                self.max_len, self.k
            )));
        }
        if problem.len_k > self.max_len {
            return Err(Error::SequenceTooLong {
                method: "linformer",
                len: problem.len_k,
                max_len: self.max_len,
            });
        }
        resolve_scale(self.scale, problem.dim_qk)?;
        if let Projections::Given { .. } = self.projections {
            self.projections()?;
        }
        Ok(())
    }

    pub(crate) fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        let projections = 2 * (self.max_len * self.k) as u128 * (element as u128 + 8);
        let projected =
            (problem.batch * problem.heads_kv * self.k * (problem.dim_qk + problem.dim_v)) as u128
                * element as u128;
        let tasks = problem.batch * problem.heads_q * problem.len_q.div_ceil(TILE_QUERIES);
        let n = problem.len_k;
        let packing = packing_bytes(
            element,
            &[
                (self.k, problem.dim_qk, n),
                (self.k, problem.dim_v, n),
                (TILE_QUERIES, self.k, problem.dim_qk),
                (TILE_QUERIES, problem.dim_v, self.k),
            ],
        );
        let scores = per_thread(
            tasks,
            ((TILE_QUERIES * self.k + TILE_QUERIES) * element) as u128 + packing,
        );
        projections + projected + scores + task_list_bytes(tasks)
    }

    pub(crate) fn forward<T: Element>(
        &self,
        problem: &Problem,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
        heads: Range<usize>,
    ) -> Result<()> {
        let (e, f) = self.projections()?;
        let to_t = |p: Vec<f64>| -> Vec<T> { p.into_iter().map(T::of_f64).collect() };
        let (e, f) = (to_t(e), to_t(f));
        let n = problem.len_k;
        let e = MatRef::contiguous(&e, n, self.k);
        let f = MatRef::contiguous(&f, n, self.k);
        let (d, dv, kp) = (problem.dim_qk, problem.dim_v, self.k);

        // K' = Eᵀ K and V' = Fᵀ V once per (batch, kv head).
        let pairs: Vec<(usize, usize)> = (0..problem.batch)
            .flat_map(|b| (0..problem.heads_kv).map(move |g| (b, g)))
            .collect();
        let projected: Vec<(Vec<T>, Vec<T>)> = pairs
            .par_iter()
            .map(|&(b, g)| {
                let mut keys = vec![T::zero(); kp * d];
                let mut values = vec![T::zero(); kp * dv];
                matmul(
                    MatMut::contiguous(&mut keys, kp, d),
                    e.t(),
                    k.head(b, g),
                    false,
                    T::one(),
                );
                matmul(
                    MatMut::contiguous(&mut values, kp, dv),
                    f.t(),
                    v.head(b, g),
                    false,
                    T::one(),
                );
                (keys, values)
            })
            .collect();

        let scale = T::of_f64(resolve_scale(self.scale, d).expect("validated"));
        let out_heads = out.heads_mut();
        let blocks: Vec<(usize, usize, usize)> = (0..problem.batch)
            .flat_map(|b| {
                heads.clone().flat_map(move |h| {
                    (0..problem.len_q)
                        .step_by(TILE_QUERIES)
                        .map(move |start| (b, h, start))
                })
            })
            .collect();
        blocks.par_iter().for_each_init(
            || (Vec::new(), Vec::new()),
            |(scores, sums), &(b, h, start)| {
                let rows = TILE_QUERIES.min(problem.len_q - start);
                let (keys, values) = &projected[b * problem.heads_kv + problem.kv_head(h)];
                // SAFETY: each (b, h, start) block is one task.
                let dst = unsafe { out_heads.block(b, h, start, rows) };
                dense_rows(
                    q.head(b, h).rows_range(start, rows),
                    start,
                    MatRef::contiguous(keys, kp, d),
                    MatRef::contiguous(values, kp, dv),
                    scale,
                    Mask::NONE,
                    dst,
                    scores,
                    sums,
                );
            },
        );
        Ok(())
    }
}
