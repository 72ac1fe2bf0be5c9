//! Measurements requested by the page: queued, run one at a time on a worker thread (so
//! that two never share the cores and spoil each other's times), observable while they
//! run, cancellable between cases, and cached by case so a repeated sweep is instant.

use super::MeasureRequest;
use crate::bench::{BenchMethod, exact_softmax, random_inputs, relative_error, too_slow};
use crate::gpu::{self, GpuDtype};
use crate::measure::measure;
use crate::report::{self, Case, Record};
use linattn::{Attention, Ceilings, Method, Tensor};
use serde::Serialize;
use std::cell::OnceCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// A case of a sweep beyond this many predicted seconds is skipped with the reason.
const MAX_SECONDS: f64 = 60.0;
/// The element type of the sweeps timed on the GPU.
const GPU_DTYPE: GpuDtype = GpuDtype::Bf16;
/// Finished jobs kept for their results; older ones are forgotten.
const KEPT_JOBS: usize = 64;

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Cancelled,
}

/// What the page polls: a job's state, progress and the records so far.
#[derive(Clone, Debug, Serialize)]
pub struct JobView {
    pub id: u64,
    pub state: JobState,
    /// Jobs ahead of this one in the queue.
    pub position: usize,
    pub done: usize,
    pub total: usize,
    /// The case being measured now.
    pub current: Option<String>,
    pub records: Vec<Record>,
}

struct Job {
    view: JobView,
    request: MeasureRequest,
    cancel: Arc<AtomicBool>,
}

/// The cache key of one measured case: everything that changes its result.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CaseKey {
    method: BenchMethod,
    seq: usize,
    request: String,
}

#[derive(Default)]
struct Shared {
    next_id: u64,
    jobs: HashMap<u64, Job>,
    queue: VecDeque<u64>,
    /// The job the worker is measuring.
    running: Option<u64>,
    finished: VecDeque<u64>,
    cache: HashMap<CaseKey, Record>,
}

/// The queue, its worker and the cache.
pub struct Jobs {
    shared: Mutex<Shared>,
    wake: Condvar,
    ceilings: Ceilings,
    /// With `--device cuda`: the GPU that times the cases (methods it cannot run yet are
    /// skipped with the reason).
    gpu: Option<gpu::Bench>,
    /// Held by whatever is timing: the worker's cases and the decoding panel's runs.
    measuring: Mutex<()>,
}

impl Jobs {
    /// Starts the worker thread; `ceilings` give every record its floor.
    pub fn start(ceilings: Ceilings, gpu: Option<gpu::Bench>) -> Arc<Self> {
        let jobs = Arc::new(Self {
            shared: Mutex::new(Shared::default()),
            wake: Condvar::new(),
            ceilings,
            gpu,
            measuring: Mutex::new(()),
        });
        let worker = Arc::clone(&jobs);
        std::thread::spawn(move || worker.work());
        jobs
    }

    /// The right to time something alone (no sweep case runs meanwhile).
    pub fn measuring(&self) -> MutexGuard<'_, ()> {
        self.measuring
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Queues a measurement and returns its view.
    pub fn submit(&self, request: MeasureRequest) -> JobView {
        let mut shared = self.lock();
        shared.next_id += 1;
        let id = shared.next_id;
        let view = JobView {
            id,
            state: JobState::Queued,
            position: shared.queue.len() + usize::from(shared.running.is_some()),
            done: 0,
            total: request.lengths().len() * request.methods.len(),
            current: None,
            records: Vec::new(),
        };
        shared.jobs.insert(
            id,
            Job {
                view: view.clone(),
                request,
                cancel: Arc::new(AtomicBool::new(false)),
            },
        );
        shared.queue.push_back(id);
        self.wake.notify_one();
        view
    }

    /// The job's view with growth exponents fitted over its records so far.
    pub fn view(&self, id: u64) -> Option<JobView> {
        let shared = self.lock();
        let job = shared.jobs.get(&id)?;
        let mut view = job.view.clone();
        if view.state == JobState::Queued {
            let ahead = shared.queue.iter().position(|&q| q == id).unwrap_or(0);
            view.position = ahead + usize::from(shared.running.is_some());
        }
        report::fit_exponents(&mut view.records);
        Some(view)
    }

    /// Asks the job to stop: at once if queued, after its current case if running.
    pub fn cancel(&self, id: u64) -> Option<JobView> {
        {
            let mut shared = self.lock();
            let job = shared.jobs.get_mut(&id)?;
            job.cancel.store(true, Ordering::Relaxed);
            if job.view.state == JobState::Queued {
                job.view.state = JobState::Cancelled;
                shared.queue.retain(|&q| q != id);
                Self::finish(&mut shared, id);
            }
        }
        self.view(id)
    }

    fn finish(shared: &mut Shared, id: u64) {
        shared.finished.push_back(id);
        while shared.finished.len() > KEPT_JOBS {
            if let Some(old) = shared.finished.pop_front() {
                shared.jobs.remove(&old);
            }
        }
    }

