//! Launches of linear attention's kernels (linear.cu, linear_mma.cu, their entry points in
//! linear_entry.cu): the plan of which kernels a call
//! runs, the causal form's segments, the shared memory the kernels carve, and the causal,
//! non-causal, prefill and decode passes.

use super::device::{Buffers, Gpu, Source, allocation_error, cuda_error, grid, kernel_int};
use super::tensor::{GpuElement, GpuLinearState, GpuTensor};
use super::tiles::{CAUSAL_PRODUCER_WARPS, CHUNK, DECODE_HEADS, PAD};
use crate::base::{Error, Problem, Result};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};

/// Threads per block of every kernel (their `__launch_bounds__`).
const THREADS: u32 = 256;
/// The widest values each decode kernel takes: 32 lanes of 4 columns, or of 8 (`_wide`).
const DECODE_NARROW_DIM: usize = 128;
const DECODE_WIDE_DIM: usize = 256;
/// Rows each block of the non-causal passes covers: enough that the state each block
/// loads is read once per 512 queries, few enough that every multiprocessor has work.
pub(super) const FULL_SPAN: usize = 512;

/// The kernels' view of a problem (`linattn::Shape` in the source).
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct KernelShape {
    batch: i32,
    len: i32,
    heads_q: i32,
    heads_kv: i32,
    dim_k: i32,
    dim_v: i32,
    value_block: i32,
}

// SAFETY: plain old data with the layout of the kernels' struct.
unsafe impl DeviceRepr for KernelShape {}

impl KernelShape {
    pub(super) fn of(problem: &Problem, value_block: usize) -> Result<Self> {
        let int = kernel_int;
        Ok(Self {
            batch: int(problem.batch, "batch")?,
            len: int(problem.len_q, "sequence length")?,
            heads_q: int(problem.heads_q, "query heads")?,
            heads_kv: int(problem.heads_kv, "kv heads")?,
            dim_k: int(problem.dim_qk, "head dim")?,
            dim_v: int(problem.dim_v, "value dim")?,
            value_block: value_block as i32,
        })
    }
}

/// What every linear kernel takes beside its [`KernelShape`] (`linattn::LinearParams` in
/// linear.cu, which says what each field is for and why the shape travels apart): device
/// addresses, 0 for none, then the scalars. A kernel reads the fields its pass uses; the
/// default leaves the others null or 0.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct LinearParams {
    pub(super) q: CUdeviceptr,
    pub(super) k: CUdeviceptr,
    pub(super) v: CUdeviceptr,
    pub(super) out: CUdeviceptr,
    pub(super) state_in: CUdeviceptr,
    pub(super) k_sum_in: CUdeviceptr,
    pub(super) state_out: CUdeviceptr,
    pub(super) k_sum_out: CUdeviceptr,
    pub(super) partial_states: CUdeviceptr,
    pub(super) partial_sums: CUdeviceptr,
    pub(super) den_out: CUdeviceptr,
    pub(super) eps: f32,
    pub(super) span: i32,
    pub(super) parts: i32,
    pub(super) per_span: i32,
}

// SAFETY: plain old data with the layout of the kernels' struct (checked by a test).
unsafe impl DeviceRepr for LinearParams {}

fn round16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// Value columns one block of the chunk kernels handles: a tensor-core tile multiple, at
/// most 64 (every block maps and scores the whole queries and keys, so narrower blocks
/// repeat that work).
pub(super) fn value_block(dim_v: usize) -> usize {
    round16(dim_v).min(64)
}

/// Segments the causal form splits each sequence into, so that the grid fills the GPU in
/// one wave (the chunk kernels run one block per multiprocessor): each block walks its
/// segment's chunks in order. Returns (segments, rows per segment).
fn causal_segments(processors: usize, len: usize, blocks_per_segment: usize) -> (usize, usize) {
    /// Fewer rows than this per segment and the extra pass over the keys costs more than
    /// the parallelism brings.
    const MIN_SPAN: usize = 8 * CHUNK;
    let wanted = processors / blocks_per_segment;
    let segments = wanted.min(len.div_ceil(MIN_SPAN)).max(1);
    let span = len.div_ceil(segments).next_multiple_of(CHUNK);
    (len.div_ceil(span), span)
}

