// Linear attention (phi = elu + 1, o_i = phi(q_i) S / (phi(q_i) z + eps)) on NVIDIA GPUs:
// the chunked causal forward, the non-causal forward (state, then apply), and the
// recurrent decode step. Compiled at run time by NVRTC for the device's architecture.
//
// Tensors are [B, T, H, D] contiguous, as on the CPU. Inputs are f32, bf16 or f16;
// products of bf16/f16 operands run on the tensor cores (WMMA, f32 accumulation), f32
// operands on the CUDA cores in f32, so f32 results stay within f32 rounding of the
// reference. States (S = sum phi(k) v^T, z = sum phi(k)) are f32, [B, H_kv, D_k, D_v]
// and [B, H_kv, D_k].

#include <mma.h>

using namespace nvcuda;

namespace linattn {

struct Shape {
    int batch, len, heads_q, heads_kv, dim_k, dim_v;
    // Value columns per block of the chunk kernels: a multiple of 16, at most 64.
    int value_block;
};

// What every linear-attention kernel takes beside its Shape (the entry points of
// linear_entry.cu and the plain passes of linear_backward.cu), as one struct so that host
// and kernels name each argument instead of counting positions: LinearParams in linear.rs
// mirrors it, and a test there checks the layout against this declaration. A kernel reads
// the fields its pass uses; the host leaves the rest null or 0. q, k, v and out are of the
// kernel's element type, the states f32.
//
// The Shape travels apart, as every kernel's first argument, so that no parameter struct
// passes 128 bytes: NVVM keeps a larger by-value parameter in memory and then takes what
// is read from it for a value that may differ between threads, and stops unswitching loops
// on it (with the Shape inside, the performer's passes ran 18% slower, a decode step 6%).
// The layout test checks the bound.
struct LinearParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    // The state before the tokens (causal; null for none), or the finished one (apply).
    const float* state_in;
    const float* k_sum_in;
    // The state after the tokens (causal; null when not asked for), the sums a state pass
    // writes, or the state a decode step updates in place.
    float* state_out;
    float* k_sum_out;
    // The causal form's sums of the pieces before each segment (null with one segment).
    const float* partial_states;
    const float* partial_sums;
    // Each query row's denominator (causal; null when not kept).
    float* den_out;
    float eps;
    // Rows per segment (causal) or per span (state, apply), and pieces per segment.
    int span, parts;
    // Nonzero: a state pass stores each span's sums apart instead of adding them up.
    int per_span;
};

// elu(x) + 1, subnormals flushed (a phi below 2^-126 is below any rounding of the sums it
// enters). The exponential is taken for every x and discarded where x > 0 (it may be
// inf there): a select is cheaper than clamping its argument.
__device__ __forceinline__ float elu_plus_one(float x) {
    const float negative = fast_exp2(x * 1.4426950408889634f);
    return x > 0.f ? x + 1.f : negative;
}

__host__ __device__ constexpr int round16(int x) { return (x + 15) / 16 * 16; }

template <bool C, typename A, typename B> struct Pick { using type = A; };
template <typename A, typename B> struct Pick<false, A, B> { using type = B; };

// c (f32, row-major, ldc) = [c +] op(a) op(b) over shared memory, op(a) m x k, op(b) k x n.
// a is row-major m x k (lda), or with A_T the transpose of a row-major k x m array; b is
// row-major k x n, or with B_T the transpose of a row-major n x k array. Every thread of
// the block takes part; a thread (or warp) always gets the same outputs for the same
// m, n, so a second call that accumulates onto the first needs no barrier in between.
template <bool A_T, bool B_T>
__device__ void block_gemm(float* c, int ldc, const float* a, int lda, const float* b, int ldb,
                           int m, int n, int k, bool accumulate) {
    for (int idx = threadIdx.x; idx < m * n; idx += blockDim.x) {
        int i = idx / n, j = idx % n;
        float sum = accumulate ? c[i * ldc + j] : 0.f;
        for (int kk = 0; kk < k; ++kk) {
            float x = A_T ? a[kk * lda + i] : a[i * lda + kk];
            float y = B_T ? b[j * ldb + kk] : b[kk * ldb + j];
            sum = fmaf(x, y, sum);
        }
        c[i * ldc + j] = sum;
    }
    __syncwarp();
}

