//! The state of exact attention while decoding on the GPU: the keys and values seen so
//! far, in the tensors' `[B, T, H, D]` layout with room to grow, so that a block of new
//! queries runs the exact kernels against them (softmax.rs' `softmax_continue`).

use super::device::{Gpu, cuda_error};
use super::softmax::{ExactMask, KeyRows, softmax_continue};
use super::tensor::{GpuElement, GpuTensor};
use crate::base::{Problem, Result};
use cudarc::driver::CudaSlice;

/// Rows per sequence the first allocation holds.
const FIRST_ROWS: usize = 64;

/// Keys and values of every (sequence, kv head) from position `first` on: `len` rows of
/// `rows` allocated per sequence. A window drops what no later query sees, so its cache
/// stays within twice the window and block; full attention keeps every key.
pub(crate) struct GpuKvCache<T> {
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    /// The sizes of one token of every sequence: `[batch, 1, heads_kv, dim]` of k and v.
    token: Problem,
    /// Keys back a query sees (the window's left side), `None` for all.
    reach: Option<usize>,
    first: usize,
    len: usize,
    rows: usize,
}

impl<T: GpuElement> GpuKvCache<T> {
    /// An empty cache for the kv heads of `token` (one token per sequence), for queries
    /// that see `reach` keys back (all if `None`).
    pub(crate) fn new(gpu: &Gpu, token: &Problem, reach: Option<usize>) -> Result<Self> {
        let (rows, batch) = (FIRST_ROWS, token.batch);
        let heads = token.heads_kv;
        Ok(Self {
            k: gpu.alloc(batch * rows * heads * token.dim_qk)?,
            v: gpu.alloc(batch * rows * heads * token.dim_v)?,
            token: *token,
            reach,
            first: 0,
            len: 0,
            rows,
        })
    }

    /// Appends a block of keys and values (`problem.len_k` tokens per sequence) and
    /// returns the exact attention of its queries, which sit at the positions after the
    /// cache's, to every key they see.
    pub(crate) fn attend(
        &mut self,
        gpu: &Gpu,
        problem: &Problem,
        mask: ExactMask,
        [q, k, v]: [&GpuTensor<T>; 3],
    ) -> Result<GpuTensor<T>> {
        let position = self.first + self.len;
        self.append(gpu, k, v)?;
        let cached = Problem {
            len_k: self.len,
            ..*problem
        };
        let keys = KeyRows {
            q_start: position - self.first,
            rows: self.rows,
        };
        let mut out = GpuTensor::for_output(gpu, problem.out_shape())?;
        softmax_continue(
            gpu,
            &cached,
            mask,
            keys,
            [&q.data, &self.k, &self.v],
            &mut out,
        )?;
        Ok(out)
    }

    /// Bytes allocated for keys and values.
    pub(crate) fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * size_of::<T>()
    }

    /// Elements of one row (token) of one sequence, of k and of v.
    fn row_elements(&self) -> (usize, usize) {
        let heads = self.token.heads_kv;
        (heads * self.token.dim_qk, heads * self.token.dim_v)
    }

    fn append(&mut self, gpu: &Gpu, k: &GpuTensor<T>, v: &GpuTensor<T>) -> Result<()> {
        let tokens = k.shape()[1];
        if self.len + tokens > self.rows {
            self.grow(gpu, tokens)?;
        }
        let (k_row, v_row) = self.row_elements();
        for b in 0..self.token.batch {
            let at = b * self.rows + self.len;
            copy_rows(gpu, &k.data, b * tokens, &mut self.k, at, tokens, k_row)?;
            copy_rows(gpu, &v.data, b * tokens, &mut self.v, at, tokens, v_row)?;
        }
        self.len += tokens;
        Ok(())
    }

    /// Moves what later queries see into buffers with room for `tokens` more and as many
    /// again, so that appending costs O(1) copies per token.
    fn grow(&mut self, gpu: &Gpu, tokens: usize) -> Result<()> {
        let position = self.first + self.len;
        let dropped = self
            .reach
            .map_or(0, |reach| position.saturating_sub(reach + self.first));
        let kept = self.len.saturating_sub(dropped);
        let rows = (2 * (kept + tokens)).max(FIRST_ROWS);
        let (k_row, v_row) = self.row_elements();
        let batch = self.token.batch;
        let mut k = gpu.alloc::<T>(batch * rows * k_row)?;
        let mut v = gpu.alloc::<T>(batch * rows * v_row)?;
        for b in 0..batch {
            let from = b * self.rows + (self.len - kept);
            copy_rows(gpu, &self.k, from, &mut k, b * rows, kept, k_row)?;
            copy_rows(gpu, &self.v, from, &mut v, b * rows, kept, v_row)?;
        }
        (self.k, self.v) = (k, v);
        self.first = position - kept;
        self.len = kept;
        self.rows = rows;
        Ok(())
    }
}

/// Copies `count` rows of `row` elements from row `from` of `source` to row `to` of
/// `target`, on the GPU's stream.
fn copy_rows<T: GpuElement>(
    gpu: &Gpu,
    source: &CudaSlice<T>,
    from: usize,
    target: &mut CudaSlice<T>,
    to: usize,
    count: usize,
    row: usize,
) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let (from, to, len) = (from * row, to * row, count * row);
    gpu.stream
        .memcpy_dtod(
            &source.slice(from..from + len),
            &mut target.slice_mut(to..to + len),
        )
        .map_err(|e| cuda_error("copying keys and values on the GPU", e))
}
