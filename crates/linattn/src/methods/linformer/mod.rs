//! Linformer (Wang et al., 2020): keys and values projected along the sequence,
//! `K' = Eᵀ K`, `V' = Fᵀ V` with E, F of shape `[max_len, k]`, then exact softmax over
//! the k projected positions. Inputs shorter than `max_len` use the first rows of E and
//! F (as the reference implementation does); longer inputs and causal requests are
//! errors, since a projection along the sequence mixes future positions in.

mod reference;

use super::info::{Forms, MethodInfo, OptionInfo};
use super::method::{AttentionMethod, Prepared, Recurrent};
use super::options::MethodOptions;
use super::softmax::resolve_scale;
use crate::backend::cpu::exact::{Mask, TILE_QUERIES, dense_rows};
use crate::backend::cpu::matmul::{matmul, packing_bytes};
use crate::base::{Element, Error, MatMut, MatRef, Problem, Result, Tensor};
use crate::base::{per_thread, task_list_bytes};
use crate::engine::KernelPass;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::ops::Range;
use std::sync::Arc;

impl Linformer {
    /// Linformer as options give it: E and F given as matrices, or drawn.
    pub(crate) fn from_options(options: &MethodOptions) -> Result<Self> {
        if let (Some((e, e_shape)), Some((f, f_shape))) =
            (options.matrix("proj-k"), options.matrix("proj-v"))
        {
            if e_shape != f_shape {
                return Err(Error::InvalidConfig(format!(
                    "E has shape {e_shape:?} but F has shape {f_shape:?}; they must match"
                )));
            }
            let [max_len, k] = *e_shape;
            return Ok(Linformer::with_projections(
                e.clone(),
                f.clone(),
                max_len,
                k,
            ));
        }
        let k = options
            .parse("k-proj", "a number of projected keys")?
            .ok_or_else(|| {
                Error::InvalidConfig(
                    "linformer needs --k-proj K (drawn projections) or --proj-k E.npy --proj-v F.npy"
                        .into(),
                )
            })?;
        Ok(Linformer::new(
            options
                .parse("max-len", "a number of tokens")?
                .unwrap_or(options.key_len),
            k,
            options.parse("seed", "a whole number")?.unwrap_or(0),
        ))
    }
}

fn causal_unsupported() -> Error {
    Error::CausalUnsupported {
        method: "linformer",
        reason: "projecting keys along the sequence mixes every position into every projected key",
    }
}

pub(crate) const INFO: MethodInfo = MethodInfo {
    name: "linformer",
    summary: "softmax over keys and values projected along the sequence, n → k",
    time: "O(n k d)",
    memory: "O(n k)",
    options: &[
        OptionInfo {
            name: "k-proj",
            default: "256",
            what: "projected length k",
        },
        OptionInfo {
            name: "max-len",
            default: "the key sequence's length",
            what: "rows of E and F: the longest key sequence",
        },
        OptionInfo {
            name: "seed",
            default: "0",
            what: "seed of the draw of E and F",
        },
        OptionInfo {
            name: "proj-k",
            default: "drawn",
            what: "E given: a [max_len, k] matrix (with proj-v)",
        },
        OptionInfo {
            name: "proj-v",
            default: "drawn",
            what: "F given: a [max_len, k] matrix (with proj-k)",
        },
    ],
    cpu: Forms {
        full: true,
        causal: false,
        recurrent: false,
    },
    cuda: Forms::NONE,
    layout: super::info::HeadLayout::SharedKeysValues,
    token_inputs: &[],
    weights: true,
    variants: &[],
    parameters: &["E", "F"],
    examples: &[&[("max-len", "320"), ("k-proj", "12"), ("seed", "5")]],
};

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
}

/// E and F as [`AttentionMethod::prepare`] left them.
fn projections_of<T>(prepared: &Prepared<T>) -> Result<(&[T], &[T])> {
    let (e, f) = prepared.projections.as_ref().ok_or_else(|| {
        Error::Unsupported("Linformer was not prepared with its projections".into())
    })?;
    Ok((e, f))
}

