//! FNet (Lee-Thorp et al., 2022): token mixing by the real part of the 2-D discrete
//! Fourier transform over (sequence, hidden), hidden = heads · head_dim. It has no
//! queries or keys: the output is `Re(DFT₂(v))`, of v's shape. q and k are still
//! validated so that a call that passes them is well-formed.

use crate::attention::Problem;
use crate::error::{Error, Result};
use crate::tensor::{Element, Tensor};
use rayon::prelude::*;
use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};
use std::sync::Arc;

/// Options of FNet mixing (it has none; the struct keeps the method list uniform).
///
/// ```
/// use linattn::{Attention, Fnet, Method, Tensor};
/// let v = Tensor::<f64>::randn([1, 6, 2, 3], 0).unwrap();
/// let out = Attention::new(Method::Fnet(Fnet)).forward(&v, &v, &v).unwrap();
/// // The (0, 0) frequency is the sum of everything.
/// let total: f64 = v.as_slice().iter().sum();
/// assert!((out.at(0, 0, 0, 0) - total).abs() < 1e-9);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fnet;

/// Rows of FFTs handed to one task at a time.
const ROWS_PER_TASK: usize = 16;
/// Complex values a rustfft plan of n points holds, per point: twiddles at each level,
/// and for prime n Bluestein's inner transform of up to 4n points with its own
/// twiddles and Rader's of n − 1; 16 bounds them with margin (the workspace test runs
/// prime, power-of-two and mixed-radix lengths).
const PLAN_POINTS: u128 = 16;
/// The planner's own tables and caches, independent of the lengths.
const PLANNER_BYTES: u128 = 64 << 10;

impl Fnet {
    pub(crate) fn validate(&self, problem: &Problem) -> Result<()> {
        if problem.causal {
            return Err(Error::CausalUnsupported {
                method: "fnet",
                reason: "the Fourier transform over the sequence mixes every position into every other",
            });
        }
        Ok(())
    }

    pub(crate) fn out_shape(problem: &Problem) -> [usize; 4] {
        [
            problem.batch,
            problem.len_k,
            problem.heads_kv,
            problem.dim_v,
        ]
    }

    pub(crate) fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        // Two complex planes of one batch (before and after the transpose), each thread's
        // scratch, and the two plans with the planner's cache.
        let lengths = [problem.len_k, problem.heads_kv * problem.dim_v].map(|n| n as u128);
        let plane = lengths[0] * lengths[1];
        let scratch = rayon::current_num_threads() as u128 * 2 * lengths[0].max(lengths[1]);
        let plans = lengths.iter().map(|&n| PLAN_POINTS * n).sum::<u128>();
        (2 * plane + scratch + plans) * 2 * element as u128 + PLANNER_BYTES
    }

    pub(crate) fn forward<T: Element>(&self, v: &Tensor<T>, out: &mut Tensor<T>) {
        let [batch, seq, heads, dim] = v.shape();
        let hidden = heads * dim;
        let mut planner = FftPlanner::<T>::new();
        let along_hidden = planner.plan_fft_forward(hidden);
        let along_seq = planner.plan_fft_forward(seq);
        let plane = seq * hidden;
        let mut rows = vec![Complex::<T>::default(); plane];
        let mut columns = vec![Complex::<T>::default(); plane];
        for b in 0..batch {
            let input = &v.as_slice()[b * plane..(b + 1) * plane];
            rows.iter_mut()
                .zip(input)
                .for_each(|(c, &x)| *c = Complex::new(x, T::zero()));
            transform_rows(&along_hidden, &mut rows, hidden);
            transpose(&rows, &mut columns, seq, hidden);
            transform_rows(&along_seq, &mut columns, seq);
            // columns is hidden × seq; the output is seq × hidden.
            let output = &mut out.as_mut_slice()[b * plane..(b + 1) * plane];
            output
                .par_chunks_mut(hidden)
                .enumerate()
                .for_each(|(t, row)| {
                    for (j, o) in row.iter_mut().enumerate() {
                        *o = columns[j * seq + t].re;
                    }
                });
        }
    }
}

/// In-place FFT of every `len`-long row of `data`, rows spread over threads.
fn transform_rows<T: Element>(fft: &Arc<dyn Fft<T>>, data: &mut [Complex<T>], len: usize) {
    let scratch_len = fft.get_inplace_scratch_len();
    data.par_chunks_mut(len * ROWS_PER_TASK).for_each_init(
        || vec![Complex::<T>::default(); scratch_len],
        |scratch, rows| fft.process_with_scratch(rows, scratch),
    );
}

fn transpose<T: Copy + Send + Sync>(src: &[T], dst: &mut [T], rows: usize, cols: usize) {
    dst.par_chunks_mut(rows)
        .enumerate()
        .for_each(|(j, column)| {
            for (i, x) in column.iter_mut().enumerate() {
                *x = src[i * cols + j];
            }
        });
}
