//! The device: opening a GPU, its stream and memory pool, timing, launches, and the
//! kernel modules NVRTC compiles for it (cached per GPU, compiled at first use).

use super::ptx_cache;
use super::tiles;
use crate::base::{Error, Result};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg, SyncOnDrop, ValidAsZeroBits,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// The kernel sources (CUDA C++), each after the helpers they share; the tile constants
/// go before them all ([`tiles::prelude`]).
const LINEAR_SOURCE: &str = concat!(
    include_str!("common.cuh"),
    include_str!("linear.cu"),
    include_str!("linear_mma.cu"),
    include_str!("linear_entry.cu")
);
const LINEAR_BACKWARD_SOURCE: &str = concat!(
    include_str!("common.cuh"),
    include_str!("linear.cu"),
    include_str!("linear_mma.cu"),
    include_str!("linear_entry.cu"),
    include_str!("linear_backward.cu")
);
const PERFORMER_SOURCE: &str = concat!(
    include_str!("common.cuh"),
    include_str!("linear.cu"),
    include_str!("performer.cu")
);
const SOFTMAX_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("softmax.cu"));
const GATED_SOURCE: &str = concat!(
    include_str!("common.cuh"),
    include_str!("gated.cu"),
    include_str!("gated_mma.cu")
);

pub(super) fn cuda_error(what: &str, error: impl std::fmt::Display) -> Error {
    Error::Cuda(format!("{what}: {error}"))
}

pub(super) fn allocation_error<T>(count: usize, error: impl std::fmt::Display) -> Error {
    let bytes = crate::ByteSize((count * size_of::<T>()) as u128);
    cuda_error(&format!("allocating {bytes} on the GPU"), error)
}

/// Lets the device's stream-ordered memory pool keep what is freed for the next
/// allocation, as a caching allocator does. By default the pool hands it back to the
/// driver at every synchronisation, and mapping a call's buffers again (the output, the
/// causal form's segment sums) took longer than the kernels of a call.
fn keep_freed_memory_pooled(context: &CudaContext) -> Result<()> {
    use cudarc::driver::sys;
    let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
    let mut threshold = u64::MAX;
    // SAFETY: the device handle is the open context's; the attribute takes a u64.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), context.cu_device())
            .result()
            .and_then(|()| {
                sys::cuMemPoolSetAttribute(
                    pool.assume_init(),
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                )
                .result()
            })
    }
    .map_err(|e| cuda_error("configuring the GPU's memory pool", e))
}

/// One GPU: its context, the stream every call runs on, and the kernels compiled for it.
pub struct Gpu {
    /// This GPU itself, for the tensors made on it to hold.
    me: Weak<Gpu>,
    context: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    /// Compiled sources, by file name.
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Kernels loaded so far, their shared-memory limit already raised.
    kernels: Mutex<HashMap<String, CudaFunction>>,
    pub(super) processors: usize,
    shared_limit: usize,
}

