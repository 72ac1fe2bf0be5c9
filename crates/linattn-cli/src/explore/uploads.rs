//! The user's own q, k and v (.npy, `[batch, seq, heads, head_dim]`, float32 or
//! float64): uploaded one at a time, then measured and mapped instead of random inputs.

use super::{ApiError, Body, Shared};
use crate::npy::{self, Elements};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use linattn::Tensor;
use serde::Serialize;
use std::sync::Arc;
use tempfile::TempPath;

/// Largest upload: one tensor of 64M float32 values.
pub const MAX_UPLOAD: usize = 256 << 20;

/// q, k and v from elsewhere than the random generator, with a label that changes on
/// every upload (so cached measurements of earlier inputs are not taken for these).
/// Shared by every request that uses them, never copied; freed (and their files
/// removed) when the last request using them ends after they were replaced or deleted.
#[derive(Debug)]
pub struct Uploaded {
    pub label: String,
    pub q: Arc<Tensor<f32>>,
    pub k: Arc<Tensor<f32>>,
    pub v: Arc<Tensor<f32>>,
    /// The same tensors as float32 .npy files, for the measuring child processes
    /// (`None` for the bundled model inputs, which they have themselves).
    pub files: Option<[Arc<TempPath>; 3]>,
}

impl Uploaded {
    /// The first `seq` positions of q, k and v.
    pub fn prefixes(&self, seq: usize) -> linattn::Result<[Tensor<f32>; 3]> {
        Ok([
            self.q.slice_seq(0..seq)?,
            self.k.slice_seq(0..seq)?,
            self.v.slice_seq(0..seq)?,
        ])
    }
}

/// One uploaded tensor, in memory and on disk.
struct Upload {
    tensor: Arc<Tensor<f32>>,
    file: Arc<TempPath>,
}

/// What has been uploaded so far.
#[derive(Default)]
pub struct Uploads {
    generation: u64,
    tensors: [Option<Upload>; 3],
}

const ROLES: [&str; 3] = ["q", "k", "v"];

impl Uploads {
    /// The three tensors, if all are here and fit together (sharing them, not copying).
    pub fn complete(&self) -> Result<Arc<Uploaded>, String> {
        self.problem()?;
        let [Some(q), Some(k), Some(v)] = &self.tensors else {
            unreachable!("problem() found all three")
        };
        Ok(Arc::new(Uploaded {
            label: format!("upload {}", self.generation),
            q: Arc::clone(&q.tensor),
            k: Arc::clone(&k.tensor),
            v: Arc::clone(&v.tensor),
            files: Some([&q.file, &k.file, &v.file].map(Arc::clone)),
        }))
    }