impl AttentionMethod for Linformer {
    fn validate(&self, problem: &Problem) -> Result<()> {
        if problem.causal {
            return Err(causal_unsupported());
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

    fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
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

    fn prepare<T: Element>(&self, _problem: &Problem) -> Result<Prepared<T>> {
        let (e, f) = self.projections()?;
        let in_t = |p: Vec<f64>| -> Vec<T> { p.into_iter().map(T::of_f64).collect() };
        Ok(Prepared {
            projections: Some((in_t(e), in_t(f))),
            ..Prepared::with_kernel(None)
        })
    }

    fn forward<T: Element>(
        &self,
        problem: &Problem,
        prepared: &Prepared<T>,
        q: &Tensor<T>,
        k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
        heads: Range<usize>,
    ) -> Result<KernelPass<T>> {
        let (e, f) = projections_of(prepared)?;
        let n = problem.len_k;
        let e = MatRef::contiguous(&e[..n * self.k], n, self.k);
        let f = MatRef::contiguous(&f[..n * self.k], n, self.k);
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
        Ok(KernelPass::unchecked())
    }

    fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        let (n, kp, d, dv) = (problem.len_k, self.k, problem.dim_qk, problem.dim_v);
        let projections = 2 * (self.max_len * kp) as u128 * (element as u128 + 8);
        // Per task: K', V', their gradients, two tiles and the partial dE, dF, which the
        // reduction may hold about twice per thread.
        let per_task = (2 * kp * (d + dv) + 2 * TILE_QUERIES * kp + TILE_QUERIES) * element;
        let partial = 2 * n * kp * element;
        let packing = packing_bytes(
            element,
            &[
                (kp, d.max(dv), n),
                (n, d.max(dv), kp),
                (n, kp, d.max(dv)),
                (TILE_QUERIES, kp, d.max(dv)),
                (kp, d.max(dv), TILE_QUERIES),
            ],
        );
        let tasks = problem.batch * problem.heads_kv;
        let threads = rayon::current_num_threads().min(tasks) as u128;
        projections
            + per_thread(tasks, (per_task + partial) as u128 + packing)
            + 2 * threads * partial as u128
            + task_list_bytes(tasks)
    }

    /// Adds the gradients of q, k, v into `grads` and returns those of E and F: with
    /// `K' = Eᵀ K`, `dK = E dK'` and `dE = K dK'ᵀ`, summed over batches and heads.
    fn backward<T: Element>(
        &self,
        problem: &Problem,
        prepared: &Prepared<T>,
        [q, k, v, d_out]: [&Tensor<T>; 4],
        [dq, dk, dv]: [&mut Tensor<T>; 3],
    ) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
        let (e, f) = projections_of(prepared)?;
        let (n, kp, d, dim_v) = (problem.len_k, self.k, problem.dim_qk, problem.dim_v);
        let e = MatRef::contiguous(&e[..n * kp], n, kp);
        let f = MatRef::contiguous(&f[..n * kp], n, kp);
        let scale = T::of_f64(resolve_scale(self.scale, d).expect("validated"));
        let tasks: Vec<(usize, usize)> = (0..problem.batch)
            .flat_map(|b| (0..problem.heads_kv).map(move |g| (b, g)))
            .collect();
        let (dq_heads, dk_heads, dv_heads) = (dq.heads_mut(), dk.heads_mut(), dv.heads_mut());
        let zero = || (vec![T::zero(); n * kp], vec![T::zero(); n * kp]);
        let (d_e, d_f) = tasks
            .par_iter()
            .map(|&(b, g)| {
                let (keys, values) = (k.head(b, g), v.head(b, g));
                let mut projected_keys = vec![T::zero(); kp * d];
                let mut projected_values = vec![T::zero(); kp * dim_v];
                matmul(
                    MatMut::contiguous(&mut projected_keys, kp, d),
                    e.t(),
                    keys,
                    false,
                    T::one(),
                );
                matmul(
                    MatMut::contiguous(&mut projected_values, kp, dim_v),
                    f.t(),
                    values,
                    false,
                    T::one(),
                );
                let projected_keys = MatRef::contiguous(&projected_keys, kp, d);
                let projected_values = MatRef::contiguous(&projected_values, kp, dim_v);
                let mut d_keys = vec![T::zero(); kp * d];
                let mut d_values = vec![T::zero(); kp * dim_v];
                let mut probs = vec![T::zero(); TILE_QUERIES * kp];
                let mut d_probs = vec![T::zero(); TILE_QUERIES * kp];
                let mut sums = vec![T::zero(); TILE_QUERIES];
                for h in (0..problem.heads_q).filter(|&h| problem.kv_head(h) == g) {
                    for start in (0..problem.len_q).step_by(TILE_QUERIES) {
                        let rows = TILE_QUERIES.min(problem.len_q - start);
                        let queries = q.head(b, h).rows_range(start, rows);
                        let upstream = d_out.head(b, h).rows_range(start, rows);
                        let (p, dp) = (&mut probs[..rows * kp], &mut d_probs[..rows * kp]);
                        softmax_rows(
                            p,
                            dp,
                            &mut sums,
                            queries,
                            upstream,
                            projected_keys,
                            projected_values,
                            scale,
                        );
                        let ds = MatRef::contiguous(dp, rows, kp);
                        matmul(
                            MatMut::contiguous(&mut d_values, kp, dim_v),
                            MatRef::contiguous(p, rows, kp).t(),
                            upstream,
                            true,
                            T::one(),
                        );
                        // SAFETY: the q heads of kv head g belong to this task.
                        let dq_rows = unsafe { dq_heads.block(b, h, start, rows) };
                        matmul(dq_rows, ds, projected_keys, true, scale);
                        matmul(
                            MatMut::contiguous(&mut d_keys, kp, d),
                            ds.t(),
                            queries,
                            true,
                            scale,
                        );
                    }
                }
                let (d_keys, d_values) = (
                    MatRef::contiguous(&d_keys, kp, d),
                    MatRef::contiguous(&d_values, kp, dim_v),
                );
                // SAFETY: kv head g belongs to this task.
                let (dk_rows, dv_rows) =
                    unsafe { (dk_heads.block(b, g, 0, n), dv_heads.block(b, g, 0, n)) };
                matmul(dk_rows, e, d_keys, true, T::one());
                matmul(dv_rows, f, d_values, true, T::one());
                let (mut d_e, mut d_f) = zero();
                matmul(
                    MatMut::contiguous(&mut d_e, n, kp),
                    keys,
                    d_keys.t(),
                    false,
                    T::one(),
                );
                matmul(
                    MatMut::contiguous(&mut d_f, n, kp),
                    values,
                    d_values.t(),
                    false,
                    T::one(),
                );
                (d_e, d_f)
            })
            .reduce(zero, |(mut e1, mut f1), (e2, f2)| {
                e1.iter_mut().zip(&e2).for_each(|(a, &b)| *a += b);
                f1.iter_mut().zip(&f2).for_each(|(a, &b)| *a += b);
                (e1, f1)
            });
        let widen = |p: Vec<T>| -> Vec<f64> {
            let mut full: Vec<f64> = p.into_iter().map(T::as_f64).collect();
            full.resize(self.max_len * kp, 0.0);
            full
        };
        Ok(Some((widen(d_e), widen(d_f))))
    }

