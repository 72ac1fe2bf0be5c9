// The gated family on the tensor cores: 16-bit q, k, v with d_k, d_v in {64, 128} and at
// most one log decay per token and value head (retention, gla with a per-head gate, the
// delta rule, the gated delta rule). Compiled after gated.cu, whose Shape and conventions
// these kernels share; mma.sync m16n8k16 with f32 accumulators, operands from shared
// memory by ldmatrix, the next chunk's tiles loaded by cp.async while one is computed.
//
// With G the log decays summed from a chunk's start and S the state before it:
//   U = V, or for the delta rule U = W (V − (e^G ⊙ K) S) with W = (I + A)^{-1} Diag(β),
//       A_ij = β_i e^{G_i − G_j} k_i·k_j (j < i);
//   O = scale (e^G ⊙ Q S) + P U, P_ij = scale e^{G_i − G_j} q_i·k_j (j ≤ i);
//   S ← e^{G_last} S + (e^{G_last − G} ⊙ K)ᵀ U.
// P and W do not depend on the state: `prepare` computes them for every (chunk, value
// head) at once, a parallel pass, and leaves them in global memory (C × C each per chunk,
// an eighth of what q, k, v and o move at d = 128), so that the sequential walk, `scan`,
// has only the products that need the state. A scan block takes one (sequence, value
// head) and COLUMNS value columns: every column of S, U and O is computed apart from the
// others, so the columns of a head split over blocks. Each of its four warps keeps the
// state of its 16 columns, Sᵀ (16 × d_k), in registers as mma accumulators for the whole
// sequence; their layout is the B operand of Q S and K S, so the state never passes
// through shared memory. Every exponent is ≤ 0.

