//! Performer (Choromanski et al., 2021), FAVOR+: m positive orthogonal random features
//! whose inner products estimate the softmax kernel without bias. The feature map is
//! performer-pytorch's `softmax_kernel` (see [`orthogonal_random_features`] for ω):
//! x' = x·d^(−1/4), φ(x) = m^(−1/2)·(exp(ω·x' − |x'|²/2 − c) + 1e-4), normalised like
//! linear attention without its 1e-6.
//!
//! The stabiliser c of a query is its own max of ω·x'. For keys, performer-pytorch takes
//! the max over all keys of the head; the non-causal form here gives exactly that. A
//! causal query may not depend on later keys, so there c is the max over the keys up to
//! the query — the value a decoder's running state can know.
//!
//! [`orthogonal_random_features`]: crate::orthogonal_random_features

pub(crate) mod reference;

use super::info::{Forms, MethodInfo, OptionInfo};
use super::linear::{chunk_option, validate_chunk};
use super::method::{AttentionMethod, Recurrent, reads_in_blocks};
use super::options::MethodOptions;
use crate::base::{DEFAULT_CHUNK, Element, Error, Problem, Result, Tensor};
use crate::engine::feature_map::{Favor, KernelMap, orthogonal_random_features};
use crate::engine::{self as engine, Kernel, Normalizer, StateUpdate};
use std::sync::Arc;

pub(crate) const INFO: MethodInfo = MethodInfo {
    name: "performer",
    summary: "FAVOR+: m positive orthogonal random features (performer-pytorch's softmax_kernel)",
    time: "O(n m d)",
    memory: "O(m d) per head",
    options: &[
        OptionInfo {
            name: "features",
            default: "256",
            what: "number of random features m",
        },
        OptionInfo {
            name: "seed",
            default: "0",
            what: "seed of the draw of ω",
        },
        OptionInfo {
            name: "omega",
            default: "drawn",
            what: "ω given: a [features, head_dim] matrix",
        },
        OptionInfo {
            name: "chunk",
            default: "64",
            what: "tokens per chunk of the causal form",
        },
    ],
    cpu: Forms {
        full: true,
        causal: true,
        recurrent: true,
    },
    cuda: Forms {
        full: true,
        causal: false,
        recurrent: false,
    },
    layout: super::info::HeadLayout::SharedKeysValues,
    token_inputs: &[],
    weights: true,
    variants: &[],
    parameters: &[],
    examples: &[
        &[("features", "16"), ("seed", "9")],
        &[("chunk", "8"), ("features", "40"), ("seed", "3")],
    ],
};

/// Where Performer's projection ω comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum RandomFeatures {
    /// Drawn with [`orthogonal_random_features`](crate::orthogonal_random_features).
    Drawn {
        /// Number of features m.
        features: usize,
        /// Seed of the draw; a new seed is a feature redraw.
        seed: u64,
    },
    /// Supplied by the user, `features × head_dim` row-major (performer-pytorch's
    /// `projection_matrix`).
    Given {
        /// Number of features m (rows of ω).
        features: usize,
        /// ω itself.
        omega: Arc<[f64]>,
    },
}

/// Options of Performer attention.
///
/// ```
/// use linattn::{Attention, Method, Performer, Tensor};
/// let x = Tensor::<f32>::randn([1, 64, 2, 16], 0).unwrap();
/// let out = Attention::new(Method::Performer(Performer::new(32, 1))).forward(&x, &x, &x).unwrap();
/// assert_eq!(out.shape(), x.shape());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Performer {
    /// The projection ω.
    pub features: RandomFeatures,
    /// Tokens per chunk of the causal form.
    pub chunk: usize,
}

/// Number of random features unless chosen otherwise.
pub const DEFAULT_FEATURES: usize = 256;

impl Default for Performer {
    fn default() -> Self {
        Self::new(DEFAULT_FEATURES, 0)
    }
}

impl Performer {
    /// `features` random features drawn from `seed`.
    pub fn new(features: usize, seed: u64) -> Self {
        Self {
            features: RandomFeatures::Drawn { features, seed },
            chunk: DEFAULT_CHUNK,
        }
    }

    /// A given projection ω, `features × head_dim` row-major.
    ///
    /// ```
    /// use linattn::{Attention, Method, Performer, Tensor};
    /// let omega = linattn::orthogonal_random_features(16, 8, 3);
    /// let x = Tensor::<f64>::randn([1, 5, 1, 8], 0).unwrap();
    /// let given = Attention::new(Method::Performer(Performer::with_omega(omega, 16)));
    /// let drawn = Attention::new(Method::Performer(Performer::new(16, 3)));
    /// assert_eq!(given.forward(&x, &x, &x).unwrap(), drawn.forward(&x, &x, &x).unwrap());
    /// ```
    pub fn with_omega(omega: Vec<f64>, features: usize) -> Self {
        Self {
            features: RandomFeatures::Given {
                features,
                omega: omega.into(),
            },
            chunk: DEFAULT_CHUNK,
        }
    }

