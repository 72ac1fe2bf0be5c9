use std::fmt;

/// Everything that can go wrong in linattn, as a value.
///
/// Every variant carries what a user needs to fix the call; none of them is a panic in
/// disguise.
///
/// ```
/// use linattn::{Attention, Error, Method, Tensor};
/// let q = Tensor::<f32>::zeros([1, 4, 2, 8]).unwrap();
/// let k = Tensor::<f32>::zeros([1, 5, 2, 8]).unwrap();
/// let v = Tensor::<f32>::zeros([1, 4, 2, 8]).unwrap();
/// let err = Attention::new(Method::linear()).forward(&q, &k, &v).unwrap_err();
/// assert!(matches!(err, Error::ShapeMismatch { .. }));
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Two tensors disagree on a dimension they must share.
    #[error("shape mismatch: {detail}")]
    ShapeMismatch {
        /// Which dimensions disagree, with their values.
        detail: String,
    },
    /// The query heads are not a multiple of the key/value heads (GQA/MQA needs that).
    #[error(
        "head mismatch: q has {q_heads} heads, k and v have {kv_heads}; q heads must be a multiple of k/v heads"
    )]
    HeadMismatch {
        /// Heads of q.
        q_heads: usize,
        /// Heads of k and v.
        kv_heads: usize,
    },
    /// A tensor has a zero-sized dimension.
    #[error(
        "{tensor} has a zero-sized dimension (shape {shape:?}); every dimension must be at least 1"
    )]
    Empty {
        /// Which tensor.
        tensor: &'static str,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// An input holds NaN or infinity.
    #[error("{tensor} holds a non-finite value {value} at index {index:?}")]
    NonFinite {
        /// Which tensor.
        tensor: &'static str,
        /// Index of the first non-finite element, in the tensor's own layout.
        index: Vec<usize>,
        /// The value found.
        value: f64,
    },
    /// The computation overflowed although every input was finite (scores too large for
    /// the precision, say).
    #[error(
        "{method} produced a non-finite {tensor} at index {index:?} from finite inputs; the inputs are too large for this precision"
    )]
    NonFiniteOutput {
        /// Method that overflowed.
        method: &'static str,
        /// Which result: "output", or a gradient ("dq", "dk", "dv").
        tensor: &'static str,
        /// Index of the first non-finite element.
        index: Vec<usize>,
    },
    /// A sequence is longer than the method allows (Linformer's fixed length).
    #[error("{method}: sequence of length {len} exceeds the maximum length {max_len}")]
    SequenceTooLong {
        /// The method with a length limit.
        method: &'static str,
        /// Length given.
        len: usize,
        /// Largest length allowed.
        max_len: usize,
    },
    /// The method has no causal form (Linformer, FNet).
    #[error("{method} has no causal form: {reason}")]
    CausalUnsupported {
        /// The method.
        method: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// The CUDA driver, NVRTC or a kernel launch failed (feature `cuda`).
    #[error("CUDA: {0}")]
    Cuda(String),

    /// The request is valid but this backend does not run it (say which and why).
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An input holds a value its method does not allow: a positive log decay, a step
    /// size β outside its range.
    #[error("{tensor} holds {value} at index {index:?}; {allowed}")]
    OutOfRange {
        /// Which tensor.
        tensor: &'static str,
        /// Index of the first such element, in the tensor's own layout.
        index: Vec<usize>,
        /// The value found.
        value: f64,
        /// What the method allows, in words.
        allowed: &'static str,
    },
    /// The method reads a per-token input the call did not give (the log decays g of
    /// `gla`, the step sizes β of the delta rule).
    #[error("{method} needs {input}; pass it in GateInputs to Attention::forward_gated")]
    MissingInput {
        /// The method.
        method: &'static str,
        /// The input, named as flash-linear-attention names it.
        input: &'static str,
    },
    /// Saved decoder state that cannot be restored: corrupt, truncated, or saved by a
    /// different method, precision or shape.
    #[error("cannot restore decoder state: {0}")]
    InvalidState(String),
    /// The request needs more memory than is available.
    #[error("{what} needs {} but only {} is available", ByteSize(*.needed_bytes), ByteSize(*.available_bytes))]
    OutOfMemory {
        /// What was to be allocated.
        what: String,
        /// Bytes it needs.
        needed_bytes: u128,
        /// Bytes available (the configured limit or the system's available memory).
        available_bytes: u128,
    },
}

/// Result with linattn's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Human-readable byte count (binary units), used in messages.
///
/// ```
/// assert_eq!(linattn::ByteSize(3 << 30).to_string(), "3.00 GiB");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ByteSize(pub u128);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.2} {}", UNITS[unit])
        }
    }
}