/// Pieces each segment's sums are split into for the pass that computes them: the most
/// that divide its chunks evenly (the pass walks each piece's chunks in order, as the
/// causal pass does) while the `summed` segments' pieces all run at once on the
/// `resident` blocks the GPU holds. A second, partial wave costs a whole piece's time
/// again: on an H100 at B=4, T=8192 (two segments), eight pieces (512 blocks, 264
/// resident: two per multiprocessor, as their registers allow) took 66 µs, four 56 µs.
fn segment_parts(resident: usize, span: usize, summed: usize) -> usize {
    let wanted = (resident / summed.max(1)).max(1);
    let chunks = span / CHUNK;
    (1..=wanted.min(chunks))
        .rev()
        .find(|parts| chunks.is_multiple_of(*parts))
        .unwrap_or(1)
}

/// Shared memory of the chunk kernels, as `ChunkSmem::carve` lays it out.
fn chunk_shared_bytes(dim_k: usize, value_block: usize, element: usize) -> usize {
    let (dkp, dvp) = (round16(dim_k), value_block);
    let (ldk, ldv, ldc, lds, ldo) = (dkp + PAD, dvp + PAD, CHUNK + PAD, dvp + PAD, dvp + PAD);
    let mut arrays = vec![
        (CHUNK * ldk, element),
        (CHUNK * ldk, element),
        (CHUNK * ldv, element),
        (CHUNK * ldc, 4),
        (dkp * lds, 4),
        (CHUNK * ldo, 4),
        (dkp, 4),
        (CHUNK, 4),
    ];
    if element != 4 {
        arrays.extend([(CHUNK * ldc, element), (dkp * lds, element)]);
    }
    carved_bytes(&arrays)
}

/// Bytes of arrays of `(count, element size)` carved one after another as the kernels'
/// `Carver` does (each rounded up to 128 bytes).
pub(super) fn carved_bytes(arrays: &[(usize, usize)]) -> usize {
    arrays
        .iter()
        .map(|&(count, size)| (count * size).div_ceil(128) * 128)
        .sum()
}

/// The three passes of linear attention on the GPU.
#[derive(Clone, Copy)]
pub(super) enum Pass {
    /// The chunked causal forward.
    Causal,
    /// `S` and `z` over spans of the keys.
    State,
    /// The non-causal output from a finished state.
    Apply,
}

/// Which kernels a linear call runs and how they are launched. 16-bit elements with
/// `D_k = D_v` in {64, 128} take the tensor-core kernels (mma.sync, a block of `D / 16`
/// warps per head and segment, the state in registers); everything else the general
/// ones (a block of 256 threads per 64 value columns, WMMA or f32 CUDA cores).
pub(super) struct LinearPlan {
    pub(super) shape: KernelShape,
    /// `Some(D)` for the tensor-core kernels.
    pub(super) tensor_core_dim: Option<usize>,
    element: usize,
    suffix: &'static str,
}

impl LinearPlan {
    pub(super) fn new<T: GpuElement>(problem: &Problem) -> Result<Self> {
        let element = size_of::<T>();
        let tensor_core_dim =
            (element == 2 && problem.dim_qk == problem.dim_v && matches!(problem.dim_qk, 64 | 128))
                .then_some(problem.dim_qk);
        let width = tensor_core_dim.unwrap_or_else(|| value_block(problem.dim_v));
        Ok(Self {
            shape: KernelShape::of(problem, width)?,
            tensor_core_dim,
            element,
            suffix: T::NAME,
        })
    }

