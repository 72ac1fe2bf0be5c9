//! Launches of exact softmax attention (softmax.cu): full, causal or windowed.

use super::device::{Buffers, Gpu, Source, grid, kernel_int};
use super::tensor::{GpuElement, GpuTensor};
use super::tiles::{
    FLASH_ROWS, FLASH_THREADS, GENERAL_EXACT_KEYS, GENERAL_EXACT_MAX_DIM, GENERAL_EXACT_ROWS,
    GENERAL_EXACT_THREADS,
};
use crate::base::{Error, Problem, Result};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};

/// Which keys exact attention sees (`left` keys back and `right` forward of each query's
/// position, unbounded where `None`), and the scale of its scores.
#[derive(Clone, Copy)]
pub(crate) struct ExactMask {
    pub(crate) scale: f64,
    pub(crate) left: Option<usize>,
    pub(crate) right: Option<usize>,
}

/// The exact kernel's view of a problem (`linattn::flash::Problem` in the source).
#[repr(C)]
#[derive(Clone, Copy)]
struct FlashProblem {
    batch: i32,
    len_q: i32,
    len_k: i32,
    heads_q: i32,
    heads_kv: i32,
    q_start: i32,
    kv_rows: i32,
    left: i32,
    right: i32,
    scale_log2: f32,
}

// SAFETY: plain old data with the layout of the kernel's struct.
unsafe impl DeviceRepr for FlashProblem {}

/// Where the keys of a call lie: the key position of the first query and the rows each
/// sequence's k and v hold (past `len_k` for a cache with room to grow).
#[derive(Clone, Copy)]
pub(crate) struct KeyRows {
    pub(crate) q_start: usize,
    pub(crate) rows: usize,
}

impl FlashProblem {
    /// The kernels' arguments for one call on `problem` with `mask`, queries and keys
    /// starting together, or why they do not take it.
    fn of(problem: &Problem, mask: ExactMask) -> Result<Self> {
        let keys = KeyRows {
            q_start: 0,
            rows: problem.len_k,
        };
        Self::with_keys(problem, mask, keys)
    }

    /// The kernels' arguments for queries that start at `keys.q_start` among the keys.
    fn with_keys(problem: &Problem, mask: ExactMask, keys: KeyRows) -> Result<Self> {
        let dim = problem.dim_qk;
        if dim.max(problem.dim_v) > GENERAL_EXACT_MAX_DIM {
            return Err(Error::Unsupported(format!(
                "exact attention on the GPU takes head dims up to {GENERAL_EXACT_MAX_DIM}, \
                 not {dim} and {}",
                problem.dim_v
            )));
        }
        let scale = mask.scale;
        let int = kernel_int;
        let (len_q, len_k) = (
            int(problem.len_q, "query length")?,
            int(problem.len_k, "key length")?,
        );
        // Windows as wide as the sequences are no windows: -1, which the kernel reads as
        // unbounded (and which keeps its index arithmetic within i32).
        let longest = len_q.max(len_k) as usize;
        let bound = |side: Option<usize>| side.filter(|&x| x < longest).map_or(-1, |x| x as i32);
        Ok(Self {
            batch: int(problem.batch, "batch")?,
            len_q,
            len_k,
            heads_q: int(problem.heads_q, "query heads")?,
            heads_kv: int(problem.heads_kv, "kv heads")?,
            q_start: int(keys.q_start, "query position")?,
            kv_rows: int(keys.rows, "key rows")?,
            left: bound(mask.left),
            right: bound(mask.right),
            scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
        })
    }
}

/// What both exact kernels take beside the [`FlashProblem`] (`linattn::flash::SoftmaxParams`
/// in softmax.cu): the tensors' device addresses and the head dims the general kernel
/// reads.
#[repr(C)]
#[derive(Clone, Copy)]
struct SoftmaxParams {
    q: CUdeviceptr,
    k: CUdeviceptr,
    v: CUdeviceptr,
    out: CUdeviceptr,
    dim_k: i32,
    dim_v: i32,
}

// SAFETY: plain old data with the layout of the kernels' struct (checked by a test).
unsafe impl DeviceRepr for SoftmaxParams {}

/// Whether the exact kernels take `problem` with `mask`, before any launch.
pub(crate) fn softmax_supported(problem: &Problem, mask: ExactMask) -> Result<()> {
    FlashProblem::of(problem, mask).map(drop)
}

/// Exact softmax attention: on the tensor cores for 16-bit tensors with head dims of 64
/// or 128 (a block per 64 query rows, head and batch), on the CUDA cores otherwise (a
/// block per 32 rows; f32 stays f32 throughout).
pub(crate) fn softmax_forward<T: GpuElement>(
    gpu: &Gpu,
    problem: &Problem,
    mask: ExactMask,
    [q, k, v]: [&GpuTensor<T>; 3],
    out: &mut GpuTensor<T>,
) -> Result<()> {
    let flash_problem = FlashProblem::of(problem, mask)?;
    launch(
        gpu,
        problem,
        flash_problem,
        [&q.data, &k.data, &v.data],
        out,
    )
}