// The tensor-core version for 16-bit operands: m, n, k multiples of 16, one 16 x 16
// output tile per warp at a time.
template <bool A_T, bool B_T, typename T>
__device__ void block_gemm(float* c, int ldc, const T* a, int lda, const T* b, int ldb, int m,
                           int n, int k, bool accumulate) {
    using ALayout = typename Pick<A_T, wmma::col_major, wmma::row_major>::type;
    using BLayout = typename Pick<B_T, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int tiles_n = n / 16, tiles = (m / 16) * tiles_n;
    for (int t = warp; t < tiles; t += warps) {
        const int ti = t / tiles_n, tj = t % tiles_n;
        float* tile = c + ti * 16 * ldc + tj * 16;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        if (accumulate) {
            wmma::load_matrix_sync(acc, tile, ldc, wmma::mem_row_major);
        } else {
            wmma::fill_fragment(acc, 0.f);
        }
        for (int kk = 0; kk < k; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
            wmma::load_matrix_sync(fa, A_T ? a + kk * lda + ti * 16 : a + ti * 16 * lda + kk, lda);
            wmma::load_matrix_sync(fb, B_T ? b + tj * 16 * ldb + kk : b + kk * ldb + tj * 16, ldb);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(tile, acc, ldc, wmma::mem_row_major);
    }
    __syncwarp();
}

// Carves 128-byte aligned arrays out of dynamic shared memory.
struct Carver {
    char* next;
    template <typename U> __device__ U* take(int count) {
        U* p = reinterpret_cast<U*>(next);
        next += (static_cast<size_t>(count) * sizeof(U) + 127) / 128 * 128;
        return p;
    }
};

// Shared-memory layout of the chunk kernels; the host asks for `bytes()` of it.
template <typename T> struct ChunkSmem {
    int dkp, dvp, ldk, ldv, ldc, lds, ldo;
    T *q, *k, *v, *scores_t, *state_t;
    float *scores, *state, *out, *k_sum, *den;

    __host__ __device__ ChunkSmem(int dim_k, int value_block) {
        dkp = round16(dim_k);
        dvp = value_block;
        ldk = dkp + PAD;
        ldv = dvp + PAD;
        ldc = CHUNK + PAD;
        lds = dvp + PAD;
        ldo = dvp + PAD;
    }
    __device__ void carve(char* base) {
        Carver c{base};
        q = c.take<T>(CHUNK * ldk);
        k = c.take<T>(CHUNK * ldk);
        v = c.take<T>(CHUNK * ldv);
        scores = c.take<float>(CHUNK * ldc);
        state = c.take<float>(dkp * lds);
        out = c.take<float>(CHUNK * ldo);
        k_sum = c.take<float>(dkp);
        den = c.take<float>(CHUNK);
        if (IsFloat<T>::value) {
            // f32 operands are read from the f32 arrays themselves.
            scores_t = reinterpret_cast<T*>(scores);
            state_t = reinterpret_cast<T*>(state);
        } else {
            scores_t = c.take<T>(CHUNK * ldc);
            state_t = c.take<T>(dkp * lds);
        }
    }
};

// Rows [t0, t0 + len) of head `head` of x ([B, T, H, D]) into `dst` (CHUNK x width, ld),
// mapped by phi when MAP, zero beyond the rows and columns that exist.
template <bool MAP, typename T>
__device__ void load_rows(T* dst, int ld, const T* x, int b, int t0, int len, int seq, int heads,
                          int head, int dim, int col0, int width) {
    for (int idx = threadIdx.x; idx < CHUNK * width; idx += blockDim.x) {
        const int r = idx / width, d = idx % width;
        float value = 0.f;
        if (r < len && col0 + d < dim) {
            const size_t at = ((static_cast<size_t>(b) * seq + t0 + r) * heads + head) * dim + col0 + d;
            value = to_float(x[at]);
            if (MAP) value = elu_plus_one(value);
        }
        dst[r * ld + d] = from_float<T>(value);
    }
}

// Rows of a chunk held in registers between their load from global memory and their
// store to shared memory, so that the next chunk's loads are in flight while this one
// is computed. 16-byte loads: the dimension must be a multiple of 16 / sizeof(T).
template <typename T, int MAX_WIDTH>
struct Stage {
    static constexpr int VEC = 16 / sizeof(T);
    static constexpr int SLOTS = CHUNK * MAX_WIDTH / VEC / 256;
    uint4 data[SLOTS];

    // Rows [t0, t0 + len) of head `head`, columns [col0, col0 + width).
    __device__ void load(const T* x, int b, int t0, int len, int seq, int heads, int head, int dim,
                         int col0, int width) {
        const int per_row = width / VEC;
#pragma unroll
        for (int slot = 0; slot < SLOTS; ++slot) {
            const int idx = threadIdx.x + slot * blockDim.x;
            const int r = idx / per_row, c = (idx % per_row) * VEC;
            uint4 value = make_uint4(0u, 0u, 0u, 0u);
            if (r < len && col0 + c < dim) {
                const size_t at = ((static_cast<size_t>(b) * seq + t0 + r) * heads + head) * dim + col0 + c;
                value = __ldg(reinterpret_cast<const uint4*>(x + at));
            }
            data[slot] = value;
        }
    }

    // Into dst (CHUNK x width, ld), mapped by phi when MAP; absent rows and columns 0.
    template <bool MAP>
    __device__ void store(T* dst, int ld, int len, int dim, int col0, int width) const {
        const int per_row = width / VEC;
#pragma unroll
        for (int slot = 0; slot < SLOTS; ++slot) {
            const int idx = threadIdx.x + slot * blockDim.x;
            const int r = idx / per_row, c = (idx % per_row) * VEC;
            if (r >= CHUNK) continue;
            const T* in = reinterpret_cast<const T*>(&data[slot]);
            uint4 packed;
            T* out = reinterpret_cast<T*>(&packed);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                float x = to_float(in[e]);
                if (MAP) x = elu_plus_one(x);
                out[e] = from_float<T>((r < len && col0 + c + e < dim) ? x : 0.f);
            }
            *reinterpret_cast<uint4*>(dst + r * ld + c) = packed;
        }
    }
};

