//! FNet (Lee-Thorp et al., 2022): token mixing by the real part of the 2-D discrete
//! Fourier transform over (sequence, hidden), hidden = heads · head_dim. It has no
//! queries or keys: the output is `Re(DFT₂(v))`, of v's shape. q and k are still
//! validated so that a call that passes them is well-formed.

use super::info::{Forms, MethodInfo};
use super::method::{AttentionMethod, Prepared, Recurrent};
use crate::base::{Element, Error, Problem, Result, Tensor};
use crate::engine::KernelPass;
use rayon::prelude::*;
use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};
use std::ops::Range;
use std::sync::Arc;

pub(crate) const INFO: MethodInfo = MethodInfo {
    name: "fnet",
    summary: "the real part of the 2-D Fourier transform over (sequence, hidden): no attention",
    time: "O(n d log(n d))",
    memory: "O(n d)",
    options: &[],
    cpu: Forms {
        full: true,
        causal: false,
        recurrent: false,
    },
    cuda: Forms::NONE,
    layout: super::info::HeadLayout::SharedKeysValues,
    token_inputs: &[],
    weights: false,
    variants: &[],
    parameters: &[],
    examples: &[&[]],
};

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
    /// The FFT plans of `v`'s planes: along the hidden dims, then along the sequence.
    fn plans<T: Element>(problem: &Problem) -> [Arc<dyn Fft<T>>; 2] {
        let mut planner = FftPlanner::<T>::new();
        [
            planner.plan_fft_forward(problem.heads_kv * problem.dim_v),
            planner.plan_fft_forward(problem.len_k),
        ]
    }

    pub(crate) fn mix<T: Element>(
        &self,
        [along_hidden, along_seq]: &[Arc<dyn Fft<T>>; 2],
        v: &Tensor<T>,
        out: &mut Tensor<T>,
    ) {
        let [batch, seq, heads, dim] = v.shape();
        let hidden = heads * dim;
        let plane = seq * hidden;
        let mut rows = vec![Complex::<T>::default(); plane];
        let mut columns = vec![Complex::<T>::default(); plane];
        for b in 0..batch {
            let input = &v.as_slice()[b * plane..(b + 1) * plane];
            rows.iter_mut()
                .zip(input)
                .for_each(|(c, &x)| *c = Complex::new(x, T::zero()));
            transform_rows(along_hidden, &mut rows, hidden);
            transpose(&rows, &mut columns, seq, hidden);
            transform_rows(along_seq, &mut columns, seq);
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

fn fft_plans<T>(prepared: &Prepared<T>) -> Result<&[Arc<dyn Fft<T>>; 2]> {
    prepared
        .fft
        .as_ref()
        .ok_or_else(|| Error::Unsupported("FNet was not prepared with its FFT plans".into()))
}

impl AttentionMethod for Fnet {
    fn validate(&self, problem: &Problem) -> Result<()> {
        if problem.causal {
            return Err(causal_unsupported());
        }
        Ok(())
    }

    fn out_shape(&self, problem: &Problem) -> [usize; 4] {
        [
            problem.batch,
            problem.len_k,
            problem.heads_kv,
            problem.dim_v,
        ]
    }

    fn workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        // Two complex planes of one batch (before and after the transpose), each thread's
        // scratch, and the two plans with the planner's cache.
        let lengths = [problem.len_k, problem.heads_kv * problem.dim_v].map(|n| n as u128);
        let plane = lengths[0] * lengths[1];
        let scratch = rayon::current_num_threads() as u128 * 2 * lengths[0].max(lengths[1]);
        let plans = lengths.iter().map(|&n| PLAN_POINTS * n).sum::<u128>();
        (2 * plane + scratch + plans) * 2 * element as u128 + PLANNER_BYTES
    }

    fn backward_workspace_bytes(&self, problem: &Problem, element: usize) -> u128 {
        self.workspace_bytes(problem, element)
    }

    fn prepare<T: Element>(&self, problem: &Problem) -> Result<Prepared<T>> {
        Ok(Prepared {
            fft: Some(Self::plans(problem)),
            ..Prepared::with_kernel(None)
        })
    }

    fn forward<T: Element>(
        &self,
        _problem: &Problem,
        prepared: &Prepared<T>,
        _q: &Tensor<T>,
        _k: &Tensor<T>,
        v: &Tensor<T>,
        out: &mut Tensor<T>,
        _heads: Range<usize>,
    ) -> Result<KernelPass<T>> {
        self.mix(fft_plans(prepared)?, v, out);
        Ok(KernelPass::unchecked())
    }

    fn backward<T: Element>(
        &self,
        _problem: &Problem,
        prepared: &Prepared<T>,
        [_, _, _, d_out]: [&Tensor<T>; 4],
        [_, _, dv]: [&mut Tensor<T>; 3],
    ) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
        // Re(DFT₂) is its own adjoint on real inputs; q and k get no gradient.
        self.mix(fft_plans(prepared)?, d_out, dv);
        Ok(None)
    }

    fn flops(&self, problem: &Problem) -> f64 {
        // A real 2-D FFT of n points: about 2.5 n log₂ n.
        let n = (problem.len_k * problem.heads_kv * problem.dim_v) as f64;
        2.5 * problem.batch as f64 * n * n.log2()
    }

    fn reference(
        &self,
        _problem: &Problem,
        _q: &Tensor<f64>,
        _k: &Tensor<f64>,
        v: &Tensor<f64>,
    ) -> Result<Tensor<f64>> {
        Ok(reference_dft(v))
    }

    fn recurrent(&self, _heads_q: usize, _dim_qk: usize) -> Result<Recurrent> {
        Err(causal_unsupported())
    }

    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
}

fn causal_unsupported() -> Error {
    Error::CausalUnsupported {
        method: "fnet",
        reason: "the Fourier transform over the sequence mixes every position into every other",
    }
}

/// `Re(DFT₂(v))` over (sequence, heads·head_dim) by the direct double sum: the f64
/// reference.
fn reference_dft(v: &Tensor<f64>) -> Tensor<f64> {
    let [batch, seq, heads, dim] = v.shape();
    let hidden = heads * dim;
    let data = v.as_slice();
    let mut out = vec![0.0; data.len()];
    for b in 0..batch {
        let plane = &data[b * seq * hidden..(b + 1) * seq * hidden];
        for k1 in 0..seq {
            for k2 in 0..hidden {
                let mut acc = 0.0;
                for n1 in 0..seq {
                    for n2 in 0..hidden {
                        // Integer phase first, so the angle stays exact for long inputs.
                        let phase = ((k1 * n1) % seq) as f64 / seq as f64
                            + ((k2 * n2) % hidden) as f64 / hidden as f64;
                        acc += plane[n1 * hidden + n2] * (2.0 * std::f64::consts::PI * phase).cos();
                    }
                }
                out[(b * seq + k1) * hidden + k2] = acc;
            }
        }
    }
    Tensor::from_vec(out, v.shape()).expect("same shape as v")
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
