//! Attention maps: the weight each query gives each key, for exact softmax and each
//! approximation on the same small input. Every method here is linear in v, so its map
//! is its output on v = the identity (one value dimension per key).

use super::uploads::Uploaded;
use super::{ApiError, Body, InputSource, Shared, check_range};
use crate::bench::MethodSettings;
use crate::method_options::MethodName;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use linattn::{Attention, Tensor};
use serde::{Deserialize, Serialize};

/// Longest sequence whose map the page may ask for (the maps are seq x seq).
const MAX_MAP_SEQ: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapsRequest {
    methods: Vec<MethodName>,
    seq: usize,
    dim: usize,
    #[serde(default)]
    causal: bool,
    #[serde(default = "default_features")]
    features: usize,
    #[serde(default = "default_k_proj")]
    k_proj: usize,
    #[serde(default = "default_window")]
    window: usize,
    #[serde(default)]
    seed: u64,
    /// Random inputs, or head 0 of the uploaded or the model's q and k (their first `seq`
    /// tokens of batch 0).
    #[serde(default)]
    inputs: InputSource,
}

fn default_features() -> usize {
    linattn::DEFAULT_FEATURES
}
fn default_k_proj() -> usize {
    32
}
fn default_window() -> usize {
    16
}

#[derive(Serialize)]
struct MethodMap {
    method: &'static str,
    /// Row i is query i's weights over the keys; absent when the method has none.
    weights: Option<Vec<Vec<f32>>>,
    /// ‖A − A_exact‖ / ‖A_exact‖.
    rel_err: Option<f64>,
    note: Option<String>,
}

pub async fn maps(State(app): State<Shared>, body: Body) -> Result<Response, ApiError> {
    let request: MapsRequest = super::parse(body)?;
    let invalid = |m: String| ApiError(StatusCode::UNPROCESSABLE_ENTITY, m);
    let uploaded = request.inputs.tensors(&app.uploads()).map_err(invalid)?;
    check_range("seq", request.seq, 2, MAX_MAP_SEQ).map_err(invalid)?;
    check_range("dim", request.dim, 1, 256).map_err(invalid)?;
    check_range("methods", request.methods.len(), 1, 9).map_err(invalid)?;
    super::no_duplicates(request.methods.iter().map(|m| m.name())).map_err(invalid)?;
    check_range("features", request.features, 1, 4096).map_err(invalid)?;
    check_range("window", request.window, 1, MAX_MAP_SEQ).map_err(invalid)?;
    check_range("k_proj", request.k_proj, 1, 4096).map_err(invalid)?;
    // Alone on the cores, like every measurement: a map computed beside a timed case
    // would slow it.
    let response = tokio::task::spawn_blocking(move || {
        let _alone = app.jobs.measuring();
        compute(&request, uploaded.as_deref())
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(axum::Json(response).into_response())
}

#[derive(Serialize)]
struct MapsResponse {
    seq: usize,
    exact: Vec<Vec<f32>>,
    maps: Vec<MethodMap>,
}

fn compute(request: &MapsRequest, uploaded: Option<&Uploaded>) -> Result<MapsResponse, ApiError> {
    let internal = |e: linattn::Error| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string());
    let (q, k) = match uploaded {
        Some(u) => {
            let n = request.seq.min(u.q.seq_len());
            (first_head(&u.q, n), first_head(&u.k, n))
        }
        None => (
            Tensor::<f32>::randn([1, request.seq, 1, request.dim], request.seed * 2 + 1)
                .map_err(internal)?,
            Tensor::<f32>::randn([1, request.seq, 1, request.dim], request.seed * 2 + 2)
                .map_err(internal)?,
        ),
    };
    let n = q.seq_len();
    let mut eye = vec![0.0f32; n * n];
    (0..n).for_each(|i| eye[i * n + i] = 1.0);
    let identity = Tensor::from_vec(eye, [1, n, 1, n]).map_err(internal)?;
    let settings = MethodSettings::symmetric(
        request.features,
        request.k_proj.min(n),
        request.window,
        request.causal,
    );
    let map_of = |method: MethodName| -> linattn::Result<Vec<Vec<f32>>> {
        let attention = Attention::new(settings.method(method, n, q.head_dim(), 1));
        let attention = attention.causal(request.causal);
        let out = attention.forward(&q, &k, &identity)?;
        Ok(out.as_slice().chunks(n).map(<[f32]>::to_vec).collect())
    };
    let softmax = "softmax"
        .parse()
        .expect("exact softmax is in the catalogue");
    let exact = map_of(softmax).map_err(internal)?;
    let maps = request
        .methods
        .iter()
        .map(|&method| {
            if !method.info().weights {
                return MethodMap {
                    method: method.name(),
                    weights: None,
                    rel_err: None,
                    note: Some(format!(
                        "{} has no per-head attention weights: {}",
                        method.name(),
                        method.info().summary
                    )),
                };
            }
            match map_of(method) {
                Ok(weights) => MethodMap {
                    method: method.name(),
                    rel_err: Some(map_error(&weights, &exact)),
                    weights: Some(weights),
                    note: None,
                },
                Err(error) => MethodMap {
                    method: method.name(),
                    weights: None,
                    rel_err: None,
                    note: Some(error.to_string()),
                },
            }
        })
        .collect();
    Ok(MapsResponse {
        seq: n,
        exact,
        maps,
    })
}

/// Tokens `0..n` of head 0 in batch 0, as a one-head tensor.
fn first_head(x: &Tensor<f32>, n: usize) -> Tensor<f32> {
    let [_, _, heads, dim] = x.shape();
    let rows = (0..n).flat_map(|t| x.as_slice()[t * heads * dim..][..dim].iter().copied());
    Tensor::from_vec(rows.collect(), [1, n, 1, dim]).expect("n rows of dim")
}

fn map_error(weights: &[Vec<f32>], exact: &[Vec<f32>]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (row, exact_row) in weights.iter().zip(exact) {
        for (&a, &b) in row.iter().zip(exact_row) {
            diff += (a as f64 - b as f64).powi(2);
            norm += (b as f64).powi(2);
        }
    }
    (diff / norm).sqrt()
}
