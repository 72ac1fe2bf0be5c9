//! Launches of the gated family (retention, gla, the delta rule and the gated delta rule):
//! the chunked forward on the tensor cores (gated_mma.cu) or, for any head widths that fit
//! shared memory, on the CUDA cores (gated.cu), and the one-token decode step (gated.cu).

use super::device::{Buffers, Gpu, Source, cuda_error, grid, kernel_int};
use super::tensor::{GpuElement, GpuTensor};
use super::tiles::{CHUNK, GATED_COLUMNS, GATED_MMA_THREADS, PAD};
use crate::base::{Error, GatedShape, Result};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};

/// Threads per block of the gated kernel.
const GATED_THREADS: u32 = 256;
/// Rows per chunk, the largest of these whose tiles fit the GPU's shared memory.
const GATED_CHUNKS: [usize; 4] = [64, 32, 16, 8];
/// Value columns per block where a whole head's state does not fit shared memory, the
/// widest first: each column's state, values and outputs are its own, but every block
/// recomputes the chunk's C × C scores, so whole heads go first (columns of 32 at width
/// 128 made the B4 H16 cases 1.4–2.4x slower on the H100; journal 2026-12-06 15:20).
const GATED_VALUE_BLOCKS: [usize; 4] = [128, 64, 32, 16];

/// `linattn::gated::Shape` in gated.cu.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct KernelShape {
    batch: i32,
    len: i32,
    heads: i32,
    heads_v: i32,
    dim_k: i32,
    dim_v: i32,
}

// SAFETY: plain old data with the layout of the kernel's struct.
unsafe impl DeviceRepr for KernelShape {}

impl KernelShape {
    /// `call`'s sizes as the kernels' `int`s, or an error naming the one too large.
    fn of(call: GatedShape) -> Result<Self> {
        let int = kernel_int;
        Ok(Self {
            batch: int(call.batch, "batch")?,
            len: int(call.len, "length")?,
            heads: int(call.heads, "heads")?,
            heads_v: int(call.heads_v, "value heads")?,
            dim_k: int(call.dim_k, "key width")?,
            dim_v: int(call.dim_v, "value width")?,
        })
    }
}

/// Log decays per token the kernels read: g's last axis, 1 for a fixed decay, 0 for none.
fn gate_width(g: Option<&GpuTensor<f32>>, rule: GatedRule<'_>) -> usize {
    match (g, rule.fixed) {
        (Some(g), _) => g.shape()[3],
        (None, Some(_)) => 1,
        (None, None) => 0,
    }
}

/// The rule's fixed decays on the GPU, where it has them.
fn fixed_decays(gpu: &Gpu, rule: GatedRule<'_>) -> Result<Option<CudaSlice<f32>>> {
    rule.fixed
        .map(|decays| gpu.stream.clone_htod(decays))
        .transpose()
        .map_err(|e| cuda_error("copying the decays to the GPU", e))
}

/// The kernels' range check: the first bad index of g, then of β; i64::MAX where none is
/// (read back by `first_out_of_range`).
fn range_check(gpu: &Gpu) -> Result<CudaSlice<i64>> {
    gpu.stream
        .clone_htod(&[i64::MAX; 2])
        .map_err(|e| cuda_error("copying the range check to the GPU", e))
}

/// `linattn::gated::GatedParams` in gated.cu, which says what each field is for: device
/// addresses (0 for none), then the scalars.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GatedParams {
    q: CUdeviceptr,
    k: CUdeviceptr,
    v: CUdeviceptr,
    out: CUdeviceptr,
    g: CUdeviceptr,
    fixed: CUdeviceptr,
    beta: CUdeviceptr,
    state_in: CUdeviceptr,
    state_out: CUdeviceptr,
    cu_seqlens: CUdeviceptr,
    bad: CUdeviceptr,
    scale: f32,
    beta_max: f32,
    gate_width: i32,
    chunk: i32,
    value_block: i32,
    delta: i32,
    l2norm: i32,
}

// SAFETY: plain old data with the layout of the kernel's struct (checked by a test).
unsafe impl DeviceRepr for GatedParams {}