    fn work(&self) {
        loop {
            let (id, request, cancel) = {
                let mut shared = self.lock();
                let id = loop {
                    match shared.queue.pop_front() {
                        Some(id) => break id,
                        None => {
                            shared = self
                                .wake
                                .wait(shared)
                                .unwrap_or_else(|poison| poison.into_inner())
                        }
                    }
                };
                shared.running = Some(id);
                let job = shared.jobs.get_mut(&id).expect("queued jobs exist");
                job.view.state = JobState::Running;
                (id, job.request.clone(), Arc::clone(&job.cancel))
            };
            self.run(id, &request, &cancel);
            let mut shared = self.lock();
            shared.running = None;
            if let Some(job) = shared.jobs.get_mut(&id) {
                job.view.current = None;
                job.view.state = if cancel.load(Ordering::Relaxed) {
                    JobState::Cancelled
                } else {
                    JobState::Done
                };
            }
            Self::finish(&mut shared, id);
        }
    }

    /// Measures the job's cases in order of length, shortest first, so that each
    /// method's next length can be predicted (and skipped when too slow).
    fn run(&self, id: u64, request: &MeasureRequest, cancel: &AtomicBool) {
        let mut last_measured: HashMap<BenchMethod, (f64, f64)> = HashMap::new();
        let request_key = request.cache_key();
        for seq in request.lengths() {
            let inputs = match &request.uploaded {
                Some(uploaded) => uploaded.prefixes(seq),
                None => random_inputs::<f32>([1, seq, request.heads, request.dim]),
            };
            let exact = OnceCell::new();
            for &method in &request.methods {
                if cancel.load(Ordering::Relaxed) {
                    return;
                }
                let key = CaseKey {
                    method,
                    seq,
                    request: request_key.clone(),
                };
                let label = format!("{} at {seq} tokens", method.name());
                let cached = {
                    let mut shared = self.lock();
                    if let Some(job) = shared.jobs.get_mut(&id) {
                        job.view.current = Some(label);
                    }
                    shared.cache.get(&key).cloned()
                };
                let record = cached.unwrap_or_else(|| {
                    let _alone = self.measuring();
                    let record = self.measure_case(
                        request,
                        method,
                        seq,
                        &inputs,
                        &exact,
                        &mut last_measured,
                    );
                    // A skip predicted from the previous length depends on the sweep.
                    let predicted = record
                        .skipped
                        .as_deref()
                        .is_some_and(|r| r.starts_with("predicted"));
                    if !predicted {
                        self.lock().cache.insert(key, record.clone());
                    }
                    record
                });
                let mut shared = self.lock();
                if let Some(job) = shared.jobs.get_mut(&id) {
                    job.view.records.push(record);
                    job.view.done += 1;
                }
            }
        }
    }

    fn measure_case(
        &self,
        request: &MeasureRequest,
        method: BenchMethod,
        seq: usize,
        inputs: &linattn::Result<[Tensor<f32>; 3]>,
        exact: &OnceCell<Option<Tensor<f64>>>,
        last_measured: &mut HashMap<BenchMethod, (f64, f64)>,
    ) -> Record {
        let case = Case {
            method: method.name(),
            causal: request.causal,
            batch: request.uploaded.as_ref().map_or(1, |u| u.q.batch()),
            seq,
            heads: request.heads,
            dim: request.dim,
            dtype: match self.gpu {
                Some(_) => GPU_DTYPE.name(),
                None => "float32",
            },
        };
        let [q, k, v] = match inputs {
            Ok(inputs) => inputs,
            Err(error) => return Record::skipped(case, error.to_string()),
        };
        let attention = Attention::new(request.settings().method(method, seq, request.heads))
            .causal(request.causal);
        let cost = attention.cost(q.shape(), k.shape(), v.shape(), 4);
        let flops = cost.as_ref().map_or(0.0, |cost| cost.flops);
        if let Some(reason) = too_slow(last_measured.get(&method), flops, MAX_SECONDS) {
            return Record::skipped(case, reason);
        }
        let measured = match &self.gpu {
            Some(gpu) => gpu
                .measure(case.clone(), &attention, [q, k, v], GPU_DTYPE)
                .map_err(|error| error.to_string()),
            None => measure(&attention, q, k, v)
                .map(|measured| {
                    let floor = cost
                        .ok()
                        .map(|cost| Duration::from_secs_f64(cost.floor_seconds(&self.ceilings)));
                    let record = Record::measured(
                        case.clone(),
                        measured.median,
                        measured.runs,
                        measured.extra_bytes,
                        None,
                        floor,
                    );
                    (record, measured.output)
                })
                .map_err(|error| error.to_string()),
        };
        match measured {
            Ok((mut record, output)) => {
                if let Some(ms) = record.median_ms {
                    last_measured.insert(method, (flops, ms * 1e-3));
                }
                record.rel_err = exact
                    .get_or_init(|| {
                        let softmax = Attention::new(Method::softmax()).causal(request.causal);
                        exact_softmax(&softmax, q, k, v).and_then(Result::ok)
                    })
                    .as_ref()
                    .and_then(|exact| relative_error(&output, exact));
                record
            }
            Err(reason) => Record::skipped(case, reason),
        }
    }
}