impl Gpu {
    /// Opens GPU `ordinal` (0 is the first). Tensors made on it keep it open.
    ///
    /// ```no_run
    /// let gpu = linattn::cuda::Gpu::open(0)?;
    /// println!("{}", gpu.name());
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        // SAFETY: only tries to load the libraries, as opening them below would.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "no CUDA driver found (libcuda.so): is there an NVIDIA GPU and its driver?".into(),
            ));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "NVRTC not found (libnvrtc.so): install the CUDA toolkit's runtime compiler".into(),
            ));
        }
        let context = CudaContext::new(ordinal).map_err(|e| cuda_error("opening the GPU", e))?;
        if context.has_async_alloc() {
            keep_freed_memory_pooled(&context)?;
        }
        let stream = context.default_stream();
        let attribute = |attribute, what: &str| {
            context
                .attribute(attribute)
                .map(|value| value as usize)
                .map_err(|e| cuda_error(&format!("reading the {what}"), e))
        };
        use cudarc::driver::sys::CUdevice_attribute as Attribute;
        let processors = attribute(
            Attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            "multiprocessor count",
        )?;
        let shared_limit = attribute(
            Attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "shared-memory limit",
        )?;
        Ok(Arc::new_cyclic(|me| Self {
            me: me.clone(),
            context,
            stream,
            modules: Mutex::new(HashMap::new()),
            kernels: Mutex::new(HashMap::new()),
            processors,
            shared_limit,
        }))
    }

    /// A handle on this GPU, for a tensor made on it.
    pub(crate) fn handle(&self) -> Arc<Gpu> {
        self.me
            .upgrade()
            .expect("a Gpu is only reachable through the Arc that open returned")
    }

    /// The device's name, as the driver reports it.
    ///
    /// ```no_run
    /// assert!(linattn::cuda::Gpu::open(0)?.name().contains("NVIDIA"));
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn name(&self) -> String {
        self.context.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    /// The device's ordinal, as [`Gpu::open`] took it: handles opened on one device
    /// share its memory.
    ///
    /// ```no_run
    /// assert_eq!(linattn::cuda::Gpu::open(0)?.ordinal(), 0);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn ordinal(&self) -> usize {
        self.context.ordinal()
    }

    /// Waits until every call issued so far has finished.
    ///
    /// ```no_run
    /// linattn::cuda::Gpu::open(0)?.synchronize()?;
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_error("synchronizing", e))
    }

    /// Milliseconds the GPU spent on the work `work` issues, timed with device events
    /// around it (host time to issue it does not count unless the GPU waits for it).
    ///
    /// ```no_run
    /// let gpu = linattn::cuda::Gpu::open(0)?;
    /// let ms = gpu.elapsed_ms(|| Ok(()))?;
    /// assert!(ms >= 0.0);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn elapsed_ms(&self, work: impl FnOnce() -> Result<()>) -> Result<f64> {
        let event = || {
            self.context
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| cuda_error("creating an event", e))
        };
        let (start, end) = (event()?, event()?);
        start
            .record(&self.stream)
            .map_err(|e| cuda_error("recording an event", e))?;
        work()?;
        end.record(&self.stream)
            .map_err(|e| cuda_error("recording an event", e))?;
        end.synchronize()
            .map_err(|e| cuda_error("waiting for an event", e))?;
        start
            .elapsed_ms(&end)
            .map(f64::from)
            .map_err(|e| cuda_error("reading an event", e))
    }

    /// Milliseconds the GPU spent on each of `runs` calls of `work`, measured as
    /// `triton.testing.do_bench` measures the peers: device events around each run, the
    /// L2 cache flushed (a 256 MiB buffer zeroed) before each, and the runs issued back to
    /// back with one synchronisation at the end, so that the host's time to issue a run
    /// hides behind the GPU's work on the one before (as in a model's forward pass).
    ///
    /// ```no_run
    /// let gpu = linattn::cuda::Gpu::open(0)?;
    /// let times = gpu.elapsed_runs_ms(5, || Ok(()))?;
    /// assert_eq!(times.len(), 5);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn elapsed_runs_ms(
        &self,
        runs: usize,
        mut work: impl FnMut() -> Result<()>,
    ) -> Result<Vec<f64>> {
        const FLUSH_BYTES: usize = 256 << 20;
        let mut flush: CudaSlice<u8> = self.alloc(FLUSH_BYTES)?;
        let record = || {
            self.stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| cuda_error("recording an event", e))
        };
        let mut events = Vec::with_capacity(runs);
        for _ in 0..runs {
            self.stream
                .memset_zeros(&mut flush)
                .map_err(|e| cuda_error("flushing the L2 cache", e))?;
            let start = record()?;
            work()?;
            events.push((start, record()?));
        }
        self.synchronize()?;
        events
            .iter()
            .map(|(start, end)| {
                start
                    .elapsed_ms(end)
                    .map(f64::from)
                    .map_err(|e| cuda_error("reading an event", e))
            })
            .collect()
    }

    /// Device-to-device copy bandwidth in bytes per second (read + written), the best of
    /// several copies of 1 GiB: the ceiling of memory-bound kernels.
    ///
    /// ```no_run
    /// let gpu = linattn::cuda::Gpu::open(0)?;
    /// assert!(gpu.copy_bandwidth()? > 1e11);
    /// # Ok::<(), linattn::Error>(())
    /// ```
    pub fn copy_bandwidth(&self) -> Result<f64> {
        const BYTES: usize = 1 << 30;
        let source: CudaSlice<u8> = self.alloc(BYTES)?;
        let mut target: CudaSlice<u8> = self.alloc(BYTES)?;
        let mut best = f64::INFINITY;
        for _ in 0..6 {
            let ms = self.elapsed_ms(|| {
                self.stream
                    .memcpy_dtod(&source, &mut target)
                    .map_err(|e| cuda_error("copying on the GPU", e))
            })?;
            best = best.min(ms);
        }
        Ok(2.0 * BYTES as f64 / (best * 1e-3))
    }

    /// The architecture NVRTC compiles for: `sm_90a` on Hopper, so that its own
    /// instructions are available, `sm_XY` elsewhere.
    fn architecture(&self) -> Result<String> {
        let (major, minor) = self
            .context
            .compute_capability()
            .map_err(|e| cuda_error("reading the compute capability", e))?;
        if major < 8 {
            return Err(Error::Cuda(format!(
                "compute capability {major}.{minor}: the kernels need 8.0 (Ampere) or later"
            )));
        }
        let suffix = if major == 9 && minor == 0 { "a" } else { "" };
        Ok(format!("sm_{major}{minor}{suffix}"))
    }

    /// Kernel `name` of the module compiled from `source` (compiled on first use).
    fn function(&self, source: Source, name: &str) -> Result<CudaFunction> {
        let (code, file) = source.code();
        let mut modules = self
            .modules
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let module = match modules.get(file) {
            Some(module) => module.clone(),
            None => {
                let module = self.compile(&code, file)?;
                modules.insert(file, module.clone());
                module
            }
        };
        module
            .load_function(name)
            .map_err(|e| cuda_error(&format!("loading kernel {name}"), e))
    }

    fn compile(&self, source: &str, name: &str) -> Result<Arc<CudaModule>> {
        let ptx = compile_ptx(source, name, &self.architecture()?)?;
        self.context
            .load_module(ptx)
            .map_err(|e| cuda_error(&format!("loading {name}"), e))
    }

    pub(super) fn alloc<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        count: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(count)
            .map_err(|e| allocation_error::<T>(count, e))
    }

    /// Linear-attention kernel `name`, checked to fit `shared_bytes` of dynamic shared
    /// memory.
    pub(super) fn kernel(&self, name: &str, shared_bytes: u32) -> Result<CudaFunction> {
        self.kernel_of(Source::Linear, name, shared_bytes)
    }

    /// The most dynamic shared memory a block may use.
    pub(super) fn shared_limit(&self) -> usize {
        self.shared_limit
    }

    /// Kernel `name` of `source`, checked to fit `shared_bytes` of dynamic shared memory.
    pub(super) fn kernel_of(
        &self,
        source: Source,
        name: &str,
        shared_bytes: u32,
    ) -> Result<CudaFunction> {
        if shared_bytes as usize > self.shared_limit {
            return Err(Error::Unsupported(format!(
                "{name} needs {} of shared memory per block for this head dim, the GPU allows {}",
                crate::ByteSize(shared_bytes as u128),
                crate::ByteSize(self.shared_limit as u128)
            )));
        }
        let mut kernels = self
            .kernels
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(function) = kernels.get(name) {
            return Ok(function.clone());
        }
        let function = self.function(source, name)?;
        function
            .set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                self.shared_limit as i32,
            )
            .map_err(|e| cuda_error(&format!("raising {name}'s shared-memory limit"), e))?;
        kernels.insert(name.to_string(), function.clone());
        Ok(function)
    }
}

