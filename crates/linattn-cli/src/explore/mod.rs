//! `linattn explore`: a local web page where every method is measured on this machine
//! while the sequence grows, beside its complexity in theory, its error against exact
//! softmax and its attention map.
//!
//! The page and its plotting library are inside the binary. The server listens on
//! loopback unless told otherwise, caps request sizes, answers malformed requests with
//! a JSON error and runs one measurement at a time (see [`jobs`]).

mod decoding;
mod guard;
mod jobs;
mod maps;
mod supervise;
mod uploads;
pub mod worker;

use crate::bench::MethodSettings;
use crate::error::CliError;
use crate::gates::Gate;
use crate::gpu::Device;
use crate::method_options::MethodName;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Args;
use jobs::Jobs;
use linattn::{ByteSize, Ceilings, DEFAULT_FEATURES};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// Longest sequence the page may ask for.
pub const MAX_SEQ: usize = 1 << 20;
/// Shortest.
const MIN_SEQ: usize = 16;
/// Largest request body: requests are small JSON documents.
const MAX_BODY: usize = 64 << 10;

/// Arguments of `linattn explore`.
#[derive(Debug, Args)]
pub struct ExploreArgs {
    /// Port to listen on (0 picks a free one)
    #[arg(long, default_value_t = 8765)]
    port: u16,
    /// Address to listen on; anything but loopback exposes the page to the network
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    host: IpAddr,
    /// Where the measurements run
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// Most memory the measurements may hold at once (a case over it is stopped), in
    /// bytes or with a unit (500M, 8G) [default: half of this machine's memory]
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    memory_budget: Option<u64>,
    /// Longest a case (or a decoding run) may take before it is stopped, in seconds
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0, value_parser = crate::bench::positive_seconds)]
    case_seconds: f64,
}

/// What the server allows one measurement.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Seconds a case may run.
    pub case_seconds: f64,
    /// Bytes a measuring process may hold.
    pub memory_budget: u64,
}

/// The default memory budget: this fraction of the machine's memory, so that a sweep
/// never takes the machine from its other programs.
const DEFAULT_BUDGET_FRACTION: f64 = 0.5;

/// `12345`, `500M`, `8G`, `1.5GiB` (units of 1024) as bytes (clap value parser).
fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale: u64 = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        other => return Err(format!("unknown unit {other:?}: use K, M, G or T")),
    };
    match number.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 1.0 => Ok((x * scale as f64) as u64),
        _ => Err(format!("{text:?} is not a number of bytes (at least 1)")),
    }
}

/// A sweep the page asks for: these methods at lengths min_seq, 2·min_seq, ... up to
/// max_seq, on random inputs of this shape.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasureRequest {
    pub methods: Vec<MethodName>,
    #[serde(default = "default_min_seq")]
    pub min_seq: usize,
    pub max_seq: usize,
    pub heads: usize,
    pub dim: usize,
    #[serde(default)]
    pub causal: bool,
    #[serde(default = "default_features")]
    pub features: usize,
    #[serde(default = "default_k_proj")]
    pub k_proj: usize,
    /// Keys each query sees on each side (window, hybrid); the right side is 0 when causal.
    #[serde(default = "default_window")]
    pub window: usize,
    /// gla, gated-delta-rule: random log decays per value head or per key channel (each
    /// method's own when left out: see [`Gate::of`]).
    #[serde(default)]
    pub gate: Option<Gate>,
    /// What to measure on: random inputs, or prefixes of the uploaded or the model's.
    #[serde(default)]
    pub inputs: InputSource,
    /// The uploaded or model tensors, attached when the request is accepted.
    #[serde(skip)]
    pub uploaded: Option<Arc<uploads::Uploaded>>,
}

/// Where q, k and v come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputSource {
    /// Standard normal, seeded.
    #[default]
    Random,
    /// The user's .npy files (`PUT /api/inputs/{q,k,v}`).
    Uploaded,
    /// A layer of all-MiniLM-L6-v2 on real text, bundled.
    Model,
}