/// [`softmax_forward`] for queries at `keys.q_start` onwards over keys held in buffers of
/// `keys.rows` rows per sequence: a decoder's block against its cache.
pub(crate) fn softmax_continue<T: GpuElement>(
    gpu: &Gpu,
    problem: &Problem,
    mask: ExactMask,
    keys: KeyRows,
    [q, k, v]: [&CudaSlice<T>; 3],
    out: &mut GpuTensor<T>,
) -> Result<()> {
    let flash_problem = FlashProblem::with_keys(problem, mask, keys)?;
    launch(gpu, problem, flash_problem, [q, k, v], out)
}

fn launch<T: GpuElement>(
    gpu: &Gpu,
    problem: &Problem,
    flash_problem: FlashProblem,
    [q, k, v]: [&CudaSlice<T>; 3],
    out: &mut GpuTensor<T>,
) -> Result<()> {
    let (dim_k, dim_v) = (problem.dim_qk, problem.dim_v);
    let blocks = |rows| problem.len_q.div_ceil(rows);
    let (name, config) = if size_of::<T>() == 2 && dim_k == dim_v && matches!(dim_k, 64 | 128) {
        // The query tile and two stages of key and value tiles, rows padded by 8 elements.
        let shared = 5 * FLASH_ROWS * (dim_k + 8) * size_of::<T>();
        let config = LaunchConfig {
            grid_dim: grid(blocks(FLASH_ROWS), problem.heads_q, problem.batch)?,
            block_dim: (FLASH_THREADS, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        (format!("softmax_forward_{}_d{dim_k}", T::NAME), config)
    } else {
        // A tile of keys and one of values, f32.
        let shared = GENERAL_EXACT_KEYS * (dim_k + dim_v) * 4;
        let config = LaunchConfig {
            grid_dim: grid(blocks(GENERAL_EXACT_ROWS), problem.heads_q, problem.batch)?,
            block_dim: (GENERAL_EXACT_THREADS, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        (format!("softmax_forward_general_{}", T::NAME), config)
    };
    let function = gpu.kernel_of(Source::Softmax, &name, config.shared_mem_bytes)?;
    let mut buffers = Buffers::on(&gpu.stream);
    let params = SoftmaxParams {
        q: buffers.read(q),
        k: buffers.read(k),
        v: buffers.read(v),
        out: buffers.write(&mut out.data),
        dim_k: dim_k as i32,
        dim_v: dim_v as i32,
    };
    // SAFETY: the kernel's parameters; `problem` checked the shapes.
    unsafe { buffers.launch(&function, config, &(flash_problem, params), &name) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::struct_layout::{layout, rust_fields};

    #[test]
    fn kernel_params_lay_out_as_their_c_declarations() {
        // linattn::flash::Problem: nine ints and a float.
        let problem = rust_fields!(FlashProblem {
            batch,
            len_q,
            len_k,
            heads_q,
            heads_kv,
            q_start,
            kv_rows,
            left,
            right,
            scale_log2,
        });
        layout::assert_mirrors::<FlashProblem>(Source::Softmax, "Problem", 40, &problem);
        // linattn::flash::SoftmaxParams: four pointers (32 bytes) and two ints.
        let params = rust_fields!(SoftmaxParams {
            q,
            k,
            v,
            out,
            dim_k,
            dim_v,
        });
        layout::assert_mirrors::<SoftmaxParams>(Source::Softmax, "SoftmaxParams", 40, &params);
    }

    #[test]
    fn exact_kernel_arguments_carry_the_mask_and_scale() {
        // Causal attention takes as many queries as keys; full attention any.
        let problem = |causal, dim_v| {
            let len_q = if causal { 300 } else { 100 };
            Problem::new(
                [2, len_q, 4, 64],
                [2, 300, 2, 64],
                [2, 300, 2, dim_v],
                causal,
            )
            .unwrap()
        };
        // The default scale, 1/√64.
        let mask = |left, right| ExactMask {
            scale: 0.125,
            left,
            right,
        };
        let args = FlashProblem::of(&problem(false, 64), mask(Some(7), Some(300))).unwrap();
        assert_eq!(
            (args.len_q, args.len_k, args.heads_q, args.heads_kv),
            (100, 300, 4, 2)
        );
        // One call: queries start with the keys, which fill their buffers.
        assert_eq!((args.q_start, args.kv_rows), (0, 300));
        // 7 keys back; 300 forward reach past every key, so they are no bound.
        assert_eq!((args.left, args.right), (7, -1));
        assert!((args.scale_log2 - std::f32::consts::LOG2_E / 8.0).abs() < 1e-6);
        let scaled = ExactMask {
            scale: 0.5,
            ..mask(None, Some(0))
        };
        let args = FlashProblem::of(&problem(true, 64), scaled).unwrap();
        assert_eq!((args.left, args.right), (-1, 0));
        assert!((args.scale_log2 - 0.5 * std::f32::consts::LOG2_E).abs() < 1e-6);
        // Value dims unlike the keys' are taken; dims past what a thread holds are refused.
        assert!(FlashProblem::of(&problem(false, 200), mask(None, None)).is_ok());
        let error = FlashProblem::of(&problem(false, 300), mask(None, None))
            .err()
            .unwrap();
        assert!(
            matches!(&error, Error::Unsupported(m) if m.contains("up to 256")),
            "{error}"
        );
    }
}
