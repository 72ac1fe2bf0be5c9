//! Strided matrix views and the one matrix product every CPU kernel goes through.

use crate::base::{Element, MatMut, MatRef};

/// `dst = lhs · rhs`, or `dst += lhs · rhs` when `accumulate`, times `scale`.
///
/// Single-threaded on purpose: callers parallelise over heads and blocks with rayon,
/// which for the many small products of attention beats a threaded product.
pub(crate) fn matmul<T: Element>(
    mut dst: MatMut<'_, T>,
    lhs: MatRef<'_, T>,
    rhs: MatRef<'_, T>,
    accumulate: bool,
    scale: T,
) {
    assert!(
        dst.rows == lhs.rows && dst.cols == rhs.cols && lhs.cols == rhs.rows,
        "matmul shapes: dst {}x{}, lhs {}x{}, rhs {}x{}",
        dst.rows,
        dst.cols,
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols
    );
    if dst.rows == 0 || dst.cols == 0 {
        return;
    }
    let (dst_ptr, dst_rs, dst_cs) = dst.raw_parts();
    if lhs.cols == 0 {
        if !accumulate {
            for i in 0..dst.rows {
                for j in 0..dst.cols {
                    // SAFETY: (i, j) is inside the exclusively borrowed view.
                    unsafe { *dst_ptr.add(i * dst_rs + j * dst_cs) = T::zero() };
                }
            }
        }
        return;
    }
    let (lhs_ptr, lhs_rs, lhs_cs) = lhs.raw_parts();
    let (rhs_ptr, rhs_rs, rhs_cs) = rhs.raw_parts();
    // SAFETY: the three views were bounds-checked when built; dst is exclusive, so it
    // cannot alias lhs or rhs.
    unsafe {
        gemm::gemm(
            dst.rows,
            dst.cols,
            lhs.cols,
            dst_ptr,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs_ptr,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs_ptr,
            rhs_cs as isize,
            rhs_rs as isize,
            // gemm computes dst := alpha·dst + beta·lhs·rhs (the reverse of BLAS).
            T::one(),
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Upper bound of the memory `gemm` allocates on one thread for one product of each of
/// `shapes` (m, n, k), taking the largest. Read off gemm-common 0.19's `gemm_basic_generic`
/// and `kernel_params`: a packed k × nc panel of the right operand (nc is n rounded up to
/// the register tile, or 128 tiles when the L3 cache is unknown), a prepacked k × m panel
/// of the left one when m is at most twice its row block (at most 8 register tiles), each
/// cache-line aligned; and once per thread, kept for the thread's life, a buffer the size
/// of the L2 cache as gemm reads it from the system (so it differs between machines).
pub(crate) fn packing_bytes(element: usize, shapes: &[(usize, usize, usize)]) -> u128 {
    // The widest register tiles of any target gemm 0.19 dispatches to (AVX-512 f32: 4
    // vectors of 16 lanes by 6 columns), with margin.
    const MAX_TILE_ROWS: u128 = 64;
    const MAX_TILE_COLS: u128 = 16;
    const ALIGNMENT_SLACK: u128 = 1024;
    let caches = &*gemm_common::cache::CACHE_INFO;
    let panel_cols = |n: u128| {
        let rounded = n + MAX_TILE_COLS;
        if caches[2].cache_bytes == 0 {
            rounded.max(128 * MAX_TILE_COLS)
        } else {
            rounded
        }
    };
    let per_product = shapes
        .iter()
        .map(|&(m, n, k)| {
            let (m, n, k) = (m as u128, n as u128, k as u128);
            let prepacked_rows = m.min(2 * 8 * MAX_TILE_ROWS) + MAX_TILE_ROWS;
            k * (panel_cols(n) + prepacked_rows) * element as u128 + ALIGNMENT_SLACK
        })
        .max()
        .unwrap_or(0);
    per_product + caches[1].cache_bytes as u128 + ALIGNMENT_SLACK
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn strided_transposed_and_accumulating_products_match_the_definition() {
        let (m, k, n) = (7, 5, 3);
        let a: Vec<f64> = (0..m * k).map(|x| (x as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|x| (x as f64 * 0.11).cos()).collect();
        let expected = naive(&a, &b, m, k, n);

        let mut c = vec![1.0; m * n];
        matmul(
            MatMut::contiguous(&mut c, m, n),
            MatRef::contiguous(&a, m, k),
            MatRef::contiguous(&b, k, n),
            false,
            1.0,
        );
        for (x, y) in c.iter().zip(&expected) {
            assert!((x - y).abs() < 1e-12);
        }

        // b stored transposed (n × k), read through t(); accumulate twice the product.
        let bt: Vec<f64> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
        matmul(
            MatMut::contiguous(&mut c, m, n),
            MatRef::contiguous(&a, m, k),
            MatRef::contiguous(&bt, n, k).t(),
            true,
            2.0,
        );
        for (x, y) in c.iter().zip(&expected) {
            assert!((x - 3.0 * y).abs() < 1e-12);
        }
    }

    #[test]
    fn an_empty_inner_dimension_gives_zeros() {
        let mut c = vec![5.0f32; 6];
        matmul(
            MatMut::contiguous(&mut c, 2, 3),
            MatRef::contiguous(&[], 2, 0),
            MatRef::contiguous(&[], 0, 3),
            false,
            1.0,
        );
        assert_eq!(c, vec![0.0; 6]);
    }
}