impl InputSource {
    /// The tensors of this source, or why there are none.
    fn tensors(self, uploads: &uploads::Uploads) -> Result<Option<Arc<uploads::Uploaded>>, String> {
        match self {
            InputSource::Random => Ok(None),
            InputSource::Uploaded => uploads.complete().map(Some),
            InputSource::Model => Ok(Some(uploads::model_inputs())),
        }
    }
}

fn default_min_seq() -> usize {
    256
}
fn default_features() -> usize {
    DEFAULT_FEATURES
}
fn default_k_proj() -> usize {
    256
}
fn default_window() -> usize {
    256
}

impl MeasureRequest {
    /// Takes shape and lengths from the uploaded tensors when the request asks for them.
    fn attach(&mut self, uploads: &uploads::Uploads) -> Result<(), String> {
        let Some(uploaded) = self.inputs.tensors(uploads)? else {
            return Ok(());
        };
        let [_, seq, heads, dim] = uploaded.q.shape();
        self.heads = heads;
        self.dim = dim;
        self.max_seq = self.max_seq.min(seq);
        self.min_seq = self.min_seq.min(self.max_seq);
        self.uploaded = Some(uploaded);
        Ok(())
    }

    /// Checks every field against its bounds, and the memory the largest inputs need
    /// against the server's `budget`.
    fn validate(&self, budget: u64) -> Result<(), String> {
        no_duplicates(self.methods.iter().map(|m| m.name()))?;
        check_range("methods", self.methods.len(), 1, MethodName::all().len())?;
        check_range("heads", self.heads, 1, 64)?;
        check_range("dim", self.dim, 1, 256)?;
        let shortest = if self.uploaded.is_some() { 1 } else { MIN_SEQ };
        check_range("min_seq", self.min_seq, shortest, MAX_SEQ)?;
        check_range("max_seq", self.max_seq, self.min_seq, MAX_SEQ)?;
        check_range("features", self.features, 1, 4096)?;
        check_range("k_proj", self.k_proj, 1, 4096)?;
        check_range("window", self.window, 1, MAX_SEQ)?;
        let input_bytes = 3 * self.max_seq as u128 * self.heads as u128 * self.dim as u128 * 4;
        if input_bytes * 2 > budget as u128 {
            return Err(format!(
                "inputs of {} tokens x {} heads x {} dims need {} (and as much again for \
                 output and scratch), but the server's memory budget is {}",
                self.max_seq,
                self.heads,
                self.dim,
                ByteSize(input_bytes),
                ByteSize(budget as u128)
            ));
        }
        Ok(())
    }

    /// The method options this request stands for.
    pub fn settings(&self) -> MethodSettings {
        MethodSettings::symmetric(self.features, self.k_proj, self.window, self.causal)
    }

    /// The sequence lengths of the sweep, shortest first.
    pub fn lengths(&self) -> Vec<usize> {
        let mut lengths: Vec<usize> = std::iter::successors(Some(self.min_seq), |&n| Some(n * 2))
            .take_while(|&n| n <= self.max_seq)
            .collect();
        if lengths.last() != Some(&self.max_seq) {
            lengths.push(self.max_seq);
        }
        lengths
    }

    /// What besides method and length changes a case's result.
    pub fn cache_key(&self) -> String {
        let inputs = self
            .uploaded
            .as_ref()
            .map_or("random", |u| u.label.as_str());
        format!(
            "{inputs} heads {} dim {} causal {} features {} k_proj {} window {} gate {:?}",
            self.heads, self.dim, self.causal, self.features, self.k_proj, self.window, self.gate
        )
    }
}

/// Refuses a list of methods that names one twice.
fn no_duplicates<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
    let mut seen = Vec::new();
    for name in names {
        if seen.contains(&name) {
            return Err(format!("method {name} is listed twice"));
        }
        seen.push(name);
    }
    Ok(())
}