    fn flops(&self, problem: &Problem) -> f64 {
        let (kp, d, dv) = (self.k as f64, problem.dim_qk as f64, problem.dim_v as f64);
        let pairs = (problem.batch * problem.heads_kv) as f64;
        let tokens = (problem.batch * problem.heads_q * problem.len_q) as f64;
        2.0 * pairs * problem.len_k as f64 * kp * (d + dv) + 2.0 * tokens * kp * (d + dv)
    }

    fn reference(
        &self,
        problem: &Problem,
        q: &Tensor<f64>,
        k: &Tensor<f64>,
        v: &Tensor<f64>,
    ) -> Result<Tensor<f64>> {
        let (e, f) = self.projections()?;
        let scale = resolve_scale(self.scale, problem.dim_qk)?;
        super::reference::Rows::new(problem.out_shape())
            .fill(problem, 0..problem.heads_q, |b, h, i| {
                reference::linformer_row(q, k, v, &e, &f, self.k, scale, b, h, i)
            })
            .finish()
    }

    fn recurrent(&self, _heads_q: usize, _dim_qk: usize) -> Result<Recurrent> {
        Err(causal_unsupported())
    }

    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
}

/// For a block of queries: the probabilities P over the projected keys into `probs`,
/// and dS = P ∘ (dP − Δ) into `d_probs`, with dP = dO V'ᵀ and Δᵢ = Σⱼ Pᵢⱼ dPᵢⱼ.
#[allow(clippy::too_many_arguments)]
fn softmax_rows<T: Element>(
    probs: &mut [T],
    d_probs: &mut [T],
    sums: &mut [T],
    queries: MatRef<'_, T>,
    upstream: MatRef<'_, T>,
    keys: MatRef<'_, T>,
    values: MatRef<'_, T>,
    scale: T,
) {
    let (rows, kp) = (queries.rows, keys.rows);
    matmul(
        MatMut::contiguous(probs, rows, kp),
        queries,
        keys.t(),
        false,
        scale,
    );
    for (i, row) in probs.chunks_exact_mut(kp).enumerate() {
        let max = row.iter().copied().fold(T::neg_infinity(), T::max);
        row.iter_mut().for_each(|x| *x = (*x - max).exp());
        sums[i] = row.iter().copied().sum();
        let inv = T::one() / sums[i];
        row.iter_mut().for_each(|x| *x *= inv);
    }
    matmul(
        MatMut::contiguous(d_probs, rows, kp),
        upstream,
        values.t(),
        false,
        T::one(),
    );
    for (dp, p) in d_probs.chunks_exact_mut(kp).zip(probs.chunks_exact(kp)) {
        let delta: T = dp.iter().zip(p).map(|(&a, &b)| a * b).sum();
        dp.iter_mut()
            .zip(p)
            .for_each(|(ds, &p)| *ds = p * (*ds - delta));
    }
}

/// Linformer's projection matrices E and F, each `max_len × k` row-major, uniform in
/// ±1/√k as the reference implementation initialises them (E drawn first, then F, from
/// one generator).
///
/// ```
/// let (e, f) = linattn::linformer_projections(100, 16, 1);
/// assert_eq!((e.len(), f.len()), (1600, 1600));
/// assert!(e.iter().chain(&f).all(|x| x.abs() <= 0.25));
/// assert_ne!(e, f);
/// ```
pub fn linformer_projections(max_len: usize, k: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let bound = 1.0 / (k as f64).sqrt();
    let mut draw = || -> Vec<f64> {
        (0..max_len * k)
            .map(|_| rng.random_range(-bound..=bound))
            .collect()
    };
    let e = draw();
    let f = draw();
    (e, f)
}