/// What a call's rule asks of the kernel.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GatedRule<'a> {
    /// Fixed log decays, one per value head (retention); `None` where g is given or
    /// nothing decays.
    pub fixed: Option<&'a [f32]>,
    pub delta: bool,
    pub beta_max: f32,
    pub scale: f32,
    pub l2norm: bool,
}

/// A call's per-token inputs and states, on the GPU in f32.
#[derive(Clone, Copy)]
pub(crate) struct GatedInputs<'a> {
    pub g: Option<&'a GpuTensor<f32>>,
    pub beta: Option<&'a GpuTensor<f32>>,
    pub initial_state: Option<&'a GpuTensor<f32>>,
    pub cu_seqlens: Option<&'a [usize]>,
}

/// Where the kernel found an input out of range: the flat index in g or β.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OutOfRange {
    G(usize),
    Beta(usize),
}

/// The chunked forward: the output `[batch, len, heads_v, dim_v]`, the final states
/// `[sequences, heads_v, dim_k, dim_v]` and, where the kernel met a g or β out of range,
/// the first such element (the caller names it; the results are then meaningless).
/// 16-bit inputs with d_k, d_v in {64, 128} and at most one log decay per token run on
/// the tensor cores (gated_mma.cu), the rest on the CUDA cores (gated.cu).
pub(crate) fn gated_forward<T: GpuElement>(
    gpu: &Gpu,
    call: GatedShape,
    rule: GatedRule<'_>,
    [q, k, v]: [&GpuTensor<T>; 3],
    inputs: GatedInputs<'_>,
) -> Result<(GpuTensor<T>, GpuTensor<f32>, Option<OutOfRange>)> {
    let sequences = inputs.cu_seqlens.map_or(call.batch, |cu| cu.len() - 1);
    let gate_width = gate_width(inputs.g, rule);
    let shape = KernelShape::of(call)?;
    let fixed = fixed_decays(gpu, rule)?;
    let offsets: Option<Vec<i64>> = inputs
        .cu_seqlens
        .map(|cu| cu.iter().map(|&x| x as i64).collect());
    let cu_seqlens = offsets
        .map(|o| gpu.stream.clone_htod(&o))
        .transpose()
        .map_err(|e| cuda_error("copying cu_seqlens to the GPU", e))?;
    let mut bad = range_check(gpu)?;
    let mut out = GpuTensor::for_output(gpu, [call.batch, call.len, call.heads_v, call.dim_v])?;
    let state_shape = [sequences, call.heads_v, call.dim_k, call.dim_v];
    let mut states = GpuTensor::<f32>::for_output(gpu, state_shape)?;
    let buffers = GatedBuffers {
        q: &q.data,
        k: &k.data,
        v: &v.data,
        g: inputs.g.map(|t| &t.data),
        fixed: fixed.as_ref(),
        beta: inputs.beta.map(|t| &t.data),
        state_in: inputs.initial_state.map(|t| &t.data),
        cu_seqlens: cu_seqlens.as_ref(),
    };
    match tensor_core_tiles::<T>(gpu, call, gate_width, rule.delta) {
        Some(shared) => {
            let launch = ChunkLaunch {
                gpu,
                call,
                shape,
                rule,
                sequences,
                cu_seqlens: inputs.cu_seqlens,
                shared,
            };
            launch.run::<T>(buffers, &mut out, &mut states, &mut bad)?;
        }
        None => {
            let (chunk, value_block, shared) = tiles(gpu, call, gate_width)?;
            let name = format!("gated_chunked_{}", T::NAME);
            let function = gpu.kernel_of(Source::Gated, &name, shared)?;
            let config = LaunchConfig {
                grid_dim: grid(call.heads_v, sequences, call.dim_v.div_ceil(value_block))?,
                block_dim: (GATED_THREADS, 1, 1),
                shared_mem_bytes: shared,
            };
            let mut launch = Buffers::on(&gpu.stream);
            let params = GatedParams {
                q: launch.read(buffers.q),
                k: launch.read(buffers.k),
                v: launch.read(buffers.v),
                out: launch.write(&mut out.data),
                g: launch.read_optional(buffers.g),
                fixed: launch.read_optional(buffers.fixed),
                beta: launch.read_optional(buffers.beta),
                state_in: launch.read_optional(buffers.state_in),
                state_out: launch.write(&mut states.data),
                cu_seqlens: launch.read_optional(buffers.cu_seqlens),
                bad: launch.write(&mut bad),
                scale: rule.scale,
                beta_max: rule.beta_max,
                gate_width: kernel_int(gate_width, "gate width")?,
                chunk: chunk as i32,
                value_block: value_block as i32,
                delta: rule.delta.into(),
                l2norm: rule.l2norm.into(),
            };
            // SAFETY: the parameters match the kernel's; every buffer is sized for the
            // shapes the caller checked, the output and states written whole by the grid.
            unsafe { launch.launch(&function, config, &(shape, params), &name) }?;
        }
    }
    Ok((out, states, first_out_of_range(gpu, &bad)?))
}