    /// Blocks per (head, segment or span).
    fn value_blocks(&self) -> usize {
        (self.shape.dim_v as usize).div_ceil(self.shape.value_block as usize)
    }

    fn name(&self, pass: Pass) -> String {
        match (self.tensor_core_dim, pass) {
            (Some(dim), Pass::Causal) => format!("linear_causal_mma_{}_d{dim}", self.suffix),
            (Some(dim), Pass::State) => format!("linear_state_mma_{}_d{dim}", self.suffix),
            (Some(dim), Pass::Apply) => format!("linear_apply_mma_{}_d{dim}", self.suffix),
            (None, Pass::Causal) => format!("linear_causal_{}", self.suffix),
            (None, Pass::State) => format!("linear_full_state_{}", self.suffix),
            (None, Pass::Apply) => format!("linear_full_apply_{}", self.suffix),
        }
    }

    /// The launch of `pass` over `units` segments or spans of `heads` heads each.
    pub(super) fn config(&self, pass: Pass, units: usize, heads: usize) -> Result<LaunchConfig> {
        let batch = self.shape.batch as usize;
        let Some(dim) = self.tensor_core_dim else {
            return Ok(LaunchConfig {
                grid_dim: grid(self.value_blocks(), heads, batch * units)?,
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: chunk_shared_bytes(
                    self.shape.dim_k as usize,
                    self.shape.value_block as usize,
                    self.element,
                ) as u32,
            });
        };
        // As the kernels carve it: tiles of CHUNK rows padded by 8 elements (a ring of
        // three stages of q, k, v for the causal pass, two of k, v for the state, two of q
        // to apply it), then the causal pass's scores by parity and its f32 vectors
        // (denominators, row sums per key block and key sums, each by parity); the apply
        // pass's denominators and key sums.
        let tile = CHUNK * (dim + PAD) * self.element;
        let (shared, warps) = match pass {
            Pass::Causal => (
                9 * tile
                    + 2 * CHUNK * (CHUNK + PAD) * self.element
                    + (2 * CHUNK + 2 * CHUNK / 16 * CHUNK + 2 * dim) * 4,
                CAUSAL_PRODUCER_WARPS + dim / 16,
            ),
            Pass::State => (4 * tile, dim / 16),
            Pass::Apply => (2 * tile + (CHUNK + dim) * 4, dim / 16),
        };
        Ok(LaunchConfig {
            grid_dim: grid(units, heads, batch)?,
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        })
    }
}

fn check_state(state: &GpuLinearState, problem: &Problem) -> Result<()> {
    let expected = (
        problem.batch,
        problem.heads_kv,
        problem.dim_qk,
        problem.dim_v,
    );
    let actual = (state.batch, state.heads_kv, state.dim_k, state.dim_v);
    if expected != actual {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "the state is for (batch, kv heads, dim k, dim v) = {actual:?}, the tokens need {expected:?}"
            ),
        });
    }
    Ok(())
}

type StateRef<'a> = (&'a CudaSlice<f32>, &'a CudaSlice<f32>);
type StateMut<'a> = (&'a mut CudaSlice<f32>, &'a mut CudaSlice<f32>);

/// How the causal passes split each sequence (`causal_segments`), and the sums over every
/// segment but the last that give each segment its start: `parts` pieces per segment,
/// stored apart, so that this pass fills the GPU too. `state_kernel` is the state pass
/// matching the causal kernel (mapped or plain, forwards or backwards).
pub(super) struct Segments {
    pub(super) span: usize,
    pub(super) count: usize,
    pub(super) parts: usize,
    /// `[B, H_kv, (count - 1) parts, D_k, D_v]` and `[B, H_kv, (count - 1) parts, D_k]`.
    pub(super) sums: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
}