// Adds the column sums of the first `rows` rows of x (CHUNK x width, ld) into sums,
// with every thread of the block.
template <typename T>
__device__ void add_column_sums(float* sums, const T* x, int ld, int rows, int width) {
    const int groups = blockDim.x / width;
    if (groups == 0) {
        for (int d = threadIdx.x; d < width; d += blockDim.x) {
            float sum = 0.f;
            for (int r = 0; r < rows; ++r) sum += to_float(x[r * ld + d]);
            sums[d] += sum;
        }
        return;
    }
    const int d = threadIdx.x % width, group = threadIdx.x / width;
    if (group >= groups) return;
    float sum = 0.f;
    for (int r = group; r < rows; r += groups) sum += to_float(x[r * ld + d]);
    atomicAdd(&sums[d], sum);
}

// Rows [t0, t0 + len) of out from the f32 rows in shared memory divided by den + eps.
template <typename T>
__device__ void store_outputs(T* out, const float* rows, int ld, const float* den, float eps, int b,
                              int t0, int len, int seq, int heads, int head, int dim, int col0,
                              int width) {
    constexpr int VEC = 16 / sizeof(T);
    if (width % VEC == 0 && dim % VEC == 0) {
        const int per_row = width / VEC;
        for (int idx = threadIdx.x; idx < len * per_row; idx += blockDim.x) {
            const int r = idx / per_row, c = (idx % per_row) * VEC;
            const float scale = 1.f / (den[r] + eps);
            uint4 packed;
            T* values = reinterpret_cast<T*>(&packed);
#pragma unroll
            for (int e = 0; e < VEC; ++e) values[e] = from_float<T>(rows[r * ld + c + e] * scale);
            const size_t at = ((static_cast<size_t>(b) * seq + t0 + r) * heads + head) * dim + col0 + c;
            *reinterpret_cast<uint4*>(out + at) = packed;
        }
        return;
    }
    for (int idx = threadIdx.x; idx < len * width; idx += blockDim.x) {
        const int r = idx / width, c = idx % width;
        const size_t at = ((static_cast<size_t>(b) * seq + t0 + r) * heads + head) * dim + col0 + c;
        out[at] = from_float<T>(rows[r * ld + c] / (den[r] + eps));
    }
}

