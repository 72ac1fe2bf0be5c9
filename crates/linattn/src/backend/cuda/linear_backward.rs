//! Launches of the training kernels (linear_backward.cu): the causal forward that keeps
//! each row's denominator, and the gradients of causal linear attention.

use super::device::{Buffers, Gpu, Source, allocation_error, grid};
use super::linear::{KernelShape, LinearParams, LinearPlan, Pass, Segments, linear_causal};
use super::tensor::{GpuElement, GpuForward, GpuGradients, GpuTensor};
use super::tiles::CHUNK;
use crate::base::{Error, Problem, Result};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{DeviceRepr, LaunchConfig};

/// What the backward pass's own kernels take beside the [`KernelShape`]
/// (`linattn::backward::BackwardParams` in linear_backward.cu, which says what each field
/// is for): device addresses, 0 for none, then the row count. A kernel reads the fields it
/// uses; the default leaves the others null or 0.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct BackwardParams {
    q: CUdeviceptr,
    k: CUdeviceptr,
    out: CUdeviceptr,
    d_out: CUdeviceptr,
    den: CUdeviceptr,
    g: CUdeviceptr,
    h: CUdeviceptr,
    phi_q: CUdeviceptr,
    phi_k: CUdeviceptr,
    a: CUdeviceptr,
    bk: CUdeviceptr,
    key_sums: CUdeviceptr,
    weighted_query_sums: CUdeviceptr,
    dq: CUdeviceptr,
    dk: CUdeviceptr,
    rows: i64,
}

// SAFETY: plain old data with the layout of the kernels' struct (checked by a test).
unsafe impl DeviceRepr for BackwardParams {}

/// The causal forward that also keeps each row's denominator for [`linear_backward`]
/// (bf16, as the backward kernels take).
pub(crate) fn linear_forward_training(
    gpu: &Gpu,
    problem: &Problem,
    [q, k, v]: [&GpuTensor<half::bf16>; 3],
    epsilon: f32,
) -> Result<GpuForward> {
    let mut out = GpuTensor::for_output(gpu, problem.out_shape())?;
    let rows = problem.batch * problem.len_q * problem.heads_q;
    // SAFETY: the causal kernel writes every row's denominator.
    let mut den =
        unsafe { gpu.stream.alloc::<f32>(rows) }.map_err(|e| allocation_error::<f32>(rows, e))?;
    linear_causal(
        gpu,
        problem,
        [q, k, v],
        epsilon,
        &mut out,
        None,
        None,
        Some(&mut den),
    )?;
    Ok(GpuForward { out, den })
}

