//! What a call must cost at least, and what this machine can do: the floor a measured
//! time is read against.

use crate::attention::{Attention, Method, Problem};
use crate::error::Result;
use crate::hybrid::GlobalHeads;
use gemm::Parallelism;
use rayon::prelude::*;
use std::time::{Duration, Instant};

/// The least work an attention call needs, whatever the algorithm: the arithmetic of
/// its products and the bytes of its inputs and output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cost {
    /// Floating-point operations (a multiply-add counts two).
    pub flops: f64,
    /// Bytes read and written: q, k, v and the output, once each.
    pub bytes: f64,
}

impl Cost {
    /// The time no implementation can beat on a machine with `ceilings`: the larger of
    /// bytes over the copy bandwidth and flops over the matrix-product rate.
    ///
    /// ```
    /// use linattn::{Ceilings, Cost};
    /// let ceilings = Ceilings { copy_bytes_per_second: 20e9, matmul_flops_per_second: 100e9 };
    /// let cost = Cost { flops: 1e9, bytes: 4e8 };
    /// assert_eq!(cost.floor_seconds(&ceilings), 0.02); // memory-bound: 4e8 B / 20 GB/s
    /// ```
    pub fn floor_seconds(&self, ceilings: &Ceilings) -> f64 {
        (self.bytes / ceilings.copy_bytes_per_second)
            .max(self.flops / ceilings.matmul_flops_per_second)
    }
}

/// The machine's ceilings, measured: memory copy bandwidth and f32 matrix-product rate
/// with every thread of the pool.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ceilings {
    /// Bytes per second a parallel copy moves, counting bytes read and bytes written.
    pub copy_bytes_per_second: f64,
    /// f32 floating-point operations per second of a large matrix product.
    pub matmul_flops_per_second: f64,
}

impl Ceilings {
    /// Measures both ceilings (about a second): the best of several parallel copies of
    /// 256 MiB, and of several 2048³ f32 products through the same matmul crate the
    /// kernels use.
    pub fn measure() -> Self {
        Self {
            copy_bytes_per_second: copy_bandwidth(),
            matmul_flops_per_second: matmul_rate(),
        }
    }
}

fn best_of(runs: usize, mut f: impl FnMut()) -> Duration {
    f();
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .expect("at least one run")
}

fn copy_bandwidth() -> f64 {
    const LEN: usize = 64 << 20;
    const PIECE: usize = 1 << 16;
    let source = vec![1.0f32; LEN];
    let mut target = vec![0.0f32; LEN];
    let time = best_of(5, || {
        target
            .par_chunks_mut(PIECE)
            .zip(source.par_chunks(PIECE))
            .for_each(|(t, s)| t.copy_from_slice(s));
    });
    std::hint::black_box(&target);
    (2 * LEN * size_of::<f32>()) as f64 / time.as_secs_f64()
}

fn matmul_rate() -> f64 {
    const N: usize = 2048;
    let a = vec![0.5f32; N * N];
    let b = vec![0.25f32; N * N];
    let mut c = vec![0.0f32; N * N];
    let threads = rayon::current_num_threads();
    let time = best_of(3, || {
        // SAFETY: three distinct N × N row-major buffers.
        unsafe {
            gemm::gemm(
                N,
                N,
                N,
                c.as_mut_ptr(),
                1,
                N as isize,
                false,
                a.as_ptr(),
                1,
                N as isize,
                b.as_ptr(),
                1,
                N as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::Rayon(threads),
            )
        }
    });
    std::hint::black_box(&c);
    2.0 * (N * N * N) as f64 / time.as_secs_f64()
}

impl Attention {
    /// The least work of this call on tensors of these shapes with `element_bytes`-byte
    /// elements (see [`Cost`]).
    ///
    /// ```
    /// use linattn::{Attention, Method};
    /// let shape = [1, 4096, 8, 64];
    /// let exact = Attention::new(Method::softmax()).cost(shape, shape, shape, 4).unwrap();
    /// let linear = Attention::new(Method::linear()).cost(shape, shape, shape, 4).unwrap();
    /// assert!(exact.flops > 30.0 * linear.flops);
    /// assert_eq!(exact.bytes, linear.bytes);
    /// ```
    pub fn cost(
        &self,
        q: [usize; 4],
        k: [usize; 4],
        v: [usize; 4],
        element_bytes: usize,
    ) -> Result<Cost> {
        let out = self.output_shape(q, k, v)?;
        let problem = Problem::new(q, k, v, self.is_causal())?;
        let elements: usize = [q, k, v, out]
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum();
        Ok(Cost {
            flops: flops(self.method(), &problem),
            bytes: (elements * element_bytes) as f64,
        })
    }
}

/// Query–key pairs that interact: all of them, or the causal triangle.
fn pairs(problem: &Problem, left: Option<usize>, right: Option<usize>) -> f64 {
    let right = if problem.causal { Some(0) } else { right };
    (0..problem.len_q)
        .map(|i| {
            let lo = left.map_or(0, |l| i.saturating_sub(l));
            let hi = right.map_or(problem.len_k, |r| (i + r + 1).min(problem.len_k));
            hi.saturating_sub(lo) as f64
        })
        .sum()
}

/// Arithmetic of the method on `problem`: products only, the elementwise work is small
/// beside them (or, for exact attention, counted as the products are).
fn flops(method: &Method, problem: &Problem) -> f64 {
    let p = problem;
    let (heads, d, dv) = (
        p.batch as f64 * p.heads_q as f64,
        p.dim_qk as f64,
        p.dim_v as f64,
    );
    let tokens = heads * p.len_q as f64;
    // Kernelized with m features: each key adds a rank-one m × d_v update, each query
    // reads m × d_v (the recurrent form's count, the least any form can do).
    let kernelized = |m: f64| 4.0 * tokens * m * dv;
    let exact = |left, right| 2.0 * heads * pairs(p, left, right) * (d + dv);
    let favor = |m: f64| kernelized(m) + 2.0 * 2.0 * tokens * d * m;
    match method {
        Method::Softmax(_) => exact(None, None),
        Method::Window(w) => exact(w.left, w.right),
        Method::Linear(_) => kernelized(d),
        Method::Cosformer(_) => kernelized(2.0 * d),
        Method::Performer(m) => favor(m.num_features() as f64),
        Method::Linformer(l) => {
            let kp = l.k as f64;
            let projections = 2.0 * (p.batch * p.heads_kv) as f64 * p.len_k as f64 * kp * (d + dv);
            projections + 2.0 * tokens * kp * (d + dv)
        }
        Method::Fnet(_) => {
            // A real 2-D FFT of n points: about 2.5 n log₂ n.
            let n = (p.len_k * p.heads_kv * p.dim_v) as f64;
            2.5 * p.batch as f64 * n * n.log2()
        }
        Method::Hybrid(h) => {
            let local = h.local_heads as f64 / p.heads_q as f64;
            let global = match &h.global {
                GlobalHeads::Linear(_) => kernelized(d),
                GlobalHeads::Performer(m) => favor(m.num_features() as f64),
            };
            local * exact(h.window.left, h.window.right) + (1.0 - local) * global
        }
    }
}
