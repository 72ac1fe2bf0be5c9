//! The bottom layer: element and tensor types, strided views, the vectorised loops over
//! slices, the problem description, errors and the memory policy. It imports nothing
//! else of the crate.

pub(crate) mod element;
pub(crate) mod error;
pub(crate) mod memory;
pub(crate) mod problem;
pub(crate) mod simd;
pub(crate) mod tensor;
pub(crate) mod view;

pub use element::Element;
pub use error::{ByteSize, Error, Result};
pub use problem::{CausalForm, DEFAULT_CHUNK};
pub(crate) use problem::{GatedShape, Problem, per_thread, task_list_bytes};
pub use tensor::Tensor;
pub(crate) use view::{MatMut, MatRef};
