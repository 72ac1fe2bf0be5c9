//! Strided matrix views over slices: how kernels and tensors address rows of one head.

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

    /// The first element and the (row, column) strides, for a product kernel.
    pub fn raw_parts(&self) -> (*const T, usize, usize) {
        (self.data.as_ptr(), self.rs, self.cs)
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

    /// The first element and the (row, column) strides, for a product kernel: writes
    /// through the pointer must stay inside the view.
    pub fn raw_parts(&mut self) -> (*mut T, usize, usize) {
        (self.ptr, self.rs, self.cs)
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