fn check_range(name: &str, value: usize, low: usize, high: usize) -> Result<(), String> {
    if (low..=high).contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "{name} must be between {low} and {high}, not {value}"
        ))
    }
}

/// A method (or a variant) as the page lists it, with its cost in theory: the
/// catalogue's entry.
#[derive(Serialize)]
struct MethodInfo {
    name: &'static str,
    time: &'static str,
    memory: &'static str,
    what: &'static str,
}

fn method_info(method: MethodName) -> MethodInfo {
    let (info, variant) = linattn::find_method(method.name()).expect("a catalogue name");
    match variant {
        None => MethodInfo {
            name: info.name,
            time: info.time,
            memory: info.memory,
            what: info.summary,
        },
        Some(variant) => MethodInfo {
            name: variant.name,
            time: info.time,
            memory: variant.memory,
            what: variant.summary,
        },
    }
}

struct App {
    /// Where the sweeps are timed, as the page shows it.
    device: String,
    jobs: Arc<Jobs>,
    ceilings: Ceilings,
    limits: ServerLimits,
    uploads: std::sync::Mutex<uploads::Uploads>,
}

impl App {
    fn uploads(&self) -> std::sync::MutexGuard<'_, uploads::Uploads> {
        self.uploads
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

type Shared = Arc<App>;

/// An error answer: a status and a JSON body `{"error": message}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.1 });
        (self.0, axum::Json(body)).into_response()
    }
}

/// A request body as it arrived, or why it could not be read (too large, say).
type Body = Result<Bytes, BytesRejection>;

/// The bytes of a body, or why they could not be read: past `limit` (the route's body
/// limit) a 413 that names `what` and the limit.
fn read_body(body: Body, what: &str, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("{what} over the limit of {}", ByteSize(limit as u128))
        } else {
            rejection.body_text()
        };
        ApiError(status, message)
    })
}

fn parse<T: for<'de> Deserialize<'de>>(body: Body) -> Result<T, ApiError> {
    let body = read_body(body, "request body", MAX_BODY)?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("malformed request: {e}")))
}

/// The routes of the page and its API, behind the guard that refuses requests from
/// other sites.
fn router(app: Shared, bound: SocketAddr) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript", APP_JS) }),
        )
        .route("/style.css", get(|| async { asset("text/css", STYLE_CSS) }))
        .route(
            "/vendor/uPlot.iife.min.js",
            get(|| async { asset("text/javascript", UPLOT_JS) }),
        )
        .route(
            "/vendor/uPlot.min.css",
            get(|| async { asset("text/css", UPLOT_CSS) }),
        )
        .route("/api/info", get(info))
        .route("/api/measure", axum::routing::post(submit))
        .route("/api/jobs/{id}", get(job).delete(cancel))
        .route("/api/maps", axum::routing::post(maps::maps))
        .route("/api/decode", axum::routing::post(decoding::decode))
        .route("/api/inputs", get(uploads::show).delete(uploads::clear))
        .route(
            "/api/inputs/{role}",
            axum::routing::put(uploads::put).layer(DefaultBodyLimit::max(uploads::MAX_UPLOAD)),
        )
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such page".into()) })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed here"),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            bound,
            guard::same_site_only,
        ))
        .with_state(app)
}