    /// Performer as options give it (performer, hybrid's performer heads): ω given as
    /// a `[features, head_dim]` matrix, or drawn with `--features` and `--seed`.
    pub(crate) fn from_options(options: &MethodOptions) -> Result<Performer> {
        let chunk = chunk_option(options)?;
        let Some((omega, [features, dim])) = options.matrix("omega") else {
            return Ok(Performer {
                chunk,
                ..Performer::new(
                    options
                        .parse("features", "a number of features")?
                        .unwrap_or(DEFAULT_FEATURES),
                    options.parse("seed", "a whole number")?.unwrap_or(0),
                )
            });
        };
        if *dim != options.head_dim {
            return Err(Error::InvalidConfig(format!(
                "omega has shape [{features}, {dim}], but q's head_dim is {}; omega must be \
                 [features, head_dim]",
                options.head_dim
            )));
        }
        Ok(Performer {
            chunk,
            ..Performer::with_omega(omega.clone(), *features)
        })
    }

    /// Number of random features m.
    pub fn num_features(&self) -> usize {
        match &self.features {
            RandomFeatures::Drawn { features, .. } | RandomFeatures::Given { features, .. } => {
                *features
            }
        }
    }

    /// ω for heads of size `dim`, `m × dim` row-major.
    pub fn omega(&self, dim: usize) -> Result<Vec<f64>> {
        match &self.features {
            RandomFeatures::Drawn { features, seed } => {
                Ok(orthogonal_random_features(*features, dim, *seed))
            }
            RandomFeatures::Given { features, omega } => {
                if omega.len() != features * dim {
                    return Err(Error::ShapeMismatch {
                        detail: format!(
                            "performer omega has {} elements; {features} features × head_dim {dim} needs {}",
                            omega.len(),
                            features * dim
                        ),
                    });
                }
                if let Some(bad) = omega.iter().position(|x| !x.is_finite()) {
                    return Err(Error::NonFinite {
                        tensor: "omega",
                        index: vec![bad / dim, bad % dim],
                        value: omega[bad],
                    });
                }
                Ok(omega.to_vec())
            }
        }
    }

    /// ω in f64 and in the element type, and while it is drawn, one d × d block.
    fn omega_bytes(&self, dim: usize, element: usize) -> u128 {
        let dim = dim as u128;
        let omega = self.num_features() as u128 * dim * (element as u128 + 8);
        let block = match self.features {
            RandomFeatures::Drawn { .. } => dim * dim * 8,
            RandomFeatures::Given { .. } => 0,
        };
        omega + block
    }

    pub(crate) fn build_kernel<T: Element>(&self, problem: &Problem) -> Result<Kernel<T>> {
        Ok(Kernel {
            map: KernelMap::Favor(Favor {
                omega: self
                    .omega(problem.dim_qk)?
                    .into_iter()
                    .map(T::of_f64)
                    .collect(),
                features: self.num_features(),
                dim: problem.dim_qk,
            }),
            update: StateUpdate::Sum,
            normalizer: Normalizer::Exact,
            chunk: self.chunk,
        })
    }
}

impl AttentionMethod for Performer {
    fn validate(&self, problem: &Problem) -> Result<()> {
        validate_chunk(self.chunk)?;
        if self.num_features() == 0 {
            return Err(Error::InvalidConfig(
                "performer needs at least one random feature".into(),
            ));
        }
        if let RandomFeatures::Given { .. } = self.features {
            self.omega(problem.dim_qk)?;
        }
        Ok(())
    }

    fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        let omega = self.omega_bytes(problem.dim_qk, element);
        omega
            + engine::workspace_bytes(
                problem,
                self.num_features(),
                problem.dim_qk,
                self.chunk,
                element,
            )
    }

    fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        let omega = self.omega_bytes(problem.dim_qk, element);
        omega
            + engine::backward_workspace_bytes(
                problem,
                self.num_features(),
                problem.dim_qk,
                self.chunk,
                element,
            )
    }

    fn checks_while_reading(&self, problem: &Problem) -> bool {
        reads_in_blocks(problem)
    }

    fn flops(&self, problem: &Problem) -> f64 {
        engine::flops(problem, self.num_features(), problem.dim_qk)
    }

    fn reference(
        &self,
        problem: &Problem,
        q: &Tensor<f64>,
        k: &Tensor<f64>,
        v: &Tensor<f64>,
    ) -> Result<Tensor<f64>> {
        let omega = self.omega(problem.dim_qk)?;
        super::reference::Rows::new(problem.out_shape())
            .fill(problem, 0..problem.heads_q, |b, h, i| {
                reference::performer_row(q, k, v, &omega, b, h, i, problem.causal)
            })
            .finish()
    }

    fn recurrent(&self, _heads_q: usize, _dim_qk: usize) -> Result<Recurrent> {
        Ok(Recurrent {
            exact_heads: 0,
            scale: 1.0,
            capacity: None,
            state_features: Some(self.num_features()),
            max_len: None,
        })
    }

    fn kernel<T: Element>(&self, problem: &Problem) -> Result<Option<Kernel<T>>> {
        self.build_kernel(problem).map(Some)
    }

    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
}
