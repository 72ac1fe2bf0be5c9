//! # linattn
//!
//! Linear attention and the exact attention it is measured against.
//!
//! Softmax attention forms the n × n score matrix. Replace the softmax similarity by a
//! kernel with an explicit feature map φ and the product reassociates:
//! `O = φ(Q) (φ(K)ᵀ V)` — a small state instead of an n × n matrix. Every method here is
//! one answer to "what is φ, or how else do you shrink n":
//!
//! | method | what it is |
//! |---|---|
//! | [`Softmax`] | exact, naive or tiled (FlashAttention's online softmax) |
//! | [`Window`] | exact softmax over a sliding window |
//! | [`Linear`] | Linear Transformer, φ = elu + 1 |
//! | [`Performer`] | FAVOR+ positive orthogonal random features |
//! | [`Cosformer`] | ReLU features, cosine reweighting by position |
//! | [`Linformer`] | softmax over keys/values projected along the sequence |
//! | [`Fnet`] | token mixing by the real part of a 2-D DFT |
//! | [`Hybrid`] | window heads beside linear global heads |
//!
//! Tensors are `[batch, seq, heads, head_dim]` (FlashAttention's layout); k and v may
//! have fewer heads than q (GQA/MQA). Every fast path is tested against the f64
//! definitions in [`reference`](mod@reference).
//!
//! ```
//! use linattn::{Attention, Method, Performer, Tensor};
//! let q = Tensor::<f32>::randn([1, 256, 4, 32], 0)?;
//! let k = Tensor::<f32>::randn([1, 256, 4, 32], 1)?;
//! let v = Tensor::<f32>::randn([1, 256, 4, 32], 2)?;
//! let exact = Attention::new(Method::softmax()).forward(&q, &k, &v)?;
//! let approx = Attention::new(Method::Performer(Performer::new(256, 0))).forward(&q, &k, &v)?;
//! assert_eq!(exact.shape(), approx.shape());
//! # Ok::<(), linattn::Error>(())
//! ```

mod api;
mod backend;
mod base;
mod engine;
mod methods;
/// The CUDA backend: the GPU, its tensors and decoder (feature `cuda`).
#[cfg(feature = "cuda")]
pub mod cuda {
    pub use crate::api::cuda::{GpuDecoder, GpuPlan};
    pub use crate::api::cuda_gated::{GpuGateInputs, GpuGatedDecoder, GpuGatedOutput};
    pub use crate::backend::cuda::*;
}

pub use api::attention::{Attention, Gradients};
pub use api::cost::{Ceilings, Cost};
pub use api::decode::{Decoder, DecoderMemory, GatedDecoder};
pub use api::device::DeviceTensor;
pub use api::plan::Plan;
pub use api::reference;
pub use base::memory::available_bytes as available_memory;
pub use base::memory::total_bytes as total_memory;
pub use base::{ByteSize, CausalForm, DEFAULT_CHUNK, Element, Error, Result, Tensor};
pub use engine::feature_map::orthogonal_random_features;
pub use methods::{
    Cosformer, DEFAULT_FEATURES, DeltaRule, Device, Fnet, Forms, GateInputs, GatedDeltaRule,
    GatedGradients, GatedOutput, Gla, GlobalHeads, HeadLayout, Hybrid, Linear, Linformer, Method,
    MethodInfo, MethodOptions, OptionInfo, Performer, Projections, RandomFeatures, RawGate,
    RawGateGradients, Retention, Softmax, SoftmaxAlgorithm, TokenInput, Variant, Window, catalogue,
    find_method, linformer_projections,
};