/// The inputs of a call on the GPU, as either path reads them.
struct GatedBuffers<'a, T> {
    q: &'a CudaSlice<T>,
    k: &'a CudaSlice<T>,
    v: &'a CudaSlice<T>,
    g: Option<&'a CudaSlice<f32>>,
    fixed: Option<&'a CudaSlice<f32>>,
    beta: Option<&'a CudaSlice<f32>>,
    state_in: Option<&'a CudaSlice<f32>>,
    cu_seqlens: Option<&'a CudaSlice<i64>>,
}

/// The scan kernel's dynamic shared memory where the tensor-core path takes a call (16-bit
/// inputs, d_k and d_v of 64 or 128, at most one log decay per token, and the GPU's shared
/// memory holds the tiles); `None` sends it to the general kernel. The sizes are
/// gated_mma.cu's `ScanTiles`: two stages of q, k, v, P (and W), then U and the decayed
/// U, 16-bit rows padded by PAD, and G in f32.
fn tensor_core_tiles<T: GpuElement>(
    gpu: &Gpu,
    call: GatedShape,
    gate_width: usize,
    delta: bool,
) -> Option<u32> {
    let widths = [64, 128];
    if T::NAME == "f32" || !widths.contains(&call.dim_k) || !widths.contains(&call.dim_v) {
        return None;
    }
    if gate_width > 1 {
        return None;
    }
    let (ldk, ldc, ldv) = (call.dim_k + PAD, CHUNK + PAD, GATED_COLUMNS + PAD);
    let w = if delta { 2 * CHUNK * ldc } else { 0 };
    let elements = 4 * CHUNK * ldk + 2 * CHUNK * ldv + 2 * CHUNK * ldc + w + 2 * CHUNK * ldv;
    let bytes = 2 * elements + 4 * CHUNK;
    (bytes <= gpu.shared_limit()).then_some(bytes as u32)
}

/// The dynamic shared memory of gated_mma.cu's `prepare` (its `PrepareTiles`): a chunk
/// of q and of k in 16-bit rows padded by PAD, or W and a block row's sums in f32 rows of
/// C + 1 once those are spent, whichever is larger; then A, G and β.
fn prepare_shared_bytes(dim_k: usize) -> u32 {
    let lda = CHUNK + 1;
    let rows_or_inverse = (4 * CHUNK * (dim_k + PAD)).max(4 * (CHUNK + 16) * lda);
    (rows_or_inverse + 4 * (CHUNK * lda + 2 * CHUNK)) as u32
}

/// `linattn::gated_mma::ChunkParams` in gated_mma.cu, which says what each field is for.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ChunkParams {
    q: CUdeviceptr,
    k: CUdeviceptr,
    v: CUdeviceptr,
    out: CUdeviceptr,
    g: CUdeviceptr,
    fixed: CUdeviceptr,
    beta: CUdeviceptr,
    state_in: CUdeviceptr,
    state_out: CUdeviceptr,
    cu_seqlens: CUdeviceptr,
    chunk_offsets: CUdeviceptr,
    scores: CUdeviceptr,
    w: CUdeviceptr,
    bad: CUdeviceptr,
    scale: f32,
    beta_max: f32,
    sequences: i32,
    l2norm: i32,
}

// SAFETY: plain old data with the layout of the kernel's struct (checked by a test).
unsafe impl DeviceRepr for ChunkParams {}

/// One call on the tensor-core path: `prepare` over every (chunk, value head), then `scan`
/// over (value head, sequence, COLUMNS value columns).
struct ChunkLaunch<'a> {
    gpu: &'a Gpu,
    call: GatedShape,
    shape: KernelShape,
    rule: GatedRule<'a>,
    sequences: usize,
    cu_seqlens: Option<&'a [usize]>,
    shared: u32,
}

