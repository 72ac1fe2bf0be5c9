use crate::base::memory;
use crate::base::{Element, Error, Result};
use crate::base::{MatMut, MatRef};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use std::ops::Range;

/// A dense tensor in the layout `[batch, seq, heads, head_dim]`, row-major.
///
/// This is FlashAttention's and flash-linear-attention's layout, so a contiguous PyTorch
/// tensor of that shape can be handed over element for element.
///
/// ```
/// use linattn::Tensor;
/// let t = Tensor::from_vec((0..24).map(|x| x as f32).collect(), [1, 3, 2, 4]).unwrap();
/// assert_eq!(t.seq_len(), 3);
/// assert_eq!(t.at(0, 2, 1, 3), 23.0);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<T> {
    data: Vec<T>,
    shape: [usize; 4],
}

impl<T: Element> Tensor<T> {
    /// Wraps `data` as a tensor of `shape`; its length must be the product of the shape.
    ///
    /// ```
    /// assert!(linattn::Tensor::from_vec(vec![0.0f64; 5], [1, 2, 1, 2]).is_err());
    /// ```
    pub fn from_vec(data: Vec<T>, shape: [usize; 4]) -> Result<Self> {
        let expected = element_count(shape, size_of::<T>())?;
        if data.len() != expected {
            return Err(Error::ShapeMismatch {
                detail: format!(
                    "{} elements given for shape {shape:?}, which holds {expected}",
                    data.len()
                ),
            });
        }
        Ok(Self { data, shape })
    }

    /// A tensor of zeros; fails with [`Error::OutOfMemory`] instead of aborting when the
    /// shape is too large for this machine.
    ///
    /// ```
    /// let z = linattn::Tensor::<f32>::zeros([2, 3, 4, 5]).unwrap();
    /// assert_eq!(z.as_slice().len(), 120);
    /// assert!(linattn::Tensor::<f32>::zeros([1 << 20, 1 << 20, 1 << 10, 64]).is_err());
    /// ```
    pub fn zeros(shape: [usize; 4]) -> Result<Self> {
        let count = element_count(shape, size_of::<T>())?;
        memory::ensure_fits(
            &format!("a {shape:?} tensor of {}", T::NAME),
            (count as u128) * (size_of::<T>() as u128),
            None,
        )?;
        Ok(Self {
            data: zeroed(count),
            shape,
        })
    }

    /// A tensor of zeros whose memory a plan has already allowed for: reads no system
    /// table.
    pub(crate) fn zeros_planned(shape: [usize; 4]) -> Result<Self> {
        let count = element_count(shape, size_of::<T>())?;
        Ok(Self {
            data: zeroed(count),
            shape,
        })
    }

    /// Standard-normal samples from a seeded, platform-independent generator.
    ///
    /// ```
    /// use linattn::Tensor;
    /// let a = Tensor::<f32>::randn([1, 8, 2, 4], 7).unwrap();
    /// assert_eq!(a, Tensor::<f32>::randn([1, 8, 2, 4], 7).unwrap());
    /// ```
    pub fn randn(shape: [usize; 4], seed: u64) -> Result<Self> {
        let mut tensor = Self::zeros(shape)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for x in &mut tensor.data {
            let sample: f64 = StandardNormal.sample(&mut rng);
            *x = T::of_f64(sample);
        }
        Ok(tensor)
    }

