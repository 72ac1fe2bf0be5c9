//! Measurements requested by the page: queued (a bounded queue), run one at a time on a
//! worker thread (so that two never share the cores and spoil each other's times),
//! observable while they run, and cached by case so a repeated sweep is instant.
//!
//! On the CPU each length of a sweep is measured by a child process (see [`worker`]),
//! watched by [`supervise`]: a cancel, a case past its time limit or a child over the
//! server's memory budget kills it at once. On the GPU the cases run in this process,
//! which holds the device; they are cancelled between cases.
//!
//! [`worker`]: super::worker
//! [`supervise`]: super::supervise

use super::supervise::{self, Ended};
use super::worker::{self, Event};
use super::{InputSource, MeasureRequest, ServerLimits};
use crate::bench::{exact_softmax, random_inputs, too_slow};
use crate::gates::Gate;
use crate::gpu::{self, GpuDtype};
use crate::method_options::MethodName;
use crate::report::{self, Case, Record};
use linattn::{Attention, ByteSize, Ceilings, Method};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// The element type of the sweeps timed on the GPU.
const GPU_DTYPE: GpuDtype = GpuDtype::Bf16;
/// Finished jobs kept for their results; older ones are forgotten.
const KEPT_JOBS: usize = 64;
/// Jobs that may wait behind the running one; past this a submission is refused.
pub const MAX_QUEUED: usize = 16;
/// A case runs its call once to warm up and then at least once timed, so it lasts about
/// twice one call at least.
const CALLS_PER_CASE: f64 = 2.0;

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
    /// What to measure, until the job ends (the uploaded inputs it holds are freed then).
    request: Option<MeasureRequest>,
    cancel: Arc<AtomicBool>,
}

/// The cache key of one measured case: everything that changes its result.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CaseKey {
    method: MethodName,
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
    limits: ServerLimits,
    /// With `--device cuda`: the GPU that times the cases (methods it cannot run yet are
    /// skipped with the reason).
    gpu: Option<gpu::Bench>,
    /// Held by whatever is timing: the worker's cases and the decoding panel's runs.
    measuring: Mutex<()>,
}

/// A submission refused because [`MAX_QUEUED`] jobs are waiting.
pub struct QueueFull;

/// Per method of a sweep: the flops and seconds of its last measured length.
type LastMeasured = HashMap<MethodName, (f64, f64)>;