namespace linattn {
namespace gated_mma {

using gated::Shape;
using gated::FLOAT_MAX;
using namespace mma;

// COLUMNS (value columns per scan block) and THREADS (of either kernel) come from
// tiles.rs.
constexpr int C = CHUNK;
constexpr int WARPS = THREADS / 32;
// The row stride of C-wide 16-bit tiles (W, P) and of a block's value columns.
constexpr int LDC = C + PAD;
constexpr int LDV = COLUMNS + PAD;
static_assert(COLUMNS == 16 * WARPS, "a warp owns 16 value columns");

// What both kernels take beside the Shape; ChunkParams in gated.rs mirrors it (a test
// checks the layout against this declaration).
struct ChunkParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    // Log decays [B, T, HV] (null: none, or `fixed`), fixed ones per value head
    // (retention), β [B, T, HV] (the delta rule).
    const float* g;
    const float* fixed;
    const float* beta;
    const float* state_in;
    float* state_out;
    // N + 1 token offsets of packed sequences, and N + 1 chunk offsets (each sequence's
    // first chunk of `scores` and `w`); both null for batch rows.
    const long long* cu_seqlens;
    const int* chunk_offsets;
    // P and (the delta rule) W of every chunk, [chunks, HV, C, C] of the element type:
    // `prepare` writes them, `scan` reads them.
    void* scores;
    void* w;
    // The first bad flat index of g, then of β (as in gated.cu).
    long long* bad;
    float scale;
    float beta_max;
    int sequences;
    int l2norm;
};

struct Span {
    long long first;  // the sequence's first token, a flat row of [B·T]
    int len;
};

__device__ __forceinline__ Span sequence_span(const Shape& s, const ChunkParams& p, int n) {
    if (p.cu_seqlens) return {p.cu_seqlens[n], static_cast<int>(p.cu_seqlens[n + 1] - p.cu_seqlens[n])};
    return {static_cast<long long>(n) * s.len, s.len};
}

__device__ __forceinline__ int first_chunk(const Shape& s, const ChunkParams& p, int n) {
    return p.chunk_offsets ? p.chunk_offsets[n] : n * ((s.len + C - 1) / C);
}

// The sequence that chunk `chunk` (of all sequences') belongs to: the last one whose first
// chunk is at or before it (a sequence without tokens has no chunk, and is never found).
__device__ int sequence_of(const Shape& s, const ChunkParams& p, int chunk) {
    if (!p.chunk_offsets) return chunk / ((s.len + C - 1) / C);
    int lo = 0, hi = p.sequences - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (p.chunk_offsets[mid] <= chunk) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// A C-row tile of WIDTH columns into dst (rows LD apart) from src (row r at src + r ·
// stride), in flight until wait_copies; rows from `valid` on are zero.
template <int WIDTH, int LD, typename T>
__device__ __forceinline__ void load_rows(T* dst, const T* src, long long stride, int valid) {
    constexpr int VEC = 8, PER_ROW = WIDTH / VEC, ROWS_PER_PASS = THREADS / PER_ROW;
    static_assert(THREADS % PER_ROW == 0 && C % ROWS_PER_PASS == 0, "whole rows per pass");
    const int r0 = threadIdx.x / PER_ROW, c = (threadIdx.x % PER_ROW) * VEC;
#pragma unroll
    for (int pass = 0; pass < C / ROWS_PER_PASS; ++pass) {
        const int r = r0 + pass * ROWS_PER_PASS;
        const bool ok = r < valid;
        copy_async(dst + r * LD + c, ok ? src + r * stride + c : src, ok);
    }
}

// A chunk's rows scaled to unit length in place (flash-linear-attention's l2norm: 1e-6
// under the root), 16 rows a warp; a lane holds D / 32 elements of each, and the 16
// rows' sums cross the lanes together.
template <int D, typename T> __device__ void normalise_rows(T* tile, int warp) {
    constexpr int LD = row_stride<D>(), WORDS = D / 64, ROWS = C / WARPS;
    const int lane = threadIdx.x % 32;
    unsigned words[ROWS][WORDS];
    float sums[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
        const unsigned* at = reinterpret_cast<const unsigned*>(tile + (warp * ROWS + i) * LD + lane * 2 * WORDS);
        sums[i] = 0.f;
#pragma unroll
        for (int w = 0; w < WORDS; ++w) {
            words[i][w] = at[w];
            float lo, hi;
            unpack<T>(words[i][w], lo, hi);
            sums[i] = fmaf(lo, lo, fmaf(hi, hi, sums[i]));
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
#pragma unroll
        for (int i = 0; i < ROWS; ++i) sums[i] += __shfl_xor_sync(0xffffffffu, sums[i], offset);
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
        const float inverse = rsqrtf(sums[i] + 1e-6f);
        unsigned* at = reinterpret_cast<unsigned*>(tile + (warp * ROWS + i) * LD + lane * 2 * WORDS);
#pragma unroll
        for (int w = 0; w < WORDS; ++w) {
            float lo, hi;
            unpack<T>(words[i][w], lo, hi);
            at[w] = pack_value<T>(lo * inverse, hi * inverse);
        }
    }
}

// Warp 0's share of a chunk's log decays: lane l holds rows 2l and 2l + 1 (0 past the
// chunk's valid rows, so that G stays at G_last there). Nothing waits for the loads
// here: the scan reads the next chunk's while it computes this one.
__device__ __forceinline__ float2 chunk_gates(const Shape& s, const ChunkParams& p, long long t0, int valid, int hv) {
    const int lane = threadIdx.x % 32;
    float x[2] = {0.f, 0.f};
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int r = 2 * lane + e;
        if (r >= valid) continue;
        if (p.g) {
            x[e] = p.g[(t0 + r) * s.heads_v + hv];
        } else if (p.fixed) {
            x[e] = p.fixed[hv];
        }
    }
    return make_float2(x[0], x[1]);
}

// Reports through bad[0] an element of chunk_gates' pair that is out of range (g > 0 or
// not finite).
__device__ __forceinline__ void check_gates(const Shape& s, const ChunkParams& p, long long t0, int valid, int hv,
                                            float2 g) {
    const int lane = threadIdx.x % 32;
    const float x[2] = {g.x, g.y};
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const int r = 2 * lane + e;
        if (p.g && r < valid && !(x[e] <= 0.f && x[e] >= -FLOAT_MAX)) atomicMin(p.bad, (t0 + r) * s.heads_v + hv);
    }
}

// G, the log decays summed from the chunk's start, into gs from warp 0's pairs.
__device__ __forceinline__ void sum_gates(float* gs, float2 g) {
    const int lane = threadIdx.x % 32;
    const float pair = g.x + g.y;
    float inclusive = pair;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
        const float y = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += y;
    }
    const float before = inclusive - pair;
    gs[2 * lane] = before + g.x;
    gs[2 * lane + 1] = before + pair;
}

