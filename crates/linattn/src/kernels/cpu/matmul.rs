//! Strided matrix views and the one matrix product every CPU kernel goes through.

use crate::tensor::Element;
use std::marker::PhantomData;

/// A read-only strided matrix over a slice: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a, T> {
    data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T: Copy> MatRef<'a, T> {
    /// A view of `rows × cols` elements; panics when they do not fit in `data`.
    pub fn strided(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * rs + (cols - 1) * cs;
            assert!(last < data.len(), "matrix view out of bounds");
        }
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// A row-major `rows × cols` view of the start of `data`.
    pub fn contiguous(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Rows `start..start + len`.
    pub fn rows_range(self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.rows);
        let data = if len == 0 {
            &self.data[..0]
        } else {
            &self.data[start * self.rs..]
        };
        Self::strided(data, len, self.cols, self.rs, self.cs)
    }

    /// Row `i` as a slice; the columns must be contiguous.
    #[inline]
    pub fn row(&self, i: usize) -> &'a [T] {
        debug_assert_eq!(self.cs, 1);
        let start = i * self.rs;
        &self.data[start..start + self.cols]
    }
}

/// A writable strided matrix. Built from a slice (safe) or, for tasks that fill disjoint
/// parts of one tensor in parallel, from a raw pointer (unsafe).
pub(crate) struct MatMut<'a, T> {
    ptr: *mut T,
    pub rows: usize,
    pub cols: usize,
    rs: usize,
    cs: usize,
    _data: PhantomData<&'a mut [T]>,
}

// SAFETY: a MatMut is an exclusive borrow of its elements, like `&mut [T]`.
unsafe impl<T: Send> Send for MatMut<'_, T> {}

impl<'a, T: Copy> MatMut<'a, T> {
    /// A row-major `rows × cols` view of the start of `data`.
    pub fn contiguous(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        assert!(rows * cols <= data.len(), "matrix view out of bounds");
        Self {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
            rs: cols,
            cs: 1,
            _data: PhantomData,
        }
    }

    /// A `rows × cols` view of `data` whose rows start `rs` apart.
    pub fn strided(data: &'a mut [T], rows: usize, cols: usize, rs: usize) -> Self {
        if rows > 0 && cols > 0 {
            assert!(
                (rows - 1) * rs + cols <= data.len(),
                "matrix view out of bounds"
            );
        }
        Self {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
            rs,
            cs: 1,
            _data: PhantomData,
        }
    }

    /// # Safety
    /// Every element `ptr + i * rs + j * cs` for `i < rows`, `j < cols` must be valid for
    /// writes during `'a` and reachable through no other live reference.
    pub unsafe fn from_raw(ptr: *mut T, rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        Self {
            ptr,
            rows,
            cols,
            rs,
            cs,
            _data: PhantomData,
        }
    }

    /// A shorter-lived view of the same elements.
    pub fn rb(&mut self) -> MatMut<'_, T> {
        MatMut {
            ptr: self.ptr,
            rows: self.rows,
            cols: self.cols,
            rs: self.rs,
            cs: self.cs,
            _data: PhantomData,
        }
    }

    /// Rows `start..start + len`, borrowed from this view.
    pub fn rows_mut(&mut self, start: usize, len: usize) -> MatMut<'_, T> {
        assert!(start + len <= self.rows);
        MatMut {
            // SAFETY: row `start` lies inside the view (or one past it when len = 0).
            ptr: unsafe { self.ptr.add(start * self.rs) },
            rows: len,
            cols: self.cols,
            rs: self.rs,
            cs: self.cs,
            _data: PhantomData,
        }
    }

    /// Row `i` as a mutable slice; the columns must be contiguous.
    #[inline]
    pub fn row_mut(&mut self, i: usize) -> &mut [T] {
        assert!(i < self.rows && self.cs == 1);
        // SAFETY: row i lies inside the view, which we borrow exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.rs), self.cols) }
    }
}

/// `dst = lhs · rhs`, or `dst += lhs · rhs` when `accumulate`, times `scale`.
///
/// Single-threaded on purpose: callers parallelise over heads and blocks with rayon,
/// which for the many small products of attention beats a threaded product.
pub(crate) fn matmul<T: Element>(
    dst: MatMut<'_, T>,
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
    if lhs.cols == 0 {
        if !accumulate {
            for i in 0..dst.rows {
                for j in 0..dst.cols {
                    // SAFETY: (i, j) is inside the exclusively borrowed view.
                    unsafe { *dst.ptr.add(i * dst.rs + j * dst.cs) = T::zero() };
                }
            }
        }
        return;
    }
    // SAFETY: the three views were bounds-checked when built; dst is exclusive, so it
    // cannot alias lhs or rhs.
    unsafe {
        gemm::gemm(
            dst.rows,
            dst.cols,
            lhs.cols,
            dst.ptr,
            dst.cs as isize,
            dst.rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
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
