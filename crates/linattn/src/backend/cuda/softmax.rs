//! Launches of exact softmax attention (softmax.cu): full, causal or windowed.

use super::device::{Gpu, Source, grid, launch};
use super::tensor::{GpuElement, GpuTensor};
use super::tiles::{
    FLASH_ROWS, FLASH_THREADS, GENERAL_EXACT_KEYS, GENERAL_EXACT_MAX_DIM, GENERAL_EXACT_ROWS,
    GENERAL_EXACT_THREADS,
};
use crate::base::{Error, Problem, Result};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

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
    left: i32,
    right: i32,
    scale_log2: f32,
}

// SAFETY: plain old data with the layout of the kernel's struct.
unsafe impl DeviceRepr for FlashProblem {}

impl FlashProblem {
    /// The kernels' arguments for `problem` with `mask`, or why they do not take it.
    fn of(problem: &Problem, mask: ExactMask) -> Result<Self> {
        let dim = problem.dim_qk;
        if dim.max(problem.dim_v) > GENERAL_EXACT_MAX_DIM {
            return Err(Error::Unsupported(format!(
                "exact attention on the GPU takes head dims up to {GENERAL_EXACT_MAX_DIM}, \
                 not {dim} and {}",
                problem.dim_v
            )));
        }
        let scale = mask.scale;
        let int = |x: usize, what: &str| {
            i32::try_from(x).map_err(|_| {
                Error::Unsupported(format!("{what} {x} is too large for the GPU kernels"))
            })
        };
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
            left: bound(mask.left),
            right: bound(mask.right),
            scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
        })
    }
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
    let arguments = FlashProblem::of(problem, mask)?;
    let (dim_k, dim_v) = (problem.dim_qk, problem.dim_v);
    let blocks = |rows| problem.len_q.div_ceil(rows);
    if size_of::<T>() == 2 && dim_k == dim_v && matches!(dim_k, 64 | 128) {
        // The query tile and two stages of key and value tiles, rows padded by 8 elements.
        let shared = 5 * FLASH_ROWS * (dim_k + 8) * size_of::<T>();
        let config = LaunchConfig {
            grid_dim: grid(blocks(FLASH_ROWS), problem.heads_q, problem.batch)?,
            block_dim: (FLASH_THREADS, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let name = format!("softmax_forward_{}_d{dim_k}", T::NAME);
        let function = gpu.kernel_of(Source::Softmax, &name, config.shared_mem_bytes)?;
        let mut args = gpu.stream.launch_builder(&function);
        args.arg(&q.data)
            .arg(&k.data)
            .arg(&v.data)
            .arg(&mut out.data)
            .arg(&arguments);
        // SAFETY: the tensor-core kernel's arguments; `problem` checked the shapes.
        return unsafe { launch(args, config, &name) };
    }
    // A tile of keys and one of values, f32.
    let shared = GENERAL_EXACT_KEYS * (dim_k + dim_v) * 4;
    let config = LaunchConfig {
        grid_dim: grid(blocks(GENERAL_EXACT_ROWS), problem.heads_q, problem.batch)?,
        block_dim: (GENERAL_EXACT_THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    let name = format!("softmax_forward_general_{}", T::NAME);
    let function = gpu.kernel_of(Source::Softmax, &name, config.shared_mem_bytes)?;
    let mut args = gpu.stream.launch_builder(&function);
    let (dim_k, dim_v) = (dim_k as i32, dim_v as i32);
    args.arg(&q.data)
        .arg(&k.data)
        .arg(&v.data)
        .arg(&mut out.data)
        .arg(&arguments)
        .arg(&dim_k)
        .arg(&dim_v);
    // SAFETY: the general kernel's arguments; `problem` checked the shapes.
    unsafe { launch(args, config, &name) }
}

#[cfg(test)]
mod tests {
    use super::*;

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