// Block (i, j) of X Yᵀ for two C × D tiles (rows 16i.. of X, 16j.. of Y): acc[t] holds
// columns 16j + 8t...
template <int D, typename T>
__device__ __forceinline__ void block_product(float (&acc)[2][4], const T* x, const T* y, int i, int j) {
    constexpr int LD = row_stride<D>();
    const int lane = threadIdx.x % 32;
    const unsigned rows = element_address<LD>(x, 16 * i + lane % 16, (lane / 16) * 8);
    const unsigned columns = element_address<LD>(y, 16 * j + lane % 8 + (lane / 16) * 8, ((lane / 8) % 2) * 8);
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        unsigned a[4], b[4];
        load_matrices(a, rows + 2u * 16 * kk);
        load_matrices(b, columns + 2u * 16 * kk);
        product<T>(acc[0], a, b[0], b[1]);
        product<T>(acc[1], a, b[2], b[3]);
    }
}

// The ten 16 × 16 blocks on and below a C × C matrix's diagonal, in turn: block n is
// (i, j).
__device__ __forceinline__ void lower_block(int n, int& i, int& j) {
    i = n >= 6 ? 3 : n >= 3 ? 2 : n >= 1 ? 1 : 0;
    j = n - i * (i + 1) / 2;
}
constexpr int LOWER_BLOCKS = (C / 16) * (C / 16 + 1) / 2;

// A C × C tile in f32 (rows LDA apart, entries above the diagonal ignored), each column
// scaled by `column_scale`, rounded to T into dst, zero above the diagonal: 16-byte
// stores, a row's 128 bytes from eight consecutive threads.
template <typename T, int LDA> __device__ void store_lower(T* dst, const float* tile, const float* column_scale) {
    for (int e = 8 * threadIdx.x; e < C * C; e += 8 * THREADS) {
        const int r = e / C, col = e % C;
        uint4 packed;
        unsigned* words = reinterpret_cast<unsigned*>(&packed);
#pragma unroll
        for (int x = 0; x < 4; ++x) {
            const int c0 = col + 2 * x, c1 = c0 + 1;
            words[x] = pack_value<T>(c0 <= r ? tile[r * LDA + c0] * column_scale[c0] : 0.f,
                                     c1 <= r ? tile[r * LDA + c1] * column_scale[c1] : 0.f);
        }
        *reinterpret_cast<uint4*>(dst + e) = packed;
    }
}

// c[n] += X Y over one 16 × 16 × 16 block in TF32 (10-bit mantissas, f32 sums), X and Y
// f32 in shared memory, rows LD apart: X's block at (x_row, x_col), Y's at (y_row,
// y_col); c[n] holds columns 8n.. of the result in the mma accumulator layout. For the
// blocks of W below its diagonal: their error (2^-11 relative) is no larger than the
// 16-bit rounding W is stored with, and the tensor cores take them out of the inverse's
// critical path.
template <int LD>
__device__ __forceinline__ void block_product_tf32(float (&c)[2][4], const float* x, int x_row, int x_col,
                                                   const float* y, int y_row, int y_col) {
    const int g = (threadIdx.x % 32) / 4, t = threadIdx.x % 4;
    auto tf32 = [](float v) {
        unsigned r;
        asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
        return r;
    };
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
        const float* xr = x + (x_row + g) * LD + x_col + 8 * kk + t;
        const unsigned a0 = tf32(xr[0]), a1 = tf32(xr[8 * LD]), a2 = tf32(xr[4]), a3 = tf32(xr[8 * LD + 4]);
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            const float* yr = y + (y_row + 8 * kk + t) * LD + y_col + 8 * n + g;
            const unsigned b0 = tf32(yr[0]), b1 = tf32(yr[4 * LD]);
            asm volatile(
                "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                "{%0, %1, %2, %3};\n"
                : "+f"(c[n][0]), "+f"(c[n][1]), "+f"(c[n][2]), "+f"(c[n][3])
                : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
        }
    }
}