    /// `[batch, seq, heads, head_dim]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
    /// Batch size.
    pub fn batch(&self) -> usize {
        self.shape[0]
    }
    /// Sequence length.
    pub fn seq_len(&self) -> usize {
        self.shape[1]
    }
    /// Number of heads.
    pub fn heads(&self) -> usize {
        self.shape[2]
    }
    /// Size of each head's vectors.
    pub fn head_dim(&self) -> usize {
        self.shape[3]
    }
    /// The elements in row-major order.
    pub fn as_slice(&self) -> &[T] {
        &self.data
    }
    /// The elements in row-major order, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.data
    }
    /// Gives the elements back.
    pub fn into_vec(self) -> Vec<T> {
        self.data
    }
    /// Size in bytes of the elements.
    pub fn size_bytes(&self) -> usize {
        self.data.len() * size_of::<T>()
    }
    /// The element at `[b, t, h, d]`; panics when out of bounds, like slice indexing.
    pub fn at(&self, b: usize, t: usize, h: usize, d: usize) -> T {
        let [_, seq, heads, dim] = self.shape;
        assert!(b < self.shape[0] && t < seq && h < heads && d < dim);
        self.data[((b * seq + t) * heads + h) * dim + d]
    }

    /// The positions `range` of the sequence, as a new tensor.
    ///
    /// ```
    /// let t = linattn::Tensor::<f32>::randn([2, 10, 3, 4], 0).unwrap();
    /// let tail = t.slice_seq(7..10).unwrap();
    /// assert_eq!(tail.shape(), [2, 3, 3, 4]);
    /// assert_eq!(tail.at(1, 0, 2, 3), t.at(1, 7, 2, 3));
    /// assert!(t.slice_seq(5..11).is_err());
    /// ```
    pub fn slice_seq(&self, range: std::ops::Range<usize>) -> Result<Self> {
        let [batch, seq, heads, dim] = self.shape;
        if range.start > range.end || range.end > seq {
            return Err(Error::ShapeMismatch {
                detail: format!("positions {range:?} of a sequence of length {seq}"),
            });
        }
        let row = heads * dim;
        let mut data = Vec::with_capacity(batch * range.len() * row);
        for b in 0..batch {
            data.extend_from_slice(
                &self.data[(b * seq + range.start) * row..(b * seq + range.end) * row],
            );
        }
        Ok(Self {
            data,
            shape: [batch, range.len(), heads, dim],
        })
    }

    /// The same values in another precision.
    ///
    /// ```
    /// let a = linattn::Tensor::<f32>::randn([1, 2, 1, 2], 0).unwrap();
    /// let b = a.cast::<f64>();
    /// assert_eq!(b.at(0, 1, 0, 1), a.at(0, 1, 0, 1) as f64);
    /// ```
    pub fn cast<U: Element>(&self) -> Tensor<U> {
        Tensor {
            data: self.data.iter().map(|&x| U::of_f64(x.as_f64())).collect(),
            shape: self.shape,
        }
    }

    /// ‖self − exact‖ / ‖exact‖ in the Frobenius norm: linattn's one measure of
    /// closeness (its tests, `linattn bench`'s rel_err); the absolute ‖self − exact‖ when
    /// `exact` is zero; `None` when the shapes differ.
    ///
    /// ```
    /// use linattn::Tensor;
    /// let exact = Tensor::from_vec(vec![3.0, 4.0], [1, 1, 1, 2]).unwrap();
    /// let output = Tensor::from_vec(vec![3.0f32, 3.0], [1, 1, 1, 2]).unwrap();
    /// assert_eq!(output.relative_error(&exact), Some(0.2));
    /// ```
    pub fn relative_error(&self, exact: &Tensor<f64>) -> Option<f64> {
        if self.shape() != exact.shape() {
            return None;
        }
        let (difference, norm) = self
            .data
            .iter()
            .zip(exact.as_slice())
            .fold((0.0, 0.0), |(difference, norm), (&o, &e)| {
                (difference + (o.as_f64() - e).powi(2), norm + e * e)
            });
        Some(if norm == 0.0 {
            difference.sqrt()
        } else {
            (difference / norm).sqrt()
        })
    }

    /// Index (`[b, t, h, d]`) of the first NaN or infinity, with its value; `None` when
    /// every element is finite.
    ///
    /// ```
    /// use linattn::Tensor;
    /// let mut x = Tensor::<f32>::zeros([1, 3, 2, 2]).unwrap();
    /// assert_eq!(x.first_non_finite(), None);
    /// x.as_mut_slice()[9] = f32::INFINITY;
    /// assert_eq!(x.first_non_finite(), Some((vec![0, 2, 0, 1], f64::INFINITY)));
    /// ```
    pub fn first_non_finite(&self) -> Option<(Vec<usize>, f64)> {
        // A pass over memory: large tensors are checked by every thread, small ones (a
        // decode step's) on this one, where waking the others would cost more.
        const PIECE: usize = 1 << 16;
        let finite = if self.data.len() <= PIECE {
            crate::base::simd::all_finite(&self.data)
        } else {
            self.data
                .par_chunks(PIECE)
                .all(crate::base::simd::all_finite)
        };
        if finite {
            return None;
        }
        let position = self.data.iter().position(|x| !x.is_finite())?;
        Some((unravel(position, &self.shape), self.data[position].as_f64()))
    }

    /// The rows of head `h` in batch `b`: `seq_len` rows of `head_dim` contiguous values,
    /// `heads * head_dim` apart.
    pub(crate) fn head(&self, b: usize, h: usize) -> MatRef<'_, T> {
        let [_, seq, heads, dim] = self.shape;
        let start = (b * seq * heads + h) * dim;
        MatRef::strided(&self.data[start..], seq, dim, heads * dim, 1)
    }

    /// Rows `rows` of heads `heads` in batch `b`, copied into `dst` row by row
    /// (`[row][head][dim]`, one contiguous piece per row): the prefetchers follow a
    /// sweep in memory order, not the token-sized stride between one head's rows. View
    /// a head of it with [`block_head`]. Returns whether every value copied is finite,
    /// checked while the copy is still in cache.
    pub(crate) fn gather(
        &self,
        b: usize,
        rows: Range<usize>,
        heads: Range<usize>,
        dst: &mut [T],
    ) -> bool {
        let width = heads.len() * self.shape[3];
        let len = rows.len();
        self.copy_rows(b, rows, heads, dst);
        crate::base::simd::all_finite(&dst[..len * width])
    }

    /// [`gather`](Self::gather) without the check, for callers whose inputs were
    /// checked before.
    pub(crate) fn copy_rows(
        &self,
        b: usize,
        rows: Range<usize>,
        heads: Range<usize>,
        dst: &mut [T],
    ) {
        let [_, seq, all_heads, dim] = self.shape;
        let width = heads.len() * dim;
        for (i, t) in rows.enumerate() {
            let start = ((b * seq + t) * all_heads + heads.start) * dim;
            crate::base::simd::copy(
                &mut dst[i * width..(i + 1) * width],
                &self.data[start..start + width],
            );
        }
    }

    /// Rows `rows` of heads `heads` in batch `b` as [`gather`](Self::gather) lays them out,
    /// and whether they are finite: read in place when `heads` are all the heads (the
    /// rows are then one contiguous piece already), else copied into `scratch`, which
    /// grows to the size needed only then (a fresh buffer per call would cost its page
    /// faults and zeroing every time).
    pub(crate) fn rows_of<'s>(
        &'s self,
        b: usize,
        rows: Range<usize>,
        heads: Range<usize>,
        scratch: &'s mut Vec<T>,
    ) -> (&'s [T], bool) {
        let [_, seq, all_heads, dim] = self.shape;
        if heads.len() == all_heads {
            let piece = &self.data
                [(b * seq + rows.start) * all_heads * dim..(b * seq + rows.end) * all_heads * dim];
            (piece, crate::base::simd::all_finite(piece))
        } else {
            let needed = rows.len() * heads.len() * dim;
            if scratch.len() < needed {
                scratch.resize(needed, T::zero());
            }
            let finite = self.gather(b, rows, heads, scratch);
            (&scratch[..needed], finite)
        }
    }

    /// Shared write access to the heads of this tensor, for tasks that each fill a
    /// disjoint block of rows.
    pub(crate) fn heads_mut(&mut self) -> HeadsMut<'_, T> {
        HeadsMut {
            ptr: self.data.as_mut_ptr(),
            shape: self.shape,
            _tensor: std::marker::PhantomData,
        }
    }
}