/// The kernel sources.
#[derive(Clone, Copy)]
pub(super) enum Source {
    Linear,
    /// The linear kernels again with the backward pass's (compiled only when asked for).
    LinearBackward,
    /// FAVOR+ kernels, built on the linear kernels' helpers.
    Performer,
    Softmax,
    /// The gated and delta-rule family.
    Gated,
}

impl Source {
    /// Every module, in the order `compile_all_kernels` compiles them.
    const ALL: [Self; 5] = [
        Self::Linear,
        Self::LinearBackward,
        Self::Performer,
        Self::Softmax,
        Self::Gated,
    ];

    /// The module's source text, the tile constants first, and its file name.
    pub(super) fn code(self) -> (String, &'static str) {
        let (source, file) = match self {
            Source::Linear => (LINEAR_SOURCE, "linear.cu"),
            Source::LinearBackward => (LINEAR_BACKWARD_SOURCE, "linear_backward.cu"),
            Source::Performer => (PERFORMER_SOURCE, "performer.cu"),
            Source::Softmax => (SOFTMAX_SOURCE, "softmax.cu"),
            Source::Gated => (GATED_SOURCE, "gated.cu"),
        };
        (tiles::prelude() + source, file)
    }
}

/// A kernel's arguments, in order: its shape (the problem's dims), then its parameter
/// struct, with the FAVOR+ kernels' feature count between them (performer.cu says why).
pub(super) trait KernelArguments {
    fn push_onto<'a>(&'a self, args: &mut LaunchArgs<'a>);
}