// The shared memory of a prepare block: q and k rows (16-bit, padded), whose space W and
// a block row's sums (f32 rows of C + 1) take over once the scores are made; then A, G
// and β. gated.rs computes the same size.
template <int DK> struct PrepareTiles {
    static constexpr int LDK = row_stride<DK>(), LDA = C + 1;
    static constexpr int ROWS_BYTES = 2 * C * LDK * 2, INVERSE_BYTES = (C + 16) * LDA * 4;
    static constexpr int A = ROWS_BYTES > INVERSE_BYTES ? ROWS_BYTES : INVERSE_BYTES;  // byte offset of A
};

// What the scan needs of one (chunk, value head) that does not depend on the state,
// computed for every chunk at once: P (the masked, decayed, scaled scores, rounded to T)
// and, for the delta rule, W = (I + A)^{-1} Diag(β), in f32 and stored rounded to T.
// P and A come from the tensor cores. W: the four 16 × 16 diagonal blocks of the
// inverse by forward substitution (a warp each, a lane a column), then each block row
// below from those above it, W_ij = −W_ii Σ_{m=j}^{i−1} A_im W_mj, a warp a block. Only
// the blocks on and below the diagonal of P are written: the scan reads no others.
template <typename T, int DK, bool DELTA> __device__ void prepare(const Shape s, const ChunkParams p) {
    extern __shared__ __align__(16) unsigned char shared[];
    using L = PrepareTiles<DK>;
    constexpr int LDK = L::LDK, LDA = L::LDA;
    T* qs = reinterpret_cast<T*>(shared);
    T* ks = qs + C * LDK;
    float* ws = reinterpret_cast<float*>(shared);  // W (C × C), once q and k are spent
    float* rs = ws + C * LDA;                      // a block row's sums (16 × C)
    float* as = reinterpret_cast<float*>(shared + L::A);
    float* gs = as + C * LDA;
    float* bs = gs + C;
    const int chunk = blockIdx.x, hv = blockIdx.y, h = hv / (s.heads_v / s.heads);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int n = sequence_of(s, p, chunk);
    const Span span = sequence_span(s, p, n);
    const int c = chunk - first_chunk(s, p, n), valid = min(C, span.len - c * C);
    const long long t0 = span.first + static_cast<long long>(c) * C;
    const long long row = t0 * s.heads + h, stride = static_cast<long long>(s.heads) * DK;
    load_rows<DK, LDK>(qs, static_cast<const T*>(p.q) + row * DK, stride, valid);
    load_rows<DK, LDK>(ks, static_cast<const T*>(p.k) + row * DK, stride, valid);
    commit_copies();
    if (DELTA && tid < C) {
        float b = 0.f;
        if (tid < valid) {
            const long long at = (t0 + tid) * s.heads_v + hv;
            b = p.beta[at];
            if (!(b >= 0.f && b <= p.beta_max)) atomicMin(p.bad + 1, at);
        }
        bs[tid] = b;
    }
    if (warp == 0) sum_gates(gs, chunk_gates(s, p, t0, valid, hv));
    wait_copies();
    __syncthreads();
    if (p.l2norm) {
        normalise_rows<DK>(qs, warp);
        normalise_rows<DK>(ks, warp);
        __syncthreads();
    }
    const long long tile = (static_cast<long long>(chunk) * s.heads_v + hv) * C * C;
    T* scores = static_cast<T*>(p.scores) + tile;
    // The blocks on and below the diagonal of P (to global memory), then of A.
    for (int b = warp; b < (DELTA ? 2 : 1) * LOWER_BLOCKS; b += WARPS) {
        const bool of_p = b < LOWER_BLOCKS;
        int i, j;
        lower_block(of_p ? b : b - LOWER_BLOCKS, i, j);
        float acc[2][4];
        block_product<DK>(acc, of_p ? qs : ks, ks, i, j);
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = 16 * i + lane / 4 + 8 * half, col = 16 * j + 8 * t + 2 * (lane % 4);
                float x[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float decay = __expf(gs[r] - gs[col + e]), product = acc[t][2 * half + e];
                    x[e] = of_p ? (col + e <= r ? p.scale * decay * product : 0.f)
                                : (col + e < r ? bs[r] * decay * product : 0.f);
                }
                if (of_p) {
                    *reinterpret_cast<unsigned*>(scores + r * C + col) = pack_value<T>(x[0], x[1]);
                } else {
                    as[r * LDA + col] = x[0];
                    as[r * LDA + col + 1] = x[1];
                }
            }
    }
    if constexpr (!DELTA) return;
    __syncthreads();
    {
        // Diagonal block `warp`: lane l (and l + 16, which computes the same) solves for
        // column l % 16, top to bottom.
        const int base = 16 * warp, col = lane % 16;
        float x[16];
#pragma unroll
        for (int r = 0; r < 16; ++r) {
            float sum = r == col ? 1.f : 0.f;
#pragma unroll
            for (int j = 0; j < r; ++j) sum = fmaf(-as[(base + r) * LDA + base + j], x[j], sum);
            x[r] = sum;
        }
        if (lane < 16) {
#pragma unroll
            for (int r = 0; r < 16; ++r) ws[(base + r) * LDA + base + col] = x[r];
        }
    }
    __syncthreads();
    const int g = lane / 4, t = lane % 4;
    for (int i = 1; i < C / 16; ++i) {
        if (warp < i) {
            // R = Σ_{m=j}^{i−1} A_im W_mj for j = warp, into rs's columns 16j.., then
            // W_ij = −W_ii R.
            float sums[2][4] = {};
            for (int m = warp; m < i; ++m) block_product_tf32<LDA>(sums, as, 16 * i, 16 * m, ws, 16 * m, 16 * warp);
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) rs[(g + 8 * (e / 2)) * LDA + 16 * warp + 8 * nt + 2 * t + e % 2] = sums[nt][e];
            __syncwarp();
            float block[2][4] = {};
            block_product_tf32<LDA>(block, ws, 16 * i, 16 * i, rs, 0, 16 * warp);
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    ws[(16 * i + g + 8 * (e / 2)) * LDA + 16 * warp + 8 * nt + 2 * t + e % 2] = -block[nt][e];
        }
        __syncthreads();
    }
    store_lower<T, LDA>(static_cast<T*>(p.w) + tile, ws, bs);
}

