//! What a call must cost at least, and what this machine can do: the floor a measured
//! time is read against.

use crate::api::attention::Attention;
use crate::base::{Problem, Result};
use crate::methods::AttentionMethod;
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
            flops: self.method().flops(&problem),
            bytes: (elements * element_bytes) as f64,
        })
    }
}