/// Write access to a tensor's heads that can be shared between threads; each task takes
/// the rows it owns with [`HeadsMut::block`].
pub(crate) struct HeadsMut<'a, T> {
    ptr: *mut T,
    shape: [usize; 4],
    _tensor: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: the pointer is only turned into views through `block`, whose contract makes the
// views of different threads disjoint.
unsafe impl<T: Send> Send for HeadsMut<'_, T> {}
unsafe impl<T: Send> Sync for HeadsMut<'_, T> {}

impl<'a, T: Element> HeadsMut<'a, T> {
    /// Rows `start..start + len` of head `h` in batch `b`.
    ///
    /// # Safety
    /// No two live views may share a row of the same head.
    pub unsafe fn block(&self, b: usize, h: usize, start: usize, len: usize) -> MatMut<'a, T> {
        let [batch, seq, heads, dim] = self.shape;
        assert!(b < batch && h < heads && start + len <= seq);
        let offset = ((b * seq + start) * heads + h) * dim;
        // SAFETY: in bounds by the assertion; disjointness is the caller's promise.
        unsafe { MatMut::from_raw(self.ptr.add(offset), len, dim, heads * dim, 1) }
    }
}

/// `count` zeros. Large buffers ask the kernel for transparent huge pages before their
/// first touch: the kernels then write them with a fault per 2 MiB instead of per 4 KiB.
fn zeroed<T: Element>(count: usize) -> Vec<T> {
    let data = vec![T::zero(); count];
    #[cfg(target_os = "linux")]
    {
        const HUGE_PAGE: usize = 2 << 20;
        let bytes = count * size_of::<T>();
        if bytes >= 2 * HUGE_PAGE {
            let start = data.as_ptr() as usize;
            let aligned = start.next_multiple_of(HUGE_PAGE);
            let len = (start + bytes - aligned) / HUGE_PAGE * HUGE_PAGE;
            // SAFETY: advice on whole pages inside our own allocation; it changes how
            // they are backed, never their contents. Failure only forgoes the speed-up.
            unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        }
    }
    data
}

/// Head `head` of a block laid out `[row][head][dim]` with `heads` heads, as a strided
/// `rows × dim` matrix.
pub(crate) fn block_head<T: Copy>(
    block: &[T],
    rows: usize,
    heads: usize,
    head: usize,
    dim: usize,
) -> MatRef<'_, T> {
    MatRef::strided(&block[head * dim..], rows, dim, heads * dim, 1)
}

/// Multi-index of a flat row-major position.
pub(crate) fn unravel(mut position: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (slot, &extent) in index.iter_mut().zip(shape).rev() {
        *slot = position % extent;
        position /= extent;
    }
    index
}

/// Product of a shape, or an error naming the bytes it would need when that overflows.
pub(crate) fn element_count(shape: [usize; 4], element_bytes: usize) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &x| acc.checked_mul(x))
        .ok_or_else(|| Error::OutOfMemory {
            what: format!("a tensor of shape {shape:?}"),
            needed_bytes: shape.iter().fold(element_bytes as u128, |acc, &x| {
                acc.saturating_mul(x as u128)
            }),
            available_bytes: memory::available_bytes(),
        })
}
