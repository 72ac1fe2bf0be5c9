//! Launches of the FAVOR+ kernels (performer.cu): non-causal Performer in three passes.

use super::device::{Buffers, Gpu, Source, cuda_error, grid};
use super::linear::{FULL_SPAN, KernelShape, carved_bytes, value_block};
use super::tensor::{GpuElement, GpuTensor};
use super::tiles::{CHUNK, PAD, PERFORMER_MAX_FEATURES};
use crate::base::{Error, Problem, Result};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};

/// The widest heads the FAVOR+ kernels hold (the projection's rows in shared memory).
const PERFORMER_MAX_DIM: usize = 128;
/// Threads per block of the FAVOR+ kernels.
const PERFORMER_THREADS: u32 = 256;

/// What the FAVOR+ kernels take beside the [`KernelShape`] and the feature count
/// (`linattn::performer::PerformerParams` in performer.cu, which says what each field is
/// for and why the count travels apart): device addresses, 0 for none, then the scalars. A
/// kernel reads the fields it uses; the default leaves the others null or 0.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PerformerParams {
    q: CUdeviceptr,
    k: CUdeviceptr,
    v: CUdeviceptr,
    omega: CUdeviceptr,
    out: CUdeviceptr,
    states: CUdeviceptr,
    k_sums: CUdeviceptr,
    v_sums: CUdeviceptr,
    maxima: CUdeviceptr,
    state: CUdeviceptr,
    k_sum: CUdeviceptr,
    span: i32,
    spans: i32,
    ratio: f32,
    eps: f32,
    constant: f32,
}

// SAFETY: plain old data with the layout of the kernels' struct (checked by a test).
unsafe impl DeviceRepr for PerformerParams {}

/// [`carved_bytes`] as a launch's dynamic shared memory.
fn shared_bytes(arrays: &[(usize, usize)]) -> Result<u32> {
    u32::try_from(carved_bytes(arrays))
        .map_err(|_| Error::Unsupported("shared memory beyond 4 GiB".into()))
}

/// Refuses what the FAVOR+ kernels do not take: `problem` with `features` random
/// features (the caller asks before it draws ω; [`performer_full`] asks again).
pub(crate) fn performer_supported(problem: &Problem, features: usize) -> Result<()> {
    if problem.causal {
        return Err(Error::Unsupported(
            "performer's causal form does not run on the GPU yet (its non-causal form does)".into(),
        ));
    }
    if problem.len_q != problem.len_k {
        return Err(Error::ShapeMismatch {
            detail: format!(
                "on the GPU q and k must have the same length, not {} and {}",
                problem.len_q, problem.len_k
            ),
        });
    }
    let dim = problem.dim_qk;
    if !dim.is_multiple_of(16)
        || dim > PERFORMER_MAX_DIM
        || !features.is_multiple_of(16)
        || features > PERFORMER_MAX_FEATURES
    {
        return Err(Error::Unsupported(format!(
            "performer on the GPU takes head dims and feature counts that are multiples of 16, \
             up to {PERFORMER_MAX_DIM} and {PERFORMER_MAX_FEATURES}, not {dim} and {features}"
        )));
    }
    Ok(())
}

/// FAVOR+'s `m × D` projection on the GPU (row-major, m random features), scaled by
/// `D^(-1/4)` (what FAVOR+ does to q and k, folded in) and rounded once to the inputs' type:
/// uploaded once per plan, read by every call.
pub(crate) struct PerformerOmega<T> {
    data: CudaSlice<T>,
    features: usize,
}

impl<T: GpuElement> PerformerOmega<T> {
    /// Uploads `omega`, `features × dim` in f64 as the CPU draws it.
    pub(crate) fn upload(gpu: &Gpu, omega: &[f64], dim: usize) -> Result<Self> {
        let scale = (dim as f64).powf(-0.25);
        let scaled: Vec<T> = omega
            .iter()
            .map(|&w| T::from_f32((w * scale) as f32))
            .collect();
        let data = gpu
            .stream
            .clone_htod(&scaled)
            .map_err(|e| cuda_error("copying omega to the GPU", e))?;
        Ok(Self {
            data,
            features: omega.len() / dim,
        })
    }
}