impl ChunkLaunch<'_> {
    fn run<T: GpuElement>(
        &self,
        buffers: GatedBuffers<'_, T>,
        out: &mut GpuTensor<T>,
        states: &mut GpuTensor<f32>,
        bad: &mut CudaSlice<i64>,
    ) -> Result<()> {
        let (gpu, call) = (self.gpu, self.call);
        // Each sequence's first chunk; a packed batch's go to the kernels, batch rows'
        // they compute.
        let lengths: Vec<usize> = match self.cu_seqlens {
            Some(cu) => cu.windows(2).map(|w| w[1] - w[0]).collect(),
            None => vec![call.len; call.batch],
        };
        let mut offsets = vec![0usize];
        for len in &lengths {
            offsets.push(offsets.last().expect("one offset") + len.div_ceil(CHUNK));
        }
        let chunks = *offsets.last().expect("one offset");
        let chunk_offsets = match self.cu_seqlens {
            Some(_) => {
                let offsets = offsets
                    .iter()
                    .map(|&x| kernel_int(x, "chunks"))
                    .collect::<Result<Vec<_>>>()?;
                let copy = gpu.stream.clone_htod(&offsets);
                Some(copy.map_err(|e| cuda_error("copying the chunk offsets to the GPU", e))?)
            }
            None => None,
        };
        let tiles = [chunks.max(1), call.heads_v, CHUNK, CHUNK];
        let mut scores = GpuTensor::<T>::for_output(gpu, tiles)?;
        let mut w = match self.rule.delta {
            true => Some(GpuTensor::<T>::for_output(gpu, tiles)?),
            false => None,
        };
        let dk = call.dim_k;
        let kind = if self.rule.delta { "delta" } else { "plain" };
        if chunks > 0 {
            let name = format!("gated_prepare_{}_{dk}_{kind}", T::NAME);
            let shared = prepare_shared_bytes(dk);
            let function = gpu.kernel_of(Source::Gated, &name, shared)?;
            let config = LaunchConfig {
                grid_dim: grid(chunks, call.heads_v, 1)?,
                block_dim: (GATED_MMA_THREADS, 1, 1),
                shared_mem_bytes: shared,
            };
            let mut launch = Buffers::on(&gpu.stream);
            let params = ChunkParams {
                scores: launch.write(&mut scores.data),
                w: launch.write_optional(w.as_mut().map(|w| &mut w.data)),
                bad: launch.write(bad),
                ..self.inputs(&mut launch, &buffers, chunk_offsets.as_ref())
            };
            // SAFETY: the parameters match the kernel's; P and W are sized for every
            // chunk's C × C tile of every value head, which the grid writes whole.
            unsafe { launch.launch(&function, config, &(self.shape, params), &name) }?;
        }
        let name = format!("gated_scan_{}_{dk}_{kind}", T::NAME);
        let function = gpu.kernel_of(Source::Gated, &name, self.shared)?;
        let config = LaunchConfig {
            grid_dim: grid(call.heads_v, self.sequences, call.dim_v / GATED_COLUMNS)?,
            block_dim: (GATED_MMA_THREADS, 1, 1),
            shared_mem_bytes: self.shared,
        };
        let mut launch = Buffers::on(&gpu.stream);
        let params = ChunkParams {
            out: launch.write(&mut out.data),
            state_out: launch.write(&mut states.data),
            scores: launch.read(&scores.data),
            w: launch.read_optional(w.as_ref().map(|w| &w.data)),
            bad: launch.write(bad),
            ..self.inputs(&mut launch, &buffers, chunk_offsets.as_ref())
        };
        // SAFETY: the parameters match the kernel's; every buffer is sized for the shapes
        // the caller checked, the output and states written whole by the grid.
        unsafe { launch.launch(&function, config, &(self.shape, params), &name) }
    }

    /// The parameters both kernels read: the inputs and the call's scalars.
    fn inputs<'b, T>(
        &self,
        launch: &mut Buffers<'b>,
        buffers: &GatedBuffers<'b, T>,
        chunk_offsets: Option<&'b CudaSlice<i32>>,
    ) -> ChunkParams {
        ChunkParams {
            q: launch.read(buffers.q),
            k: launch.read(buffers.k),
            v: launch.read(buffers.v),
            g: launch.read_optional(buffers.g),
            fixed: launch.read_optional(buffers.fixed),
            beta: launch.read_optional(buffers.beta),
            state_in: launch.read_optional(buffers.state_in),
            cu_seqlens: launch.read_optional(buffers.cu_seqlens),
            chunk_offsets: launch.read_optional(chunk_offsets),
            scale: self.rule.scale,
            beta_max: self.rule.beta_max,
            sequences: self.sequences as i32,
            l2norm: self.rule.l2norm.into(),
            ..ChunkParams::default()
        }
    }
}

