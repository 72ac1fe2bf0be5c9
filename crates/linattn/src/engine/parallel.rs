//! Causal kernelized attention in its parallel form (flash-linear-attention's `parallel`
//! kernels): every weight `A_ij = φ(qᵢ)·φ(kⱼ)` for j ≤ i formed tile by tile and applied
//! to the values directly, with no running state. O(n²) work; memory O(n·m) for the key
//! features of a head plus tiles, never O(n²).

use super::{FeatureMap, Normalizer};
use crate::backend::cpu::matmul::matmul;
use crate::base::Problem;
use crate::base::simd;
use crate::base::{Element, Tensor};
use crate::base::{MatMut, MatRef};
use rayon::prelude::*;
use std::ops::Range;

/// Query rows per task, and keys per tile.
pub(crate) const PARALLEL_TILE: usize = 64;

/// The key features of one (batch, kv head): k̂ⱼ, and for stabilised maps the running
/// max Cⱼ of the log-scales up to j (query i's stabiliser is Cᵢ).
struct KeyFeatures<T> {
    features: Vec<T>,
    log_scale: Vec<T>,
    running_max: Vec<T>,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn causal_parallel<T: Element, F: FeatureMap<T>>(
    problem: &Problem,
    fmap: &F,
    normalizer: Normalizer,
    q: &Tensor<T>,
    k: &Tensor<T>,
    v: &Tensor<T>,
    out: &mut Tensor<T>,
    heads: Range<usize>,
) {
    let (m, n) = (fmap.features(), problem.len_q);
    let uniform = fmap.stabiliser();
    let mut groups: Vec<usize> = heads.clone().map(|h| problem.kv_head(h)).collect();
    groups.dedup();
    let pairs: Vec<(usize, usize)> = (0..problem.batch)
        .flat_map(|b| groups.iter().map(move |&g| (b, g)))
        .collect();
    let keys: Vec<KeyFeatures<T>> = pairs
        .par_iter()
        .map(|&(b, g)| {
            let mut features = vec![T::zero(); n * m];
            let mut log_scale = vec![T::zero(); n];
            for start in (0..n).step_by(PARALLEL_TILE) {
                let len = PARALLEL_TILE.min(n - start);
                fmap.keys(
                    k.head(b, g).rows_range(start, len),
                    start,
                    &mut features[start * m..(start + len) * m],
                    &mut log_scale[start..start + len],
                );
            }
            let running_max = log_scale
                .iter()
                .scan(T::neg_infinity(), |max, &c| {
                    *max = max.max(c);
                    Some(*max)
                })
                .collect();
            KeyFeatures {
                features,
                log_scale,
                running_max,
            }
        })
        .collect();
    let keys_of = |b: usize, h: usize| {
        let slot = groups.partition_point(|&g| g < problem.kv_head(h));
        &keys[b * groups.len() + slot]
    };

    let out_heads = out.heads_mut();
    let blocks: Vec<(usize, usize, usize)> = (0..problem.batch)
        .flat_map(|b| {
            heads.clone().flat_map(move |h| {
                (0..n)
                    .step_by(PARALLEL_TILE)
                    .map(move |start| (b, h, start))
            })
        })
        .collect();
    blocks.par_iter().for_each_init(
        || {
            (
                vec![T::zero(); PARALLEL_TILE * m],
                vec![T::zero(); PARALLEL_TILE * PARALLEL_TILE],
                vec![T::zero(); PARALLEL_TILE],
            )
        },
        |(phi, weights, den), &(b, h, start)| {
            let rows = PARALLEL_TILE.min(n - start);
            let key = keys_of(b, h);
            let values = v.head(b, problem.kv_head(h));
            fmap.queries(q.head(b, h).rows_range(start, rows), start, phi);
            let phi = MatRef::contiguous(&phi[..rows * m], rows, m);
            let sums: Vec<T> = (0..rows).map(|i| simd::sum(phi.row(i))).collect();
            // SAFETY: each (b, h, start) block is one task.
            let mut acc = unsafe { out_heads.block(b, h, start, rows) };
            den[..rows].fill(T::zero());
            for key_start in (0..start + rows).step_by(PARALLEL_TILE) {
                let cols = PARALLEL_TILE.min(start + rows - key_start);
                let tile = &mut weights[..rows * cols];
                matmul(
                    MatMut::contiguous(tile, rows, cols),
                    phi,
                    MatRef::contiguous(
                        &key.features[key_start * m..(key_start + cols) * m],
                        cols,
                        m,
                    )
                    .t(),
                    false,
                    T::one(),
                );
                for (i, row) in tile.chunks_exact_mut(cols).enumerate() {
                    let query = start + i;
                    for (j, a) in row.iter_mut().enumerate() {
                        let position = key_start + j;
                        *a = if position > query {
                            T::zero()
                        } else if let Some(u) = uniform {
                            let scale = key.log_scale[position] - key.running_max[query];
                            *a * scale.fast_exp() + u * sums[i]
                        } else {
                            *a
                        };
                    }
                    den[i] += simd::sum(row);
                }
                matmul(
                    acc.rb(),
                    MatRef::contiguous(tile, rows, cols),
                    values.rows_range(key_start, cols),
                    key_start > 0,
                    T::one(),
                );
            }
            for (i, &den) in den[..rows].iter().enumerate() {
                let inv = T::one() / normalizer.divisor(den);
                acc.row_mut(i).iter_mut().for_each(|o| *o *= inv);
            }
        },
    );
}