// Copies the f32 state into its operand form (16-bit types only), four values at a time.
template <typename T> __device__ void state_to_operand(ChunkSmem<T>& s) {
    if constexpr (!IsFloat<T>::value) {
        const int per_row = s.dvp / 4;
        for (int idx = threadIdx.x; idx < s.dkp * per_row; idx += blockDim.x) {
            const int r = idx / per_row, c = (idx % per_row) * 4;
            const float4 x = *reinterpret_cast<const float4*>(&s.state[r * s.lds + c]);
            T* row = &s.state_t[r * s.lds + c];
            row[0] = from_float<T>(x.x);
            row[1] = from_float<T>(x.y);
            row[2] = from_float<T>(x.z);
            row[3] = from_float<T>(x.w);
        }
    }
}

// Causal forward: one block per (value block, query head, batch) walks the chunks in
// order, carrying S and z in shared memory. Per chunk: scores = phi(Q) phi(K)^T masked
// to j <= i, O = scores V + phi(Q) S, den = row sums + phi(Q) z, then S += phi(K)^T V.
//
// With several segments (span rows each; grid z = batch x segments) a block starts at its
// segment from the state before it: state_in plus the sums of the `parts` spans per
// segment before it, which full_state wrote for every segment but the last
// (partial_states [B, H_kv, (segments - 1) parts, D_k, D_v]).
template <typename T>
__device__ void causal_forward(const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, T* __restrict__ out, Shape sh, float eps,
                               const float* state_in, const float* k_sum_in, float* state_out,
                               float* k_sum_out, int span, int parts, const float* partial_states,
                               const float* partial_sums, float* den_out) {
    extern __shared__ __align__(128) char smem[];
    ChunkSmem<T> s(sh.dim_k, sh.value_block);
    s.carve(smem);
    const int segments = (sh.len + span - 1) / span;
    const int vb = blockIdx.x, h = blockIdx.y, b = blockIdx.z / segments, segment = blockIdx.z % segments;
    const int g = h / (sh.heads_q / sh.heads_kv);
    const int col0 = vb * s.dvp;
    const size_t state_at = (static_cast<size_t>(b) * sh.heads_kv + g) * sh.dim_k;
    const int parts_before = segment * parts;
    const size_t parts_at = (static_cast<size_t>(b) * sh.heads_kv + g) * (segments - 1) * parts;

    for (int idx = threadIdx.x; idx < s.dkp * s.dvp; idx += blockDim.x) {
        const int r = idx / s.dvp, c = idx % s.dvp;
        float x = 0.f;
        if (r < sh.dim_k && col0 + c < sh.dim_v) {
            if (state_in) x = state_in[(state_at + r) * sh.dim_v + col0 + c];
            for (int part = 0; part < parts_before; ++part) {
                x += partial_states[((parts_at + part) * sh.dim_k + r) * sh.dim_v + col0 + c];
            }
        }
        s.state[r * s.lds + c] = x;
    }
    for (int d = threadIdx.x; d < s.dkp; d += blockDim.x) {
        float x = 0.f;
        if (d < sh.dim_k) {
            if (k_sum_in) x = k_sum_in[state_at + d];
            for (int part = 0; part < parts_before; ++part) x += partial_sums[(parts_at + part) * sh.dim_k + d];
        }
        s.k_sum[d] = x;
    }
    __syncthreads();
    state_to_operand(s);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    constexpr int VEC = 16 / sizeof(T);
    // Whole 16-byte vectors cover the rows (else the scalar loads below).
    const bool vectors = sh.dim_k % VEC == 0 && sh.dim_v % VEC == 0 && s.dkp <= 128;
    Stage<T, 128> stage_q, stage_k;
    Stage<T, 64> stage_v;
    const int first = segment * span, last = min(sh.len, first + span);
    auto issue = [&](int t0) {
        const int len = min(CHUNK, last - t0);
        stage_q.load(q, b, t0, len, sh.len, sh.heads_q, h, sh.dim_k, 0, s.dkp);
        stage_k.load(k, b, t0, len, sh.len, sh.heads_kv, g, sh.dim_k, 0, s.dkp);
        stage_v.load(v, b, t0, len, sh.len, sh.heads_kv, g, sh.dim_v, col0, s.dvp);
    };
    if (vectors) issue(first);
    for (int t0 = first; t0 < last; t0 += CHUNK) {
        const int len = min(CHUNK, last - t0);
        if (vectors) {
            stage_q.template store<true>(s.q, s.ldk, len, sh.dim_k, 0, s.dkp);
            stage_k.template store<true>(s.k, s.ldk, len, sh.dim_k, 0, s.dkp);
            stage_v.template store<false>(s.v, s.ldv, len, sh.dim_v, col0, s.dvp);
        } else {
            load_rows<true>(s.q, s.ldk, q, b, t0, len, sh.len, sh.heads_q, h, sh.dim_k, 0, s.dkp);
            load_rows<true>(s.k, s.ldk, k, b, t0, len, sh.len, sh.heads_kv, g, sh.dim_k, 0, s.dkp);
            load_rows<false>(s.v, s.ldv, v, b, t0, len, sh.len, sh.heads_kv, g, sh.dim_v, col0, s.dvp);
        }
        __syncthreads();
        if (vectors && t0 + CHUNK < last) issue(t0 + CHUNK);

        block_gemm<false, true>(s.scores, s.ldc, s.q, s.ldk, s.k, s.ldk, CHUNK, CHUNK, s.dkp, false);
        __syncthreads();

        // Mask, and each row's denominator: its own scores and the state's z.
        for (int i = warp; i < CHUNK; i += warps) {
            float sum = 0.f;
            for (int j = lane; j < CHUNK; j += 32) {
                const float x = j <= i ? s.scores[i * s.ldc + j] : 0.f;
                sum += x;
                s.scores_t[i * s.ldc + j] = from_float<T>(x);
            }
            for (int d = lane; d < s.dkp; d += 32) sum += to_float(s.q[i * s.ldk + d]) * s.k_sum[d];
            for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            if (lane == 0) s.den[i] = sum;
        }
        __syncthreads();

        block_gemm<false, false>(s.out, s.ldo, s.scores_t, s.ldc, s.v, s.ldv, CHUNK, s.dvp, CHUNK, false);
        block_gemm<false, false>(s.out, s.ldo, s.q, s.ldk, s.state_t, s.lds, CHUNK, s.dvp, s.dkp, true);
        __syncthreads();
        block_gemm<true, false>(s.state, s.lds, s.k, s.ldk, s.v, s.ldv, s.dkp, s.dvp, CHUNK, true);
        add_column_sums(s.k_sum, s.k, s.ldk, len, s.dkp);
        if (den_out && vb == 0) {
            for (int r = threadIdx.x; r < len; r += blockDim.x)
                den_out[(static_cast<size_t>(b) * sh.len + t0 + r) * sh.heads_q + h] = s.den[r] + eps;
        }
        store_outputs(out, s.out, s.ldo, s.den, eps, b, t0, len, sh.len, sh.heads_q, h, sh.dim_v, col0,
                      min(s.dvp, sh.dim_v - col0));
        __syncthreads();
        state_to_operand(s);
    }

    if (segment != segments - 1) return;
    if (state_out) {
        for (int idx = threadIdx.x; idx < sh.dim_k * s.dvp; idx += blockDim.x) {
            const int r = idx / s.dvp, c = idx % s.dvp;
            if (col0 + c < sh.dim_v) state_out[(state_at + r) * sh.dim_v + col0 + c] = s.state[r * s.lds + c];
        }
    }
    if (k_sum_out && vb == 0) {
        for (int d = threadIdx.x; d < sh.dim_k; d += blockDim.x) k_sum_out[state_at + d] = s.k_sum[d];
    }
}