// The shared memory of a scan block, in elements of T: two stages of q, k (C × d_k), v
// (C × COLUMNS), P and, for the delta rule, W (C × C); then U and the decayed U (what
// the state absorbs), and G in f32. gated.rs computes the same size.
template <int DK, bool DELTA> struct ScanTiles {
    static constexpr int LDK = row_stride<DK>();
    static constexpr int Q = 0, K = Q + 2 * C * LDK, V = K + 2 * C * LDK, P = V + 2 * C * LDV,
                         W = P + 2 * C * LDC, U = W + (DELTA ? 2 * C * LDC : 0), DECAYED = U + C * LDV,
                         END = DECAYED + C * LDV;
};

// One (sequence, value head, COLUMNS value columns) through its chunks.
template <typename T, int DK, bool DELTA> __device__ void scan(const Shape s, const ChunkParams p) {
    extern __shared__ __align__(16) unsigned char shared[];
    using L = ScanTiles<DK, DELTA>;
    constexpr int LDK = L::LDK;
    T* tiles = reinterpret_cast<T*>(shared);
    float* gs = reinterpret_cast<float*>(tiles + L::END);
    const int hv = blockIdx.x, n = blockIdx.y, col0 = blockIdx.z * COLUMNS;
    const int h = hv / (s.heads_v / s.heads), dv = s.dim_v;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const Span span = sequence_span(s, p, n);
    const int chunks = (span.len + C - 1) / C, chunk0 = first_chunk(s, p, n);
    const T* q = static_cast<const T*>(p.q);
    const T* k = static_cast<const T*>(p.k);
    const T* v = static_cast<const T*>(p.v);
    T* out = static_cast<T*>(p.out);
    // Sᵀ of the warp's columns: st[j][e] is (column state_column(e, warp), feature
    // state_feature(j, e)), as in the linear kernels.
    const long long unit = static_cast<long long>(n) * s.heads_v + hv;
    const int my_col0 = col0 + 16 * warp;
    float st[DK / 8][4];
#pragma unroll
    for (int j = 0; j < DK / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const long long at = (unit * DK + state_feature(j, e)) * dv + col0 + state_column(e, warp);
            st[j][e] = p.state_in ? p.state_in[at] : 0.f;
        }
    auto issue = [&](int c) {
        const int stage = c & 1, valid = min(C, span.len - c * C);
        const long long t0 = span.first + static_cast<long long>(c) * C;
        load_rows<DK, LDK>(tiles + L::Q + stage * C * LDK, q + (t0 * s.heads + h) * DK,
                           static_cast<long long>(s.heads) * DK, valid);
        load_rows<DK, LDK>(tiles + L::K + stage * C * LDK, k + (t0 * s.heads + h) * DK,
                           static_cast<long long>(s.heads) * DK, valid);
        load_rows<COLUMNS, LDV>(tiles + L::V + stage * C * LDV, v + (t0 * s.heads_v + hv) * dv + col0,
                                static_cast<long long>(s.heads_v) * dv, valid);
        const long long tile = (static_cast<long long>(chunk0 + c) * s.heads_v + hv) * C * C;
        load_rows<C, LDC>(tiles + L::P + stage * C * LDC, static_cast<const T*>(p.scores) + tile, C, C);
        if constexpr (DELTA) load_rows<C, LDC>(tiles + L::W + stage * C * LDC, static_cast<const T*>(p.w) + tile, C, C);
        commit_copies();
    };
    auto gates_of = [&](int c) {
        const long long t0 = span.first + static_cast<long long>(c) * C;
        return chunk_gates(s, p, t0, min(C, span.len - c * C), hv);
    };
    float2 next_gates = make_float2(0.f, 0.f);
    if (chunks > 0) {
        issue(0);
        if (warp == 0) next_gates = gates_of(0);
    }
    for (int c = 0; c < chunks; ++c) {
        // Every warp is done with the stage chunk c + 1 fills, and with G and P.
        __syncthreads();
        const float2 gates = next_gates;
        if (c + 1 < chunks) {
            issue(c + 1);
            if (warp == 0) next_gates = gates_of(c + 1);
        }
        if (warp == 0) {
            sum_gates(gs, gates);
            if (blockIdx.z == 0) {
                check_gates(s, p, span.first + static_cast<long long>(c) * C, min(C, span.len - c * C), hv, gates);
            }
        }
        if (c + 1 < chunks) wait_copies_but_newest(); else wait_copies();
        __syncthreads();
        const int stage = c & 1, valid = min(C, span.len - c * C);
        const long long t0 = span.first + static_cast<long long>(c) * C;
        T* qs = tiles + L::Q + stage * C * LDK;
        T* ks = tiles + L::K + stage * C * LDK;
        const T* vs = tiles + L::V + stage * C * LDV;
        const T* ps = tiles + L::P + stage * C * LDC;
        T* us = tiles + L::U;
        T* decayed = tiles + L::DECAYED;
        if (p.l2norm) {
            normalise_rows<DK>(qs, warp);
            normalise_rows<DK>(ks, warp);
            __syncthreads();
        }
        // Q S (and K S) for the warp's columns: m-tile i, n-tile t; the B operand is the
        // state rounded to T.
        float qs_acc[4][2][4] = {}, ks_acc[4][2][4] = {};
        {
            const unsigned query_rows = element_address<LDK>(qs, lane % 16, (lane / 16) * 8);
            const unsigned key_rows = element_address<LDK>(ks, lane % 16, (lane / 16) * 8);
#pragma unroll
            for (int kk = 0; kk < DK / 16; ++kk) {
                const float* lo = st[2 * kk];
                const float* hi = st[2 * kk + 1];
                const unsigned b00 = pack_value<T>(lo[0], lo[1]), b01 = pack_value<T>(hi[0], hi[1]);
                const unsigned b10 = pack_value<T>(lo[2], lo[3]), b11 = pack_value<T>(hi[2], hi[3]);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    unsigned a[4];
                    load_matrices(a, query_rows + 2u * (16 * i * LDK + 16 * kk));
                    product<T>(qs_acc[i][0], a, b00, b01);
                    product<T>(qs_acc[i][1], a, b10, b11);
                    if constexpr (DELTA) {
                        load_matrices(a, key_rows + 2u * (16 * i * LDK + 16 * kk));
                        product<T>(ks_acc[i][0], a, b00, b01);
                        product<T>(ks_acc[i][1], a, b10, b11);
                    }
                }
            }
        }
        const float g_last = gs[valid - 1];
        // The rows' decays: e^{G_r} and e^{G_last − G_r} for the lane's rows 16i + lane / 4
        // + 8 half.
        float decay[4][2], remaining[4][2];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const float g = gs[16 * i + lane / 4 + 8 * half];
                decay[i][half] = __expf(g);
                remaining[i][half] = __expf(g_last - g);
            }
        // The B operand of the warp's columns of a row-major C-row tile (ldmatrix.trans):
        // add 2 (16 kk LD) bytes for rows 16kk...
        auto value_columns = [&](const T* tile, int ld) {
            return shared_address(tile) + 2u * ((lane % 8 + ((lane / 8) % 2) * 8) * ld + 16 * warp + (lane / 16) * 8);
        };
        const T* u_tile;
        if constexpr (DELTA) {
            // V − e^G ⊙ K S into U's tile, then U = W times it.
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int t = 0; t < 2; ++t)
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int r = 16 * i + lane / 4 + 8 * half, col = 16 * warp + 8 * t + 2 * (lane % 4);
                        float v0, v1;
                        unpack<T>(*reinterpret_cast<const unsigned*>(vs + r * LDV + col), v0, v1);
                        const float e = decay[i][half];
                        *reinterpret_cast<unsigned*>(us + r * LDV + col) = pack_value<T>(
                            v0 - e * ks_acc[i][t][2 * half], v1 - e * ks_acc[i][t][2 * half + 1]);
                    }
            __syncwarp();
            const T* ws = tiles + L::W + stage * C * LDC;
            float u_acc[4][2][4] = {};
            const unsigned w_rows = element_address<LDC>(ws, lane % 16, (lane / 16) * 8);
            const unsigned x_columns = value_columns(us, LDV);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int kk = 0; kk <= i; ++kk) {
                    unsigned a[4], b[4];
                    load_matrices(a, w_rows + 2u * (16 * i * LDC + 16 * kk));
                    load_matrices_transposed(b, x_columns + 2u * 16 * kk * LDV);
                    product<T>(u_acc[i][0], a, b[0], b[1]);
                    product<T>(u_acc[i][1], a, b[2], b[3]);
                }
            __syncwarp();
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int t = 0; t < 2; ++t)
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int r = 16 * i + lane / 4 + 8 * half, col = 16 * warp + 8 * t + 2 * (lane % 4);
                        float u0 = u_acc[i][t][2 * half], u1 = u_acc[i][t][2 * half + 1];
                        *reinterpret_cast<unsigned*>(us + r * LDV + col) = pack<T>(u0, u1);
                        const float e = remaining[i][half];
                        *reinterpret_cast<unsigned*>(decayed + r * LDV + col) = pack_value<T>(e * u0, e * u1);
                    }
            u_tile = us;
        } else {
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int t = 0; t < 2; ++t)
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int r = 16 * i + lane / 4 + 8 * half, col = 16 * warp + 8 * t + 2 * (lane % 4);
                        float v0, v1;
                        unpack<T>(*reinterpret_cast<const unsigned*>(vs + r * LDV + col), v0, v1);
                        const float e = remaining[i][half];
                        *reinterpret_cast<unsigned*>(decayed + r * LDV + col) = pack_value<T>(e * v0, e * v1);
                    }
            u_tile = vs;
        }
        // O = scale e^G ⊙ Q S + P U.
        {
            const unsigned p_rows = element_address<LDC>(ps, lane % 16, (lane / 16) * 8);
            const unsigned u_columns = value_columns(u_tile, LDV);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
                for (int t = 0; t < 2; ++t)
#pragma unroll
                    for (int e = 0; e < 4; ++e) qs_acc[i][t][e] *= p.scale * decay[i][e / 2];
#pragma unroll
                for (int kk = 0; kk <= i; ++kk) {
                    unsigned a[4], b[4];
                    load_matrices(a, p_rows + 2u * (16 * i * LDC + 16 * kk));
                    load_matrices_transposed(b, u_columns + 2u * 16 * kk * LDV);
                    product<T>(qs_acc[i][0], a, b[0], b[1]);
                    product<T>(qs_acc[i][1], a, b[2], b[3]);
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int r = 16 * i + lane / 4 + 8 * half;
                    if (r >= valid) continue;
                    T* row = out + ((t0 + r) * s.heads_v + hv) * dv + my_col0 + 2 * (lane % 4);
#pragma unroll
                    for (int t = 0; t < 2; ++t)
                        *reinterpret_cast<unsigned*>(row + 8 * t) =
                            pack_value<T>(qs_acc[i][t][2 * half], qs_acc[i][t][2 * half + 1]);
                }
        }
        // Sᵀ ← e^{G_last} Sᵀ + (decayed U)ᵀ K.
        {
            const float e = __expf(g_last);
#pragma unroll
            for (int j = 0; j < DK / 8; ++j)
#pragma unroll
                for (int x = 0; x < 4; ++x) st[j][x] *= e;
            const unsigned u_rows = shared_address(decayed) +
                                    2u * ((lane % 8 + (lane / 16) * 8) * LDV + 16 * warp + ((lane / 8) % 2) * 8);
            const unsigned key_rows = element_address<LDK>(ks, lane % 8 + ((lane / 8) % 2) * 8, (lane / 16) * 8);
            __syncwarp();
#pragma unroll
            for (int sk = 0; sk < C / 16; ++sk) {
                unsigned a[4];
                load_matrices_transposed(a, u_rows + 2u * 16 * sk * LDV);
#pragma unroll
                for (int f = 0; f < DK / 16; ++f) {
                    unsigned b[4];
                    load_matrices_transposed(b, key_rows + 2u * (16 * sk * LDK + 16 * f));
                    product<T>(st[2 * f], a, b[0], b[1]);
                    product<T>(st[2 * f + 1], a, b[2], b[3]);
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < DK / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const long long at = (unit * DK + state_feature(j, e)) * dv + col0 + state_column(e, warp);
            p.state_out[at] = st[j][e];
        }
}

}  // namespace gated_mma
}  // namespace linattn