/// ∂loss/∂q, ∂loss/∂k and ∂loss/∂v of causal linear attention from ∂loss/∂out and what
/// [`linear_forward_training`] kept of the same call: three passes of the causal
/// tensor-core kernel without feature map or denominator (one causal, two walking the
/// sequence backwards) and prefix sums for the denominator's terms.
pub(crate) fn linear_backward(
    gpu: &Gpu,
    problem: &Problem,
    [q, k, v]: [&GpuTensor<half::bf16>; 3],
    forward: &GpuForward,
    d_out: &GpuTensor<half::bf16>,
) -> Result<GpuGradients<half::bf16>> {
    for (what, shape) in [
        ("output gradient", d_out.shape),
        ("saved output", forward.out.shape),
    ] {
        if shape != problem.out_shape() {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "the {what} has shape {shape:?} but the output has shape {:?}",
                    problem.out_shape()
                ),
            });
        }
    }
    let (out, den) = (&forward.out, &forward.den);
    let shape = problem.out_shape();
    let rows = problem.batch * problem.len_q * problem.heads_q;
    // SAFETY (the allocations below): each buffer is written in full by the kernel
    // that produces it before any kernel reads it.
    let floats = |count: usize| {
        unsafe { gpu.stream.alloc::<f32>(count) }.map_err(|e| allocation_error::<f32>(count, e))
    };
    let tensor = || GpuTensor::<half::bf16>::for_output(gpu, shape);

    let dim = problem.dim_qk;
    let shape_arg = KernelShape::of(problem, dim)?;
    let (mut g, mut phi_q, mut phi_k) = (tensor()?, tensor()?, tensor()?);
    let mut h = floats(rows)?;
    // The prepare kernel gives each row dim/4 threads of 256 per block.
    const THREADS: usize = 256;
    let name = format!("linear_backward_prepare_bf16_d{dim}");
    let function = gpu.kernel_of(Source::LinearBackward, &name, 0)?;
    let config = LaunchConfig {
        grid_dim: grid((rows * dim / 4).div_ceil(THREADS), 1, 1)?,
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut buffers = Buffers::on(&gpu.stream);
    let params = BackwardParams {
        q: buffers.read(&q.data),
        k: buffers.read(&k.data),
        out: buffers.read(&out.data),
        d_out: buffers.read(&d_out.data),
        den: buffers.read(den),
        g: buffers.write(&mut g.data),
        h: buffers.write(&mut h),
        phi_q: buffers.write(&mut phi_q.data),
        phi_k: buffers.write(&mut phi_k.data),
        rows: rows as i64,
        ..BackwardParams::default()
    };
    // SAFETY: the prepare kernel's parameters, each [B, T, H, D] or [B, T, H].
    unsafe { buffers.launch(&function, config, &(shape_arg, params), &name) }?;

    // The first terms of dφ(q) and dφ(k) nearly cancel what the prefix sums add to
    // them (g_i · v_j + h_i = g_i · (v_j − o_i)): they stay in f32.
    let (mut a, mut bk) = (
        GpuTensor::<f32>::for_output(gpu, shape)?,
        GpuTensor::<f32>::for_output(gpu, shape)?,
    );
    let mut dv = tensor()?;
    linear_plain(gpu, problem, [&g, v, &phi_k], &mut a, false)?;
    linear_plain(gpu, problem, [v, &g, &phi_q], &mut bk, true)?;
    linear_plain(gpu, problem, [&phi_k, &phi_q, &g], &mut dv, true)?;

    let chunks = problem.len_q.div_ceil(CHUNK);
    let sums = problem.batch * problem.heads_q * chunks * dim;
    let (mut key_sums, mut query_sums) = (floats(sums)?, floats(sums)?);
    let per_chunk = LaunchConfig {
        grid_dim: grid(chunks, problem.heads_q, problem.batch)?,
        block_dim: (dim as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let name = format!("linear_backward_chunk_sums_bf16_d{dim}");
    let function = gpu.kernel_of(Source::LinearBackward, &name, 0)?;
    let mut buffers = Buffers::on(&gpu.stream);
    let params = BackwardParams {
        phi_q: buffers.read(&phi_q.data),
        phi_k: buffers.read(&phi_k.data),
        h: buffers.read(&h),
        key_sums: buffers.write(&mut key_sums),
        weighted_query_sums: buffers.write(&mut query_sums),
        ..BackwardParams::default()
    };
    // SAFETY: the chunk-sums kernel's parameters, sized for its grid.
    unsafe { buffers.launch(&function, per_chunk, &(shape_arg, params), &name) }?;

    let name = format!("linear_backward_scan_bf16_d{dim}");
    let function = gpu.kernel_of(Source::LinearBackward, &name, 0)?;
    let per_head = LaunchConfig {
        grid_dim: grid(problem.heads_q, problem.batch, 1)?,
        block_dim: (dim as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut buffers = Buffers::on(&gpu.stream);
    let params = BackwardParams {
        key_sums: buffers.write(&mut key_sums),
        weighted_query_sums: buffers.write(&mut query_sums),
        ..BackwardParams::default()
    };
    // SAFETY: the scan kernel's parameters, the sums as the chunk-sums kernel wrote them.
    unsafe { buffers.launch(&function, per_head, &(shape_arg, params), &name) }?;

    let (mut dq, mut dk) = (tensor()?, tensor()?);
    let name = format!("linear_backward_finish_bf16_d{dim}");
    let function = gpu.kernel_of(Source::LinearBackward, &name, 0)?;
    let mut buffers = Buffers::on(&gpu.stream);
    let params = BackwardParams {
        q: buffers.read(&q.data),
        k: buffers.read(&k.data),
        h: buffers.read(&h),
        a: buffers.read(&a.data),
        bk: buffers.read(&bk.data),
        key_sums: buffers.read(&key_sums),
        weighted_query_sums: buffers.read(&query_sums),
        dq: buffers.write(&mut dq.data),
        dk: buffers.write(&mut dk.data),
        ..BackwardParams::default()
    };
    let two_columns_per_thread = LaunchConfig {
        block_dim: (dim as u32 / 2, 1, 1),
        ..per_chunk
    };
    // SAFETY: the finishing kernel's parameters, all [B, T, H, D], [B, T, H] or the
    // scanned sums.
    unsafe {
        buffers.launch(
            &function,
            two_columns_per_thread,
            &(shape_arg, params),
            &name,
        )
    }?;
    Ok(GpuGradients { dq, dk, dv })
}

/// `Σ_{j ≤ i} (q_i · k_j) v_j` for every row i, or `Σ_{j ≥ i}` when `reverse`: linear
/// attention without feature map or denominator, the terms of the backward pass, on the
/// causal tensor-core kernel (bf16 operands, `D_k = D_v` in {64, 128}), into `out` in
/// f32 or bf16 (the instances linear_backward.cu has).
fn linear_plain<O: GpuElement>(
    gpu: &Gpu,
    problem: &Problem,
    [q, k, v]: [&GpuTensor<half::bf16>; 3],
    out: &mut GpuTensor<O>,
    reverse: bool,
) -> Result<()> {
    let plan = LinearPlan::new::<half::bf16>(problem)?;
    let dim = plan.tensor_core_dim.ok_or_else(|| {
        Error::Unsupported("the plain passes take bf16 head dims of 64 or 128".into())
    })?;
    let direction = if reverse { "anticausal_" } else { "" };
    let state_name = format!("linear_{direction}state_plain_bf16_d{dim}");
    let segments = Segments::of(
        gpu,
        problem,
        &plan,
        [k, v],
        (Source::LinearBackward, &state_name),
    )?;
    let config = plan.config(Pass::Causal, segments.count, problem.heads_q)?;
    let causality = if reverse { "anticausal" } else { "causal" };
    let name = format!("linear_{causality}_plain_bf16_{}_d{dim}", O::NAME);
    let function = gpu.kernel_of(Source::LinearBackward, &name, config.shared_mem_bytes)?;
    let mut buffers = Buffers::on(&gpu.stream);
    let params = LinearParams {
        q: buffers.read(&q.data),
        k: buffers.read(&k.data),
        v: buffers.read(&v.data),
        out: buffers.write(&mut out.data),
        partial_states: buffers.read_optional(segments.sums.as_ref().map(|(kv, _)| kv)),
        span: segments.span as i32,
        parts: segments.parts as i32,
        ..LinearParams::default()
    };
    // SAFETY: the plain kernel's parameters; the segment sums cover its segments.
    unsafe { buffers.launch(&function, config, &(plan.shape, params), &name) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::struct_layout::{layout, rust_fields};

    #[test]
    fn kernel_params_lay_out_as_their_c_declaration() {
        // linattn::backward::BackwardParams: fifteen pointers (120 bytes) and a long long.
        let params = rust_fields!(BackwardParams {
            q,
            k,
            out,
            d_out,
            den,
            g,
            h,
            phi_q,
            phi_k,
            a,
            bk,
            key_sums,
            weighted_query_sums,
            dq,
            dk,
            rows,
        });
        layout::assert_mirrors::<BackwardParams>(
            Source::LinearBackward,
            "BackwardParams",
            128,
            &params,
        );
    }
}