// S and z over the first spans of the sequence. Grid: (value block, kv head, batch x
// spans). With per_span each span's sums are stored apart ([B, H_kv, spans, ...], for the
// segments of the causal form, whose last segment needs none); otherwise they are added
// into one state per head (zeroed by the host), the non-causal form's first pass.
template <typename T>
__device__ void full_state(const T* __restrict__ k, const T* __restrict__ v, Shape sh, int span,
                           float* state, float* k_sum, bool per_span) {
    extern __shared__ __align__(128) char smem[];
    ChunkSmem<T> s(sh.dim_k, sh.value_block);
    s.carve(smem);
    const int vb = blockIdx.x, g = blockIdx.y;
    const int spans = gridDim.z / sh.batch;
    const int b = blockIdx.z / spans, which = blockIdx.z % spans, first = which * span;
    const int last = min(sh.len, first + span);
    const int col0 = vb * s.dvp;
    for (int idx = threadIdx.x; idx < s.dkp * s.dvp; idx += blockDim.x) {
        s.state[(idx / s.dvp) * s.lds + idx % s.dvp] = 0.f;
    }
    for (int d = threadIdx.x; d < s.dkp; d += blockDim.x) s.k_sum[d] = 0.f;
    constexpr int VEC = 16 / sizeof(T);
    const bool vectors = sh.dim_k % VEC == 0 && sh.dim_v % VEC == 0 && s.dkp <= 128;
    Stage<T, 128> stage_k;
    Stage<T, 64> stage_v;
    auto issue = [&](int t0) {
        const int len = min(CHUNK, last - t0);
        stage_k.load(k, b, t0, len, sh.len, sh.heads_kv, g, sh.dim_k, 0, s.dkp);
        stage_v.load(v, b, t0, len, sh.len, sh.heads_kv, g, sh.dim_v, col0, s.dvp);
    };
    if (vectors) issue(first);
    for (int t0 = first; t0 < last; t0 += CHUNK) {
        const int len = min(CHUNK, last - t0);
        __syncthreads();
        if (vectors) {
            stage_k.template store<true>(s.k, s.ldk, len, sh.dim_k, 0, s.dkp);
            stage_v.template store<false>(s.v, s.ldv, len, sh.dim_v, col0, s.dvp);
        } else {
            load_rows<true>(s.k, s.ldk, k, b, t0, len, sh.len, sh.heads_kv, g, sh.dim_k, 0, s.dkp);
            load_rows<false>(s.v, s.ldv, v, b, t0, len, sh.len, sh.heads_kv, g, sh.dim_v, col0, s.dvp);
        }
        __syncthreads();
        if (vectors && t0 + CHUNK < last) issue(t0 + CHUNK);
        block_gemm<true, false>(s.state, s.lds, s.k, s.ldk, s.v, s.ldv, s.dkp, s.dvp, CHUNK, true);
        add_column_sums(s.k_sum, s.k, s.ldk, len, s.dkp);
    }
    __syncthreads();
    const size_t head = static_cast<size_t>(b) * sh.heads_kv + g;
    const size_t state_at = (per_span ? head * spans + which : head) * sh.dim_k;
    for (int idx = threadIdx.x; idx < sh.dim_k * s.dvp; idx += blockDim.x) {
        const int r = idx / s.dvp, c = idx % s.dvp;
        if (col0 + c >= sh.dim_v) continue;
        float* target = &state[(state_at + r) * sh.dim_v + col0 + c];
        if (per_span) {
            *target = s.state[r * s.lds + c];
        } else {
            atomicAdd(target, s.state[r * s.lds + c]);
        }
    }
    if (vb == 0) {
        for (int d = threadIdx.x; d < sh.dim_k; d += blockDim.x) {
            if (per_span) {
                k_sum[state_at + d] = s.k_sum[d];
            } else {
                atomicAdd(&k_sum[state_at + d], s.k_sum[d]);
            }
        }
    }
}