impl Segments {
    pub(super) fn of<T: GpuElement>(
        gpu: &Gpu,
        problem: &Problem,
        plan: &LinearPlan,
        [k, v]: [&GpuTensor<T>; 2],
        state_kernel: (Source, &str),
    ) -> Result<Self> {
        let (count, span) = causal_segments(
            gpu.processors,
            problem.len_q,
            plan.value_blocks() * problem.heads_q * problem.batch,
        );
        if count == 1 {
            return Ok(Self {
                span,
                count,
                parts: 1,
                sums: None,
            });
        }
        let (source, name) = state_kernel;
        let one_block = plan.config(Pass::State, 1, 1)?;
        let per_processor = gpu
            .kernel_of(source, name, one_block.shared_mem_bytes)?
            .occupancy_max_active_blocks_per_multiprocessor(
                one_block.block_dim.0,
                one_block.shared_mem_bytes as usize,
                None,
            )
            .map_err(|e| cuda_error(&format!("asking how many {name} blocks fit"), e))?;
        let parts = segment_parts(
            gpu.processors * per_processor.max(1) as usize,
            span,
            (count - 1) * problem.batch * problem.heads_kv,
        );
        let summed = (count - 1) * parts;
        let per_head = problem.batch * problem.heads_kv * summed * problem.dim_qk;
        // SAFETY: the state pass stores every element (one piece per block) before the
        // causal pass reads them.
        let (mut kv, mut sums) = unsafe {
            let count = per_head * problem.dim_v;
            let kv = gpu.stream.alloc::<f32>(count);
            let sums = gpu.stream.alloc::<f32>(per_head);
            (
                kv.map_err(|e| allocation_error::<f32>(count, e))?,
                sums.map_err(|e| allocation_error::<f32>(per_head, e))?,
            )
        };
        let config = plan.config(Pass::State, summed, problem.heads_kv)?;
        key_sums(
            gpu,
            plan,
            state_kernel,
            [k, v],
            config,
            span / parts,
            true,
            [&mut kv, &mut sums],
        )?;
        Ok(Self {
            span,
            count,
            parts,
            sums: Some((kv, sums)),
        })
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_causal<T: GpuElement>(
    gpu: &Gpu,
    problem: &Problem,
    [q, k, v]: [&GpuTensor<T>; 3],
    epsilon: f32,
    out: &mut GpuTensor<T>,
    state_in: Option<StateRef<'_>>,
    state_out: Option<StateMut<'_>>,
    den_out: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    let plan = LinearPlan::new::<T>(problem)?;
    let state_name = plan.name(Pass::State);
    let segments = Segments::of(gpu, problem, &plan, [k, v], (Source::Linear, &state_name))?;
    let config = plan.config(Pass::Causal, segments.count, problem.heads_q)?;
    let name = plan.name(Pass::Causal);
    let function = gpu.kernel(&name, config.shared_mem_bytes)?;
    let (kv_out, k_sum_out) = state_out.unzip();
    let segment_sums = segments.sums.as_ref();
    // Absent states and sums are null pointers, which the kernel checks.
    let mut buffers = Buffers::on(&gpu.stream);
    let params = LinearParams {
        q: buffers.read(&q.data),
        k: buffers.read(&k.data),
        v: buffers.read(&v.data),
        out: buffers.write(&mut out.data),
        state_in: buffers.read_optional(state_in.map(|(kv, _)| kv)),
        k_sum_in: buffers.read_optional(state_in.map(|(_, sum)| sum)),
        state_out: buffers.write_optional(kv_out),
        k_sum_out: buffers.write_optional(k_sum_out),
        partial_states: buffers.read_optional(segment_sums.map(|(kv, _)| kv)),
        partial_sums: buffers.read_optional(segment_sums.map(|(_, sum)| sum)),
        den_out: buffers.write_optional(den_out),
        eps: epsilon,
        span: segments.span as i32,
        parts: segments.parts as i32,
        ..LinearParams::default()
    };
    // SAFETY: linear_causal's parameters; states, when present, were checked, and the
    // denominators hold a row per query row and head.
    unsafe { buffers.launch(&function, config, &(plan.shape, params), &name) }
}

/// `S = Σ φ(k) vᵀ` and `z = Σ φ(k)` over the spans of `span` rows that `config`'s grid covers:
/// each span's sums stored apart when `per_span` (the causal form's segments), else
/// added into one zeroed state per head (the non-causal form's first pass).
#[allow(clippy::too_many_arguments)]
fn key_sums<T: GpuElement>(
    gpu: &Gpu,
    plan: &LinearPlan,
    (source, name): (Source, &str),
    [k, v]: [&GpuTensor<T>; 2],
    config: LaunchConfig,
    span: usize,
    per_span: bool,
    [kv, k_sum]: [&mut CudaSlice<f32>; 2],
) -> Result<()> {
    let function = gpu.kernel_of(source, name, config.shared_mem_bytes)?;
    let mut buffers = Buffers::on(&gpu.stream);
    let params = LinearParams {
        k: buffers.read(&k.data),
        v: buffers.read(&v.data),
        state_out: buffers.write(kv),
        k_sum_out: buffers.write(k_sum),
        span: span as i32,
        per_span: i32::from(per_span),
        ..LinearParams::default()
    };
    // SAFETY: the state pass's parameters; the caller sized the sums for the spans.
    unsafe { buffers.launch(&function, config, &(plan.shape, params), name) }
}

pub(crate) fn linear_full<T: GpuElement>(
    gpu: &Gpu,
    problem: &Problem,
    q: &GpuTensor<T>,
    k: &GpuTensor<T>,
    v: &GpuTensor<T>,
    epsilon: f32,
    out: &mut GpuTensor<T>,
) -> Result<()> {
    let plan = LinearPlan::new::<T>(problem)?;
    let mut state = GpuLinearState::zeros(
        gpu,
        problem.batch,
        problem.heads_kv,
        problem.dim_qk,
        problem.dim_v,
    )?;
    let spans = problem.len_q.div_ceil(FULL_SPAN);
    let config = plan.config(Pass::State, spans, problem.heads_kv)?;
    key_sums(
        gpu,
        &plan,
        (Source::Linear, &plan.name(Pass::State)),
        [k, v],
        config,
        FULL_SPAN,
        false,
        [&mut state.kv, &mut state.k_sum],
    )?;
    let config = plan.config(Pass::Apply, spans, problem.heads_q)?;
    let name = plan.name(Pass::Apply);
    let function = gpu.kernel(&name, config.shared_mem_bytes)?;
    let mut buffers = Buffers::on(&gpu.stream);
    let params = LinearParams {
        q: buffers.read(&q.data),
        out: buffers.write(&mut out.data),
        state_in: buffers.read(&state.kv),
        k_sum_in: buffers.read(&state.k_sum),
        eps: epsilon,
        span: FULL_SPAN as i32,
        ..LinearParams::default()
    };
    // SAFETY: the apply kernel's parameters and the state the first pass filled.
    unsafe { buffers.launch(&function, config, &(plan.shape, params), &name) }
}

/// The causal forward from `state` (the tokens before these) that leaves in it the state
/// after them, into a new output: prefill for [`linear_decode`].
pub(crate) fn linear_prefill<T: GpuElement>(
    gpu: &Gpu,
    problem: &Problem,
    [q, k, v]: [&GpuTensor<T>; 3],
    epsilon: f32,
    state: &mut GpuLinearState,
) -> Result<GpuTensor<T>> {
    check_state(state, problem)?;
    let mut out = GpuTensor::for_output(gpu, problem.out_shape())?;
    // The kernel's blocks of one kv head read its start while others may already
    // write its end (GQA): the start is a copy.
    let copy = |slice: &CudaSlice<f32>| {
        slice
            .try_clone()
            .map_err(|e| cuda_error("copying the state on the GPU", e))
    };
    let (previous, previous_sum) = (copy(&state.kv)?, copy(&state.k_sum)?);
    linear_causal(
        gpu,
        problem,
        [q, k, v],
        epsilon,
        &mut out,
        Some((&previous, &previous_sum)),
        Some((&mut state.kv, &mut state.k_sum)),
        None,
    )?;
    Ok(out)
}

/// One recurrent step for a batch of single tokens (`[B, 1, H, D]`): absorbs k and v
/// into `state` in place and returns each query's output.
pub(crate) fn linear_decode<T: GpuElement>(
    gpu: &Gpu,
    problem: &Problem,
    [q, k, v]: [&GpuTensor<T>; 3],
    epsilon: f32,
    state: &mut GpuLinearState,
) -> Result<GpuTensor<T>> {
    if problem.dim_v > DECODE_WIDE_DIM {
        return Err(Error::Unsupported(format!(
            "decode on the GPU takes value dims up to {DECODE_WIDE_DIM}, not {}",
            problem.dim_v
        )));
    }
    check_state(state, problem)?;
    let mut out = GpuTensor::for_output(gpu, problem.out_shape())?;
    let warps = THREADS as usize / 32;
    let floats = problem.dim_qk * (2 + DECODE_HEADS)
        + problem.dim_v
        + DECODE_HEADS
        + warps * DECODE_HEADS * problem.dim_v;
    let config = LaunchConfig {
        grid_dim: grid(problem.heads_kv, problem.batch, 1)?,
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: (floats * 4) as u32,
    };
    let shape = KernelShape::of(problem, 0)?;
    let width = if problem.dim_v <= DECODE_NARROW_DIM {
        ""
    } else {
        "wide_"
    };
    let name = format!("linear_decode_{width}{}", T::NAME);
    let function = gpu.kernel(&name, config.shared_mem_bytes)?;
    let mut buffers = Buffers::on(&gpu.stream);
    let params = LinearParams {
        q: buffers.read(&q.data),
        k: buffers.read(&k.data),
        v: buffers.read(&v.data),
        out: buffers.write(&mut out.data),
        state_out: buffers.write(&mut state.kv),
        k_sum_out: buffers.write(&mut state.k_sum),
        eps: epsilon,
        ..LinearParams::default()
    };
    // SAFETY: linear_decode's parameters; the state was checked against the shape.
    unsafe { buffers.launch(&function, config, &(shape, params), &name) }?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::struct_layout::{layout, rust_fields};

    #[test]
    fn kernel_params_lay_out_as_their_c_declarations() {
        // linattn::Shape: seven ints.
        let shape = rust_fields!(KernelShape {
            batch,
            len,
            heads_q,
            heads_kv,
            dim_k,
            dim_v,
            value_block,
        });
        layout::assert_mirrors::<KernelShape>(Source::Linear, "Shape", 28, &shape);
        // linattn::LinearParams: eleven pointers (88 bytes) and four 4-byte scalars.
        let params = rust_fields!(LinearParams {
            q,
            k,
            v,
            out,
            state_in,
            k_sum_in,
            state_out,
            k_sum_out,
            partial_states,
            partial_sums,
            den_out,
            eps,
            span,
            parts,
            per_span,
        });
        layout::assert_mirrors::<LinearParams>(Source::Linear, "LinearParams", 104, &params);
    }

    #[test]
    fn segment_parts_divide_the_span_and_fill_the_gpu() {
        // H100 (two state blocks per multiprocessor), B=4, H=16, two segments of 4096
        // rows: four pieces (256 blocks) fit and divide the 64 chunks.
        assert_eq!(segment_parts(264, 4096, 64), 4);
        // 1M tokens, 16 heads, 8 segments: two pieces fit and divide 2048 chunks.
        assert_eq!(segment_parts(264, 131_072, 7 * 16), 2);
        // Six would fit; 96 chunks divide into six.
        assert_eq!(segment_parts(396, 96 * CHUNK, 64), 6);
        for (span, summed) in [(640, 1), (64, 3), (1 << 14, 500), (192, 2)] {
            let parts = segment_parts(264, span, summed);
            assert!(
                parts >= 1 && (span / CHUNK).is_multiple_of(parts),
                "{span} {summed}: {parts}"
            );
            assert!(
                parts == 1 || summed * parts <= 264,
                "{span} {summed}: {parts}"
            );
        }
    }

    #[test]
    fn segments_cover_the_sequence_in_whole_chunks() {
        for (processors, len, blocks) in [
            (132, 8192, 128),
            (132, 1 << 20, 32),
            (132, 100, 1),
            (8, 5000, 1),
        ] {
            let (segments, span) = causal_segments(processors, len, blocks);
            assert_eq!(span % CHUNK, 0);
            assert!(
                segments * span >= len && (segments - 1) * span < len,
                "{len}: {segments} x {span}"
            );
            assert!(segments == 1 || span >= 8 * CHUNK);
        }
        // A grid that already fills the GPU is not split.
        assert_eq!(causal_segments(132, 8192, 256).0, 1);
        // B=1, H=16 at 1M tokens: as many segments as one wave holds.
        let (segments, _) = causal_segments(132, 1 << 20, 16);
        assert!(
            segments * 16 <= 132 && (segments + 1) * 16 > 132,
            "{segments}"
        );
    }

    #[test]
    fn chunk_kernels_fit_hoppers_shared_memory_up_to_head_dim_128() {
        const HOPPER_OPT_IN: usize = 227 << 10;
        for element in [2, 4] {
            assert!(
                chunk_shared_bytes(128, 64, element) <= HOPPER_OPT_IN,
                "{element}-byte"
            );
        }
        // Head dim 256 in f32 does not fit: the launch refuses it with a typed error.
        assert!(chunk_shared_bytes(256, 64, 4) > HOPPER_OPT_IN);
    }

    #[test]
    fn tensor_cores_take_16_bit_square_heads_of_64_and_128() {
        const HOPPER_OPT_IN: usize = 227 << 10;
        let problem = |dim_k, dim_v| {
            Problem::new(
                [2, 300, 4, dim_k],
                [2, 300, 2, dim_k],
                [2, 300, 2, dim_v],
                true,
            )
            .unwrap()
        };
        for dim in [64, 128] {
            let plan = LinearPlan::new::<half::bf16>(&problem(dim, dim)).unwrap();
            assert_eq!(plan.tensor_core_dim, Some(dim));
            assert_eq!(plan.value_blocks(), 1);
            assert_eq!(
                plan.name(Pass::Causal),
                format!("linear_causal_mma_bf16_d{dim}")
            );
            for pass in [Pass::Causal, Pass::State, Pass::Apply] {
                let config = plan.config(pass, 3, 4).unwrap();
                assert_eq!(config.grid_dim, (3, 4, 2));
                let producers = match pass {
                    Pass::Causal => 32 * CAUSAL_PRODUCER_WARPS,
                    _ => 0,
                };
                assert_eq!(config.block_dim.0 as usize, producers + 2 * dim);
                assert!(config.shared_mem_bytes as usize <= HOPPER_OPT_IN);
            }
        }
        // f32, unequal or other dims: the general kernels, a block per 64 value columns.
        for plan in [
            LinearPlan::new::<f32>(&problem(128, 128)).unwrap(),
            LinearPlan::new::<half::f16>(&problem(128, 96)).unwrap(),
            LinearPlan::new::<half::f16>(&problem(32, 32)).unwrap(),
        ] {
            assert_eq!(plan.tensor_core_dim, None);
            assert!(!plan.name(Pass::State).contains("mma"));
        }
        let general = LinearPlan::new::<f32>(&problem(128, 128)).unwrap();
        assert_eq!(general.value_blocks(), 2);
        assert_eq!(
            general.config(Pass::Apply, 3, 4).unwrap().grid_dim,
            (2, 4, 6)
        );
    }
}