/// Threads of the decode step's blocks, the value columns each takes, and the widest key
/// head it holds (gated.cu's `DECODE_THREADS`, `DECODE_COLUMNS`, `DECODE_MAX_DIM`).
const DECODE_THREADS: u32 = 256;
const DECODE_COLUMNS: usize = 32;
const DECODE_MAX_DIM: usize = 256;

/// `linattn::gated::DecodeParams` in gated.cu.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DecodeParams {
    q: CUdeviceptr,
    k: CUdeviceptr,
    v: CUdeviceptr,
    out: CUdeviceptr,
    g: CUdeviceptr,
    fixed: CUdeviceptr,
    beta: CUdeviceptr,
    state: CUdeviceptr,
    bad: CUdeviceptr,
    scale: f32,
    beta_max: f32,
    gate_width: i32,
    delta: i32,
    l2norm: i32,
}

// SAFETY: plain old data with the layout of the kernel's struct (checked by a test).
unsafe impl DeviceRepr for DecodeParams {}

/// One recurrent step of one token per sequence (`call.len` = 1): the output `[batch, 1,
/// heads_v, dim_v]`, `states` (`[batch, heads_v, dim_k, dim_v]`) updated in place, and the
/// first g or β out of range, if any (the states are then meaningless).
pub(crate) fn gated_decode<T: GpuElement>(
    gpu: &Gpu,
    call: GatedShape,
    rule: GatedRule<'_>,
    [q, k, v]: [&GpuTensor<T>; 3],
    (g, beta): (Option<&GpuTensor<f32>>, Option<&GpuTensor<f32>>),
    states: &mut GpuTensor<f32>,
) -> Result<(GpuTensor<T>, Option<OutOfRange>)> {
    if call.dim_k > DECODE_MAX_DIM {
        return Err(Error::Unsupported(format!(
            "the gated family's decode step on the GPU holds key heads up to \
             {DECODE_MAX_DIM} wide, not {}",
            call.dim_k
        )));
    }
    let shape = KernelShape::of(call)?;
    let gate_width = gate_width(g, rule);
    let fixed = fixed_decays(gpu, rule)?;
    let mut bad = range_check(gpu)?;
    let mut out = GpuTensor::for_output(gpu, [call.batch, 1, call.heads_v, call.dim_v])?;
    let name = format!("gated_decode_{}", T::NAME);
    // q, k and the decays of one token, and the warps' partial sums (gated.cu's
    // `DECODE_SHARED` floats).
    let shared = (4 * (3 * DECODE_MAX_DIM + DECODE_THREADS as usize)) as u32;
    let function = gpu.kernel_of(Source::Gated, &name, shared)?;
    let config = LaunchConfig {
        grid_dim: grid(
            call.heads_v,
            call.batch,
            call.dim_v.div_ceil(DECODE_COLUMNS),
        )?,
        block_dim: (DECODE_THREADS, 1, 1),
        shared_mem_bytes: shared,
    };
    let mut launch = Buffers::on(&gpu.stream);
    let params = DecodeParams {
        q: launch.read(&q.data),
        k: launch.read(&k.data),
        v: launch.read(&v.data),
        out: launch.write(&mut out.data),
        g: launch.read_optional(g.map(|g| &g.data)),
        fixed: launch.read_optional(fixed.as_ref()),
        beta: launch.read_optional(beta.map(|b| &b.data)),
        state: launch.write(&mut states.data),
        bad: launch.write(&mut bad),
        scale: rule.scale,
        beta_max: rule.beta_max,
        gate_width: kernel_int(gate_width, "gate width")?,
        delta: rule.delta.into(),
        l2norm: rule.l2norm.into(),
    };
    // SAFETY: the parameters match the kernel's; the caller checked every shape, and the
    // grid writes the whole output and every state it reads.
    unsafe { launch.launch(&function, config, &(shape, params), &name) }?;
    Ok((out, first_out_of_range(gpu, &bad)?))
}