const INDEX_HTML: &str = include_str!("../../assets/index.html");
const APP_JS: &str = include_str!("../../assets/app.js");
const STYLE_CSS: &str = include_str!("../../assets/style.css");
const UPLOT_JS: &str = include_str!("../../assets/vendor/uplot-1.6.32/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../assets/vendor/uplot-1.6.32/uPlot.min.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn info(State(app): State<Shared>) -> Response {
    let methods: Vec<MethodInfo> = MethodName::all().into_iter().map(method_info).collect();
    axum::Json(serde_json::json!({
        "device": app.device,
        "threads": threads(),
        "memory_budget_bytes": app.limits.memory_budget,
        "case_seconds": app.limits.case_seconds,
        "max_queued": jobs::MAX_QUEUED,
        "max_seq": MAX_SEQ,
        "copy_bytes_per_s": app.ceilings.copy_bytes_per_second,
        "matmul_flops_per_s": app.ceilings.matmul_flops_per_second,
        "methods": methods,
    }))
    .into_response()
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

async fn submit(State(app): State<Shared>, body: Body) -> Result<Response, ApiError> {
    let mut request: MeasureRequest = parse(body)?;
    let invalid = |message| ApiError(StatusCode::UNPROCESSABLE_ENTITY, message);
    let attached = request.attach(&app.uploads());
    attached.map_err(invalid)?;
    request
        .validate(app.limits.memory_budget)
        .map_err(invalid)?;
    let view = app.jobs.submit(request).map_err(|jobs::QueueFull| {
        ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} sweeps are already waiting; cancel one or wait for them",
                jobs::MAX_QUEUED
            ),
        )
    })?;
    Ok((StatusCode::ACCEPTED, axum::Json(view)).into_response())
}

/// A job's id from the path, or a JSON 400 saying what is wrong with it.
type JobId = Result<Path<u64>, axum::extract::rejection::PathRejection>;

fn job_id(id: JobId) -> Result<u64, ApiError> {
    id.map(|Path(id)| id).map_err(|rejection| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("a job id is a number: {}", rejection.body_text()),
        )
    })
}

async fn job(State(app): State<Shared>, id: JobId) -> Result<Response, ApiError> {
    let id = job_id(id)?;
    let view = app
        .jobs
        .view(id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no job {id}")))?;
    Ok(axum::Json(view).into_response())
}

async fn cancel(State(app): State<Shared>, id: JobId) -> Result<Response, ApiError> {
    let id = job_id(id)?;
    let view = app
        .jobs
        .cancel(id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no job {id}")))?;
    Ok(axum::Json(view).into_response())
}

/// Runs `linattn explore` until interrupted.
pub fn explore(args: &ExploreArgs) -> Result<(), CliError> {
    // On the GPU the sweeps are timed there (bf16); maps and decoding stay on the CPU.
    let gpu = match args.device {
        Device::Cuda => {
            eprintln!("explore: opening the GPU ...");
            Some(crate::gpu::Bench::open()?)
        }
        Device::Cpu => None,
    };
    eprintln!("explore: measuring this machine's copy bandwidth and matmul rate ...");
    let ceilings = Ceilings::measure();
    let device = gpu
        .as_ref()
        .map_or("cpu".to_string(), |gpu| format!("cuda ({})", gpu.name()));
    let limits = ServerLimits {
        case_seconds: args.case_seconds,
        memory_budget: args
            .memory_budget
            .unwrap_or_else(|| (linattn::total_memory() as f64 * DEFAULT_BUDGET_FRACTION) as u64),
    };
    eprintln!(
        "explore: a case may take {} s and hold {} (--case-seconds, --memory-budget)",
        limits.case_seconds,
        ByteSize(limits.memory_budget as u128)
    );
    let app = Arc::new(App {
        device,
        jobs: Jobs::start(ceilings, limits, gpu),
        ceilings,
        limits,
        uploads: Default::default(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Usage(format!("cannot start the server: {e}")))?;
    runtime.block_on(async {
        let address = SocketAddr::new(args.host, args.port);
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| CliError::Usage(format!("cannot listen on {address}: {e}")))?;
        let bound = listener
            .local_addr()
            .map_err(|e| CliError::Usage(format!("cannot read the bound address: {e}")))?;
        if !args.host.is_loopback() {
            eprintln!("explore: listening on {bound}, reachable from the network");
        }
        println!("linattn explore: open http://{bound}/ (Ctrl-C stops)");
        axum::serve(listener, router(app, bound))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(|e| CliError::Usage(format!("the server stopped: {e}")))
    })
}