// Non-causal, second pass: O = phi(Q) S / (phi(Q) z + eps) for `span` rows per block.
// Grid: (value block, query head, batch x span).
template <typename T>
__device__ void full_apply(const T* __restrict__ q, T* __restrict__ out, Shape sh, int span,
                           float eps, const float* state, const float* k_sum) {
    extern __shared__ __align__(128) char smem[];
    ChunkSmem<T> s(sh.dim_k, sh.value_block);
    s.carve(smem);
    const int vb = blockIdx.x, h = blockIdx.y;
    const int g = h / (sh.heads_q / sh.heads_kv);
    const int spans = (sh.len + span - 1) / span;
    const int b = blockIdx.z / spans, first = (blockIdx.z % spans) * span;
    const int last = min(sh.len, first + span);
    const int col0 = vb * s.dvp;
    const size_t state_at = (static_cast<size_t>(b) * sh.heads_kv + g) * sh.dim_k;
    for (int idx = threadIdx.x; idx < s.dkp * s.dvp; idx += blockDim.x) {
        const int r = idx / s.dvp, c = idx % s.dvp;
        const float x = (r < sh.dim_k && col0 + c < sh.dim_v) ? state[(state_at + r) * sh.dim_v + col0 + c] : 0.f;
        s.state[r * s.lds + c] = x;
    }
    for (int d = threadIdx.x; d < s.dkp; d += blockDim.x) s.k_sum[d] = d < sh.dim_k ? k_sum[state_at + d] : 0.f;
    __syncthreads();
    state_to_operand(s);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const int width = min(s.dvp, sh.dim_v - col0);
    constexpr int VEC = 16 / sizeof(T);
    const bool vectors = sh.dim_k % VEC == 0 && s.dkp <= 128;
    Stage<T, 128> stage_q;
    if (vectors) stage_q.load(q, b, first, min(CHUNK, last - first), sh.len, sh.heads_q, h, sh.dim_k, 0, s.dkp);
    for (int t0 = first; t0 < last; t0 += CHUNK) {
        const int len = min(CHUNK, last - t0);
        if (vectors) {
            stage_q.template store<true>(s.q, s.ldk, len, sh.dim_k, 0, s.dkp);
        } else {
            load_rows<true>(s.q, s.ldk, q, b, t0, len, sh.len, sh.heads_q, h, sh.dim_k, 0, s.dkp);
        }
        __syncthreads();
        if (vectors && t0 + CHUNK < last) {
            stage_q.load(q, b, t0 + CHUNK, min(CHUNK, last - t0 - CHUNK), sh.len, sh.heads_q, h, sh.dim_k, 0, s.dkp);
        }
        block_gemm<false, false>(s.out, s.ldo, s.q, s.ldk, s.state_t, s.lds, CHUNK, s.dvp, s.dkp, false);
        for (int i = warp; i < CHUNK; i += warps) {
            float sum = 0.f;
            for (int d = lane; d < s.dkp; d += 32) sum += to_float(s.q[i * s.ldk + d]) * s.k_sum[d];
            for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            if (lane == 0) s.den[i] = sum;
        }
        __syncthreads();
        store_outputs(out, s.out, s.ldo, s.den, eps, b, t0, len, sh.len, sh.heads_q, h, sh.dim_v, col0, width);
        __syncthreads();
    }
}