impl<S: DeviceRepr, P: DeviceRepr> KernelArguments for (S, P) {
    fn push_onto<'a>(&'a self, args: &mut LaunchArgs<'a>) {
        args.arg(&self.0).arg(&self.1);
    }
}

impl<S: DeviceRepr, F: DeviceRepr, P: DeviceRepr> KernelArguments for (S, F, P) {
    fn push_onto<'a>(&'a self, args: &mut LaunchArgs<'a>) {
        args.arg(&self.0).arg(&self.1).arg(&self.2);
    }
}

/// The buffers one launch's parameter struct points at: each call gives a buffer's device
/// address for the struct and keeps the guard that orders the buffer's use on the stream
/// (the launch waits for earlier writes to it, and later users wait for the launch).
/// [`Buffers::launch`] consumes them, so the guards outlive the launch they order.
pub(super) struct Buffers<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Buffers<'a> {
    pub(super) fn on(stream: &'a CudaStream) -> Self {
        Self {
            stream,
            guards: Vec::new(),
        }
    }

    /// The address of a buffer the kernel reads.
    pub(super) fn read<T>(&mut self, slice: &'a CudaSlice<T>) -> CUdeviceptr {
        let (address, guard) = slice.device_ptr(self.stream);
        self.guards.push(guard);
        address
    }

    /// The address of a buffer the kernel writes (or reads and writes).
    pub(super) fn write<T>(&mut self, slice: &'a mut CudaSlice<T>) -> CUdeviceptr {
        let (address, guard) = slice.device_ptr_mut(self.stream);
        self.guards.push(guard);
        address
    }

    /// [`Buffers::read`], or null for a buffer the kernel is told is absent.
    pub(super) fn read_optional<T>(&mut self, slice: Option<&'a CudaSlice<T>>) -> CUdeviceptr {
        slice.map_or(0, |slice| self.read(slice))
    }

    /// [`Buffers::write`], or null for a buffer the kernel is told is absent.
    pub(super) fn write_optional<T>(&mut self, slice: Option<&'a mut CudaSlice<T>>) -> CUdeviceptr {
        slice.map_or(0, |slice| self.write(slice))
    }

    /// Launches `function` (kernel `name`) with `arguments`, mapping a failure to
    /// [`Error::Cuda`]; the guards are released once the launch is queued.
    ///
    /// # Safety
    /// `arguments` must be the kernel's, in order, each address its parameter struct holds
    /// one these buffers gave, sized for the shape it goes with.
    pub(super) unsafe fn launch(
        self,
        function: &CudaFunction,
        config: LaunchConfig,
        arguments: &impl KernelArguments,
        name: &str,
    ) -> Result<()> {
        let mut args = self.stream.launch_builder(function);
        arguments.push_onto(&mut args);
        // SAFETY: the caller's promise.
        unsafe { args.launch(config) }
            .map(|_| ())
            .map_err(|e| cuda_error(&format!("launching {name}"), e))
    }
}