/// The first bad g (then β) the kernel reported in `bad` (from `range_check`).
fn first_out_of_range(gpu: &Gpu, bad: &CudaSlice<i64>) -> Result<Option<OutOfRange>> {
    let found = gpu
        .stream
        .clone_dtoh(bad)
        .map_err(|e| cuda_error("reading the range check", e))?;
    let at = |i: usize| {
        usize::try_from(found[i])
            .ok()
            .filter(|_| found[i] != i64::MAX)
    };
    Ok(match (at(0), at(1)) {
        (Some(at), _) => Some(OutOfRange::G(at)),
        (None, Some(at)) => Some(OutOfRange::Beta(at)),
        (None, None) => None,
    })
}

/// The chunk (rows), value columns per block and dynamic shared memory of a launch: the
/// block's columns of the state and values, q, k and decayed rows of a chunk, its C × C
/// scores, its log decays and β, all f32. Whole heads with the longest chunk that fits,
/// else the widest column block that does.
fn tiles(gpu: &Gpu, call: GatedShape, gate_width: usize) -> Result<(usize, usize, u32)> {
    let dk = call.dim_k;
    let bytes = |c: usize, columns: usize| {
        4 * (dk * columns + c * (3 * dk + columns + c + gate_width.max(1) + 1))
    };
    let narrower = GATED_VALUE_BLOCKS.into_iter().filter(|&w| w < call.dim_v);
    std::iter::once(call.dim_v)
        .chain(narrower)
        .flat_map(|columns| GATED_CHUNKS.map(|c| (c, columns)))
        .find(|&(c, columns)| bytes(c, columns) <= gpu.shared_limit())
        .map(|(c, columns)| (c, columns, bytes(c, columns) as u32))
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "the gated family on the GPU keeps columns of a {dk}-row state in shared \
                 memory; the narrowest block needs {} and the GPU allows {}",
                crate::ByteSize(bytes(8, 16) as u128),
                crate::ByteSize(gpu.shared_limit() as u128)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::struct_layout::{layout, rust_fields};

    #[test]
    fn kernel_params_lay_out_as_their_c_declaration() {
        // linattn::gated::GatedParams: eleven pointers (88 bytes) and seven 4-byte scalars,
        // padded to the pointers' alignment.
        let params = rust_fields!(GatedParams {
            q,
            k,
            v,
            out,
            g,
            fixed,
            beta,
            state_in,
            state_out,
            cu_seqlens,
            bad,
            scale,
            beta_max,
            gate_width,
            chunk,
            value_block,
            delta,
            l2norm,
        });
        layout::assert_mirrors::<GatedParams>(Source::Gated, "GatedParams", 120, &params);
    }

    #[test]
    fn decode_params_lay_out_as_their_c_declaration() {
        // linattn::gated::DecodeParams: nine pointers (72 bytes) and five 4-byte scalars,
        // padded to the pointers' alignment.
        let params = rust_fields!(DecodeParams {
            q,
            k,
            v,
            out,
            g,
            fixed,
            beta,
            state,
            bad,
            scale,
            beta_max,
            gate_width,
            delta,
            l2norm,
        });
        layout::assert_mirrors::<DecodeParams>(Source::Gated, "DecodeParams", 96, &params);
    }

    #[test]
    fn chunk_params_lay_out_as_their_c_declaration() {
        // linattn::gated_mma::ChunkParams: fourteen pointers (112 bytes) and four 4-byte
        // scalars.
        let params = rust_fields!(ChunkParams {
            q,
            k,
            v,
            out,
            g,
            fixed,
            beta,
            state_in,
            state_out,
            cu_seqlens,
            chunk_offsets,
            scores,
            w,
            bad,
            scale,
            beta_max,
            sequences,
            l2norm,
        });
        layout::assert_mirrors::<ChunkParams>(Source::Gated, "ChunkParams", 128, &params);
    }
}