// Rows of S a warp of a decode block has in flight (the block serves DECODE_HEADS query
// heads at a time, from tiles.rs).
constexpr int DECODE_ROWS = 4;

// One decode step for every (batch, kv head): S += phi(k) v^T, z += phi(k) in place, then
// o = phi(q) S / (phi(q) z + eps) for each query head of the group. q and out are
// [B, H_q, D], k and v [B, H_kv, D]. Warp w takes the rows d = w mod warps, lanes take
// the columns (COLS per lane: up to 32 COLS value dims), so each row of S is read once,
// 128 bytes at a time per warp.
template <typename T, int COLS>
__device__ void decode_step(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            T* __restrict__ out, Shape sh, float eps, float* state, float* k_sum) {
    extern __shared__ __align__(128) char smem[];
    const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int group = sh.heads_q / sh.heads_kv;
    const int g = blockIdx.x, b = blockIdx.y;
    float* phi_k = reinterpret_cast<float*>(smem);
    float* phi_q = phi_k + sh.dim_k;                 // DECODE_HEADS x dim_k
    float* value = phi_q + DECODE_HEADS * sh.dim_k;  // dim_v
    float* z = value + sh.dim_v;                     // dim_k
    float* den = z + sh.dim_k;                       // DECODE_HEADS
    float* partial = den + DECODE_HEADS;             // warps x DECODE_HEADS x dim_v
    const size_t kv_row = static_cast<size_t>(b) * sh.heads_kv + g;
    float* s = state + kv_row * sh.dim_k * sh.dim_v;
    float* zs = k_sum + kv_row * sh.dim_k;

    for (int d = threadIdx.x; d < sh.dim_k; d += blockDim.x) {
        phi_k[d] = elu_plus_one(to_float(k[kv_row * sh.dim_k + d]));
        z[d] = zs[d] + phi_k[d];
        zs[d] = z[d];
    }
    for (int c = threadIdx.x; c < sh.dim_v; c += blockDim.x) value[c] = to_float(v[kv_row * sh.dim_v + c]);

    for (int h0 = 0; h0 < group; h0 += DECODE_HEADS) {
        const int heads = min(DECODE_HEADS, group - h0);
        const size_t q_row = static_cast<size_t>(b) * sh.heads_q + g * group + h0;
        __syncthreads();
        for (int idx = threadIdx.x; idx < heads * sh.dim_k; idx += blockDim.x) {
            phi_q[idx] = elu_plus_one(to_float(q[q_row * sh.dim_k + idx]));
        }
        __syncthreads();
        float acc[DECODE_HEADS][COLS];
#pragma unroll
        for (int a = 0; a < DECODE_HEADS; ++a)
#pragma unroll
            for (int c = 0; c < COLS; ++c) acc[a][c] = 0.f;
        // DECODE_ROWS rows per warp at a time, every load issued before the first use: the
        // step is a pass over S, and its time is how many loads are in flight.
        for (int d0 = warp; d0 < sh.dim_k; d0 += DECODE_ROWS * warps) {
            float x[DECODE_ROWS][COLS];
#pragma unroll
            for (int r = 0; r < DECODE_ROWS; ++r)
#pragma unroll
                for (int c = 0; c < COLS; ++c) {
                    const int d = d0 + r * warps, col = lane + 32 * c;
                    x[r][c] = d < sh.dim_k && col < sh.dim_v ? s[static_cast<size_t>(d) * sh.dim_v + col] : 0.f;
                }
#pragma unroll
            for (int r = 0; r < DECODE_ROWS; ++r) {
                const int d = d0 + r * warps;
                if (d >= sh.dim_k) break;
#pragma unroll
                for (int c = 0; c < COLS; ++c) {
                    const int col = lane + 32 * c;
                    if (col < sh.dim_v) {
                        if (h0 == 0) {
                            x[r][c] = fmaf(phi_k[d], value[col], x[r][c]);
                            s[static_cast<size_t>(d) * sh.dim_v + col] = x[r][c];
                        }
#pragma unroll
                        for (int a = 0; a < DECODE_HEADS; ++a)
                            acc[a][c] = fmaf(phi_q[a * sh.dim_k + d], x[r][c], acc[a][c]);
                    }
                }
            }
        }
#pragma unroll
        for (int a = 0; a < DECODE_HEADS; ++a)
#pragma unroll
            for (int c = 0; c < COLS; ++c) {
                const int col = lane + 32 * c;
                if (col < sh.dim_v) partial[(warp * DECODE_HEADS + a) * sh.dim_v + col] = acc[a][c];
            }
        if (warp < heads) {
            float sum = 0.f;
            for (int d = lane; d < sh.dim_k; d += 32) sum += phi_q[warp * sh.dim_k + d] * z[d];
            for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            if (lane == 0) den[warp] = sum + eps;
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < heads * sh.dim_v; idx += blockDim.x) {
            const int a = idx / sh.dim_v, col = idx % sh.dim_v;
            float sum = 0.f;
            for (int w = 0; w < warps; ++w) sum += partial[(w * DECODE_HEADS + a) * sh.dim_v + col];
            out[(q_row + a) * sh.dim_v + col] = from_float<T>(sum / den[a]);
        }
    }
}

}  // namespace linattn