/// Where CUDA's headers are: `$CUDA_HOME/include`, `$CUDA_PATH/include`, or the usual
/// `/usr/local/cuda/include`.
fn cuda_include_dir() -> String {
    ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .find_map(|var| std::env::var(var).ok())
        .map_or_else(
            || "/usr/local/cuda/include".to_string(),
            |root| format!("{root}/include"),
        )
}

/// `x` as a kernel's `int`, or an error naming `what` where it does not fit.
pub(super) fn kernel_int(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x)
        .map_err(|_| Error::Unsupported(format!("{what} {x} is too large for the GPU kernels")))
}

pub(super) fn grid(x: usize, y: usize, z: usize) -> Result<(u32, u32, u32)> {
    let fits = |n: usize, limit: u32| u32::try_from(n).ok().filter(|&n| n <= limit);
    match (fits(x, i32::MAX as u32), fits(y, 65535), fits(z, 65535)) {
        (Some(x), Some(y), Some(z)) => Ok((x, y, z)),
        _ => Err(Error::Unsupported(format!(
            "a grid of {x} x {y} x {z} blocks is beyond the GPU's limits"
        ))),
    }
}

/// PTX of `source` (the module called `name`) for `architecture`, with the options and
/// include directories every compilation uses: from the disk cache when an earlier
/// process compiled the same (see [`ptx_cache`]), else by NVRTC, then stored.
fn compile_ptx(source: &str, name: &str, architecture: &str) -> Result<cudarc::nvrtc::Ptx> {
    let include = cuda_include_dir();
    let flags = vec![
        format!("--gpu-architecture={architecture}"),
        "--std=c++17".to_string(),
    ];
    let cached = ptx_cache::directory().map(|directory| {
        let version = nvrtc_version();
        let mut parts = vec![source, include.as_str(), version.as_str()];
        parts.extend(flags.iter().map(String::as_str));
        ptx_cache::file(&directory, name, &parts)
    });
    if let Some(ptx) = cached.as_deref().and_then(ptx_cache::load) {
        return Ok(cudarc::nvrtc::Ptx::from_src(ptx));
    }
    let options = cudarc::nvrtc::CompileOptions {
        options: flags,
        include_paths: vec![include.clone(), format!("{include}/cccl")],
        name: Some(name.to_string()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, options)
        .map_err(|e| cuda_error(&format!("compiling {name}"), e))?;
    if let Some(file) = &cached {
        ptx_cache::store(file, &ptx.to_src());
    }
    Ok(ptx)
}

/// NVRTC's version as `major.minor` (`unknown` if it cannot say): a newer compiler may
/// emit other PTX from the same source.
fn nvrtc_version() -> String {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: writes two ints; NVRTC is loaded (or found missing) by the call.
    let result = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if result == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        format!("{major}.{minor}")
    } else {
        "unknown".to_string()
    }
}

/// Compiles every kernel module for `architecture` (`sm_90a`, say) with NVRTC alone, as
/// a [`Gpu`] compiles them (the same sources, options and include directories), and
/// returns each module's file name and the bytes of its PTX. Needs NVRTC and CUDA's
/// headers, no GPU or driver: the compile check of CI.
///
/// ```no_run
/// for (module, bytes) in linattn::cuda::compile_all_kernels("sm_90a")? {
///     println!("{module}: {bytes} bytes of PTX");
/// }
/// # Ok::<(), linattn::Error>(())
/// ```
#[doc(hidden)]
pub fn compile_all_kernels(architecture: &str) -> Result<Vec<(String, usize)>> {
    // SAFETY: only tries to load the library, as compiling below would.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Cuda(
            "NVRTC not found (libnvrtc.so): install the CUDA toolkit's runtime compiler".into(),
        ));
    }
    // One thread per module: NVRTC compiles independent programs concurrently, and the
    // modules take tens of seconds each.
    std::thread::scope(|scope| {
        let compiling: Vec<_> = Source::ALL
            .iter()
            .map(|source| {
                scope.spawn(move || {
                    let (code, file) = source.code();
                    let ptx = compile_ptx(&code, file, architecture)?;
                    Ok((file.to_string(), ptx.to_src().len()))
                })
            })
            .collect();
        compiling
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}