    /// Why the uploads cannot be used yet, if they cannot.
    fn problem(&self) -> Result<(), String> {
        let [Some(q), Some(k), Some(v)] = &self.tensors else {
            let missing: Vec<&str> = ROLES
                .iter()
                .zip(&self.tensors)
                .filter(|(_, t)| t.is_none())
                .map(|(role, _)| *role)
                .collect();
            return Err(format!("upload {} first", missing.join(", ")));
        };
        let [bq, tq, hq, dq] = q.tensor.shape();
        let [bk, tk, hk, dk] = k.tensor.shape();
        let [bv, tv, hv, _] = v.tensor.shape();
        let fits = bq == bk
            && bk == bv
            && tq == tk
            && tk == tv
            && hk == hv
            && hk > 0
            && hq % hk == 0
            && dq == dk;
        if !fits {
            return Err(format!(
                "q {:?}, k {:?} and v {:?} do not fit together: batch and length must agree, \
                 k and v share heads (a divisor of q's) and q and k share head_dim",
                q.tensor.shape(),
                k.tensor.shape(),
                v.tensor.shape()
            ));
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct UploadsView {
    q: Option<[usize; 4]>,
    k: Option<[usize; 4]>,
    v: Option<[usize; 4]>,
    ready: bool,
    problem: Option<String>,
}

fn view(uploads: &Uploads) -> Response {
    let shape = |i: usize| uploads.tensors[i].as_ref().map(|u| u.tensor.shape());
    let problem = uploads.problem();
    axum::Json(UploadsView {
        q: shape(0),
        k: shape(1),
        v: shape(2),
        ready: problem.is_ok(),
        problem: problem.err(),
    })
    .into_response()
}

pub async fn show(State(app): State<Shared>) -> Response {
    view(&app.uploads())
}

pub async fn clear(State(app): State<Shared>) -> Response {
    let mut uploads = app.uploads();
    uploads.tensors = [None, None, None];
    uploads.generation += 1;
    view(&uploads)
}

pub async fn put(
    State(app): State<Shared>,
    Path(role): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let slot = ROLES.iter().position(|r| *r == role).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("upload q, k or v, not {role}"),
        )
    })?;
    let bytes = super::read_body(body, &format!("{role}.npy"), MAX_UPLOAD)?;
    let name = format!("the uploaded {role}.npy");
    let invalid = |message: String| ApiError(StatusCode::UNPROCESSABLE_ENTITY, message);
    let array = npy::parse(&bytes, &name).map_err(|e| invalid(e.to_string()))?;
    let shape = array
        .dims::<4>("q, k and v", "4-D [batch, seq, heads, head_dim]")
        .map_err(|e| invalid(e.to_string()))?;
    let values = match array.elements {
        Elements::F32(values) => values,
        Elements::F64(values) => values.into_iter().map(|x| x as f32).collect(),
    };
    let tensor = Tensor::from_vec(values, shape).map_err(|e| invalid(e.to_string()))?;
    if let Some((index, value)) = tensor.first_non_finite() {
        return Err(invalid(format!("{name} holds {value} at {index:?}")));
    }
    let file = save(&tensor).map_err(|e| {
        ApiError(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("cannot save {name} for the measurements: {e}"),
        )
    })?;
    let upload = Upload {
        tensor: Arc::new(tensor),
        file: Arc::new(file),
    };
    let mut uploads = app.uploads();
    uploads.tensors[slot] = Some(upload);
    uploads.generation += 1;
    Ok(view(&uploads))
}

/// `tensor` as a float32 .npy file in the system's temporary directory, removed when
/// the returned path is dropped.
fn save(tensor: &Tensor<f32>) -> std::io::Result<TempPath> {
    let mut file = tempfile::Builder::new()
        .prefix("linattn-upload-")
        .suffix(".npy")
        .tempfile()?;
    npy::write_to(file.as_file_mut(), &tensor.shape(), tensor.as_slice())?;
    Ok(file.into_temp_path())
}

/// q, k and v of a real model on real text, inside the binary: see
/// `assets/minilm/PROVENANCE.md` and `bench/capture_minilm.py`.
pub fn model_inputs() -> Arc<Uploaded> {
    static INPUTS: std::sync::OnceLock<Arc<Uploaded>> = std::sync::OnceLock::new();
    let tensor = |bytes: &[u8], role: &str| {
        let array = npy::parse(bytes, role).expect("the bundled arrays are valid .npy");
        let shape = array.dims::<4>("q, k and v", "4-D").expect("4-D");
        let Elements::F32(values) = array.elements else {
            unreachable!("bundled as float32")
        };
        Tensor::from_vec(values, shape).expect("shape matches")
    };
    Arc::clone(INPUTS.get_or_init(|| {
        Arc::new(Uploaded {
            label: "all-MiniLM-L6-v2 layer 2".into(),
            q: Arc::new(tensor(include_bytes!("../../assets/minilm/q.npy"), "q.npy")),
            k: Arc::new(tensor(include_bytes!("../../assets/minilm/k.npy"), "k.npy")),
            v: Arc::new(tensor(include_bytes!("../../assets/minilm/v.npy"), "v.npy")),
            files: None,
        })
    }))
}