#define LINATTN_GATED_MMA(NAME, T, DK)                                                                          \
    extern "C" __global__ void __launch_bounds__(linattn::gated_mma::THREADS)                                  \
        gated_prepare_##NAME##_##DK##_delta(linattn::gated::Shape s, linattn::gated_mma::ChunkParams p) {      \
        linattn::gated_mma::prepare<T, DK, true>(s, p);                                                       \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(linattn::gated_mma::THREADS)                                  \
        gated_prepare_##NAME##_##DK##_plain(linattn::gated::Shape s, linattn::gated_mma::ChunkParams p) {      \
        linattn::gated_mma::prepare<T, DK, false>(s, p);                                                      \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(linattn::gated_mma::THREADS)                                  \
        gated_scan_##NAME##_##DK##_delta(linattn::gated::Shape s, linattn::gated_mma::ChunkParams p) {         \
        linattn::gated_mma::scan<T, DK, true>(s, p);                                                          \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(linattn::gated_mma::THREADS)                                  \
        gated_scan_##NAME##_##DK##_plain(linattn::gated::Shape s, linattn::gated_mma::ChunkParams p) {         \
        linattn::gated_mma::scan<T, DK, false>(s, p);                                                         \
    }
LINATTN_GATED_MMA(bf16, __nv_bfloat16, 64)
LINATTN_GATED_MMA(bf16, __nv_bfloat16, 128)
LINATTN_GATED_MMA(f16, __half, 64)
LINATTN_GATED_MMA(f16, __half, 128)