impl Jobs {
    /// Starts the worker thread; `ceilings` give every record its floor.
    pub fn start(ceilings: Ceilings, limits: ServerLimits, gpu: Option<gpu::Bench>) -> Arc<Self> {
        let jobs = Arc::new(Self {
            shared: Mutex::new(Shared::default()),
            wake: Condvar::new(),
            ceilings,
            limits,
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

    /// Queues a measurement and returns its view, unless too many are waiting.
    pub fn submit(&self, request: MeasureRequest) -> Result<JobView, QueueFull> {
        let mut shared = self.lock();
        if shared.queue.len() >= MAX_QUEUED {
            return Err(QueueFull);
        }
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
                request: Some(request),
                cancel: Arc::new(AtomicBool::new(false)),
            },
        );
        shared.queue.push_back(id);
        self.wake.notify_one();
        Ok(view)
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

    /// Stops the job: at once if queued; if running, its child is killed within the
    /// supervisor's poll (on the GPU, after the current case).
    pub fn cancel(&self, id: u64) -> Option<JobView> {
        {
            let mut shared = self.lock();
            let job = shared.jobs.get_mut(&id)?;
            job.cancel.store(true, Ordering::Relaxed);
            if job.view.state == JobState::Queued {
                job.view.state = JobState::Cancelled;
                job.request = None;
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
                let (id, request) = loop {
                    match shared.queue.pop_front() {
                        Some(id) => {
                            let job = shared.jobs.get_mut(&id).expect("queued jobs exist");
                            let request = job.request.take().expect("queued jobs have one");
                            break (id, request);
                        }
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
                (id, request, Arc::clone(&job.cancel))
            };
            self.run(id, &request, &cancel);
            drop(request);
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
        let mut last_measured = LastMeasured::new();
        for seq in request.lengths() {
            if cancel.load(Ordering::Relaxed) {
                return;
            }
            let mut length = Length::new(self, id, request, seq);
            for (index, &method) in request.methods.iter().enumerate() {
                let cached = self.lock().cache.get(&length.key(method)).cloned();
                if let Some(record) = cached {
                    // A cached length predicts the next like a measured one.
                    if let Some(ms) = record.median_ms {
                        last_measured.insert(method, (length.flops(method), ms * 1e-3));
                    }
                    length.done(index, record, false);
                } else if let Some(reason) = self.too_slow(&length, method, &last_measured) {
                    length.done(index, Record::skipped(length.case(method), reason), false);
                }
            }
            let _alone = self.measuring();
            match &self.gpu {
                Some(gpu) => self.measure_on_gpu(gpu, &mut length, &mut last_measured, cancel),
                None => self.measure_in_children(&mut length, &mut last_measured, cancel),
            }
        }
    }

    /// Why `method` at this length should be skipped, if its predicted time is over the
    /// limit: from its last measured length when there is one, else from the least time
    /// its cost can take on this machine (CPU only; the GPU's floor is not measured here).
    fn too_slow(&self, length: &Length, method: MethodName, last: &LastMeasured) -> Option<String> {
        let limit = self.limits.case_seconds / CALLS_PER_CASE;
        let flops = length.flops(method);
        if let Some(reason) = too_slow(last.get(&method), flops, limit) {
            return Some(reason);
        }
        if last.contains_key(&method) || self.gpu.is_some() {
            return None;
        }
        let floor = length.cost(method)?.floor_seconds(&self.ceilings);
        (floor > limit).then(|| {
            format!(
                "predicted at least {floor:.0} s a call from its cost at this machine's \
                 ceilings, over the limit of {limit:.0} s"
            )
        })
    }

    /// Runs the length's pending cases in a child process; a child stopped in a case
    /// records why, and the cases after it go to a new child.
    fn measure_in_children(
        &self,
        length: &mut Length,
        last_measured: &mut LastMeasured,
        cancel: &AtomicBool,
    ) {
        let case_limit = Duration::from_secs_f64(self.limits.case_seconds);
        let limits = supervise::Limits {
            cancel,
            memory_budget: self.limits.memory_budget,
        };
        loop {
            let pending = length.pending();
            let Some(&first) = pending.first() else {
                return;
            };
            let cases = length.cases(&pending, self.limits.memory_budget);
            let input = serde_json::to_vec(&cases).expect("cases serialise");
            let mut running = first;
            let command = match std::env::current_exe() {
                Ok(exe) => {
                    let mut command = Command::new(exe);
                    command.arg("explore-worker");
                    command
                }
                Err(error) => {
                    let reason = format!("cannot find this program to measure with: {error}");
                    return length.skip_pending(&reason);
                }
            };
            let ended = supervise::run(command, &input, &limits, Some(case_limit), |line| {
                match serde_json::from_str::<Event>(line) {
                    Ok(Event::Start(method)) => {
                        running = method;
                        length.started(method);
                        Some(case_limit)
                    }
                    Ok(Event::Measured {
                        method,
                        median_s,
                        runs,
                        extra_bytes,
                        rel_err,
                    }) => {
                        let record = length.measured(method, median_s, runs, extra_bytes, rel_err);
                        last_measured.insert(method, (length.flops(method), median_s));
                        length.finished(method, record, true);
                        None
                    }
                    Ok(Event::Skipped { method, reason }) => {
                        length.finished(method, Record::skipped(length.case(method), reason), true);
                        None
                    }
                    Err(_) => None,
                }
            });
            let reason = match ended {
                Ended::Cancelled => return,
                Ended::Exited { success: true, .. } => {
                    return length.skip_pending("the measurement ended without a result");
                }
                Ended::Exited { stderr, .. } => format!("the measurement failed: {stderr}"),
                Ended::Failed(reason) => return length.skip_pending(&reason),
                Ended::TimedOut(limit) => {
                    // A lower bound of its time: longer lengths are predicted from it.
                    last_measured.insert(running, (length.flops(running), limit.as_secs_f64()));
                    format!(
                        "stopped after {} s, the time limit of a case",
                        limit.as_secs_f64()
                    )
                }
                Ended::OverBudget(held) => format!(
                    "stopped holding {}, over the server's memory budget of {}",
                    ByteSize(held as u128),
                    ByteSize(self.limits.memory_budget as u128)
                ),
            };
            if length.is_pending(running) {
                length.finished(running, Record::skipped(length.case(running), reason), true);
            }
        }
    }

    /// Runs the length's pending cases in this process, on the GPU.
    fn measure_on_gpu(
        &self,
        gpu: &gpu::Bench,
        length: &mut Length,
        last_measured: &mut LastMeasured,
        cancel: &AtomicBool,
    ) {
        let request = length.request;
        let inputs = match &request.uploaded {
            Some(uploaded) => uploaded.prefixes(length.seq),
            None => random_inputs::<f32>([1, length.seq, request.heads, request.dim]),
        };
        let [q, k, v] = match &inputs {
            Ok(inputs) => inputs,
            Err(error) => return length.skip_pending(&error.to_string()),
        };
        let mut exact = None;
        for method in length.pending() {
            if cancel.load(Ordering::Relaxed) {
                return;
            }
            length.started(method);
            let attention = length.attention(method);
            let shape = q.shape();
            let measured = attention
                .supports(shape, shape, shape, linattn::Device::Cuda)
                .map_err(crate::error::CliError::from)
                .and_then(|()| {
                    let call = (GPU_DTYPE, request.gate);
                    gpu.measure(length.case(method), &attention, [q, k, v], call)
                });
            let record = match measured {
                Ok((mut record, output)) => {
                    if let Some(ms) = record.median_ms {
                        last_measured.insert(method, (length.flops(method), ms * 1e-3));
                    }
                    let exact = exact.get_or_insert_with(|| {
                        let softmax = Attention::new(Method::softmax()).causal(request.causal);
                        exact_softmax(&softmax, q, k, v).and_then(Result::ok)
                    });
                    record.rel_err = exact.as_ref().and_then(|e| output.relative_error(e));
                    record
                }
                Err(error) => Record::skipped(length.case(method), error.to_string()),
            };
            length.finished(method, record, true);
        }
    }
}

/// One length of a running sweep: its cases' records, published to the job's view in
/// the order of the request's methods as they become known.
struct Length<'a> {
    jobs: &'a Jobs,
    id: u64,
    request: &'a MeasureRequest,
    seq: usize,
    request_key: String,
    records: Vec<Option<Record>>,
    /// Records before this index are in the view.
    published: usize,
}

impl<'a> Length<'a> {
    fn new(jobs: &'a Jobs, id: u64, request: &'a MeasureRequest, seq: usize) -> Self {
        Self {
            jobs,
            id,
            request,
            seq,
            request_key: request.cache_key(),
            records: vec![None; request.methods.len()],
            published: 0,
        }
    }

    fn key(&self, method: MethodName) -> CaseKey {
        CaseKey {
            method,
            seq: self.seq,
            request: self.request_key.clone(),
        }
    }

    fn index(&self, method: MethodName) -> usize {
        self.request
            .methods
            .iter()
            .position(|&m| m == method)
            .expect("the request's method")
    }

    fn is_pending(&self, method: MethodName) -> bool {
        self.records[self.index(method)].is_none()
    }

    /// The methods still to measure, in the request's order.
    fn pending(&self) -> Vec<MethodName> {
        self.request
            .methods
            .iter()
            .copied()
            .filter(|&m| self.is_pending(m))
            .collect()
    }

    fn case(&self, method: MethodName) -> Case {
        Case {
            method: method.name(),
            gate: Gate::of(method.info(), self.request.gate),
            causal: self.request.causal,
            batch: self.request.uploaded.as_ref().map_or(1, |u| u.q.batch()),
            seq: self.seq,
            heads: self.request.heads,
            dim: self.request.dim,
            dtype: match self.jobs.gpu {
                Some(_) => GPU_DTYPE.name(),
                None => "float32",
            },
        }
    }

    fn attention(&self, method: MethodName) -> Attention {
        let method =
            self.request
                .settings()
                .method(method, self.seq, self.request.dim, self.request.heads);
        Attention::new(method).causal(self.request.causal)
    }

    fn cost(&self, method: MethodName) -> Option<linattn::Cost> {
        let shape = [
            self.case(method).batch,
            self.seq,
            self.request.heads,
            self.request.dim,
        ];
        self.attention(method).cost(shape, shape, shape, 4).ok()
    }

    fn flops(&self, method: MethodName) -> f64 {
        self.cost(method).map_or(0.0, |cost| cost.flops)
    }

    /// The worker's request for `methods` at this length.
    fn cases(&self, methods: &[MethodName], memory_limit: u64) -> worker::Cases {
        let request = self.request;
        let inputs = match (request.inputs, &request.uploaded) {
            (InputSource::Model, _) => worker::Inputs::Model,
            (_, Some(uploaded)) => match &uploaded.files {
                Some(files) => worker::Inputs::Files(files.each_ref().map(|f| f.to_path_buf())),
                None => worker::Inputs::Model,
            },
            (_, None) => worker::Inputs::Random,
        };
        worker::Cases {
            methods: methods.to_vec(),
            seq: self.seq,
            heads: request.heads,
            dim: request.dim,
            causal: request.causal,
            features: request.features,
            k_proj: request.k_proj,
            window: request.window,
            gate: request.gate,
            inputs,
            memory_limit,
        }
    }

    /// A measured record, with its floor at the machine's ceilings.
    fn measured(
        &self,
        method: MethodName,
        median_s: f64,
        runs: usize,
        extra_bytes: usize,
        rel_err: Option<f64>,
    ) -> Record {
        let floor = self
            .cost(method)
            .map(|cost| Duration::from_secs_f64(cost.floor_seconds(&self.jobs.ceilings)));
        Record::measured(
            self.case(method),
            Duration::from_secs_f64(median_s),
            runs,
            extra_bytes,
            rel_err,
            floor,
        )
    }

    /// Shows `method` as the job's current case.
    fn started(&self, method: MethodName) {
        let mut shared = self.jobs.lock();
        if let Some(job) = shared.jobs.get_mut(&self.id) {
            job.view.current = Some(format!("{} at {} tokens", method.name(), self.seq));
        }
    }

    fn finished(&mut self, method: MethodName, record: Record, cache: bool) {
        self.done(self.index(method), record, cache);
    }

    /// Records the case at `index` (in the cache too when `cache`), and publishes every
    /// record now known in order.
    fn done(&mut self, index: usize, record: Record, cache: bool) {
        let mut shared = self.jobs.lock();
        if cache {
            shared
                .cache
                .insert(self.key(self.request.methods[index]), record.clone());
        }
        self.records[index] = Some(record);
        let Some(job) = shared.jobs.get_mut(&self.id) else {
            return;
        };
        while let Some(Some(record)) = self.records.get(self.published) {
            job.view.records.push(record.clone());
            job.view.done += 1;
            self.published += 1;
        }
    }

    /// Skips every pending case with `reason` (not cached: it says nothing of the case).
    fn skip_pending(&mut self, reason: &str) {
        for method in self.pending() {
            let record = Record::skipped(self.case(method), reason.to_string());
            self.finished(method, record, false);
        }
    }
}