/// Non-causal Performer (FAVOR+) on the GPU: the key pass per span, the merge of the
/// spans, the query pass, each mapping its rows itself. `epsilon` is what FAVOR+ adds to
/// every feature.
pub(crate) fn performer_full<T: GpuElement>(
    gpu: &Gpu,
    problem: &Problem,
    omega: &PerformerOmega<T>,
    epsilon: f64,
    [q, k, v]: [&GpuTensor<T>; 3],
) -> Result<GpuTensor<T>> {
    let (dim, dim_v) = (problem.dim_qk, problem.dim_v);
    let features = omega.features;
    performer_supported(problem, features)?;
    let omega = &omega.data;
    let element = size_of::<T>();
    let block = value_block(dim_v);
    let shape = KernelShape::of(problem, block)?;
    let (batch, heads_kv) = (problem.batch, problem.heads_kv);
    let spans = problem.len_k.div_ceil(FULL_SPAN);
    let head_spans = batch * heads_kv * spans;
    let mut states = gpu.alloc::<f32>(head_spans * features * dim_v)?;
    let mut k_sums = gpu.alloc::<f32>(head_spans * features)?;
    let mut v_sums = gpu.alloc::<f32>(head_spans * dim_v)?;
    let mut maxima = gpu.alloc::<f32>(head_spans)?;
    let ratio = (features as f32).powf(-0.5);
    // What every pass reads; each adds its buffers.
    let features_arg = features as i32;
    let scalars = PerformerParams {
        span: FULL_SPAN as i32,
        spans: spans as i32,
        ratio,
        eps: epsilon as f32,
        constant: ratio * epsilon as f32,
        ..PerformerParams::default()
    };

    let shared = shared_bytes(&[
        (CHUNK * (dim + PAD), element),
        (CHUNK * (features + PAD), 4),
        (CHUNK * (block + PAD), element),
        (features * (block + PAD), 4),
        (features, 4),
        (block, 4),
        (CHUNK, 4),
        (32, 4),
    ])?;
    let name = format!("performer_keys_{}", T::NAME);
    let function = gpu.kernel_of(Source::Performer, &name, shared)?;
    let config = LaunchConfig {
        grid_dim: grid(dim_v.div_ceil(block), heads_kv, batch * spans)?,
        block_dim: (PERFORMER_THREADS, 1, 1),
        shared_mem_bytes: shared,
    };
    let mut buffers = Buffers::on(&gpu.stream);
    let params = PerformerParams {
        k: buffers.read(&k.data),
        v: buffers.read(&v.data),
        omega: buffers.read(omega),
        states: buffers.write(&mut states),
        k_sums: buffers.write(&mut k_sums),
        v_sums: buffers.write(&mut v_sums),
        maxima: buffers.write(&mut maxima),
        ..scalars
    };
    // SAFETY: the key pass's parameters; the span sums sized for its grid.
    unsafe { buffers.launch(&function, config, &(shape, features_arg, params), &name) }?;

    let mut state = gpu.alloc::<f32>(batch * heads_kv * features * dim_v)?;
    let mut k_sum = gpu.alloc::<f32>(batch * heads_kv * features)?;
    let function = gpu.kernel_of(Source::Performer, "performer_merge", 0)?;
    let config = LaunchConfig {
        grid_dim: grid(heads_kv, batch, 1)?,
        block_dim: (PERFORMER_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut buffers = Buffers::on(&gpu.stream);
    let params = PerformerParams {
        states: buffers.read(&states),
        k_sums: buffers.read(&k_sums),
        v_sums: buffers.read(&v_sums),
        maxima: buffers.read(&maxima),
        state: buffers.write(&mut state),
        k_sum: buffers.write(&mut k_sum),
        ..scalars
    };
    // SAFETY: the merge's parameters, the span sums the key pass wrote.
    unsafe {
        buffers.launch(
            &function,
            config,
            &(shape, features_arg, params),
            "performer_merge",
        )
    }?;

    let mut out = GpuTensor::for_output(gpu, problem.out_shape())?;
    let shared = shared_bytes(&[
        (CHUNK * (dim + PAD), element),
        (CHUNK * (features + PAD), 4),
        (features * (block + PAD), element),
        (CHUNK * (block + PAD), 4),
        (features, 4),
        (CHUNK, 4),
        (CHUNK, 4),
    ])?;
    let name = format!("performer_apply_{}", T::NAME);
    let function = gpu.kernel_of(Source::Performer, &name, shared)?;
    let config = LaunchConfig {
        grid_dim: grid(dim_v.div_ceil(block), problem.heads_q, batch * spans)?,
        block_dim: (PERFORMER_THREADS, 1, 1),
        shared_mem_bytes: shared,
    };
    let mut buffers = Buffers::on(&gpu.stream);
    let params = PerformerParams {
        q: buffers.read(&q.data),
        omega: buffers.read(omega),
        out: buffers.write(&mut out.data),
        state: buffers.read(&state),
        k_sum: buffers.read(&k_sum),
        ..scalars
    };
    // SAFETY: the query pass's parameters and the merged state.
    unsafe { buffers.launch(&function, config, &(shape, features_arg, params), &name) }?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::struct_layout::{layout, rust_fields};

    #[test]
    fn kernel_params_lay_out_as_their_c_declaration() {
        // linattn::performer::PerformerParams: eleven pointers (88 bytes) and five 4-byte
        // scalars, padded to the pointers' alignment.
        let params = rust_fields!(PerformerParams {
            q,
            k,
            v,
            omega,
            out,
            states,
            k_sums,
            v_sums,
            maxima,
            state,
            k_sum,
            span,
            spans,
            ratio,
            eps,
            constant,
        });
        layout::assert_mirrors::<PerformerParams>(
            Source::Performer,
            "PerformerParams",
            112,
            &params,
        );
    }
}
