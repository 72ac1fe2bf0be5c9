// Exact softmax attention forward. For 16-bit tensors with head dims of 64 or 128, on
// the tensor cores in FlashAttention-2's schedule:
// a block of four warps owns 64 query rows (16 per warp, their Q fragments in
// registers) and walks the visible key tiles of 64 with an online softmax, so the
// T x T scores never leave registers. K and V tiles are double-buffered with cp.async.
// Full, causal (top-left aligned, as on the CPU) and sliding-window masks, GQA.
//
// Every thread holds two query rows (lane / 4 and lane / 4 + 8 of its warp's 16), so
// a row's maximum and sum are reduced over the four lanes of a quad.

namespace linattn {
namespace flash {

// ROWS (query rows per block), KEYS (keys per tile) and THREADS: tiles.rs.

struct Problem {
    int batch, len_q, len_k, heads_q, heads_kv;
    // Query row i sits at key position i + q_start (0 for one call, where queries and keys
    // start together; a decoder's position in its cache otherwise), and k and v hold
    // kv_rows rows per sequence (len_k for one call, a cache's capacity otherwise).
    int q_start, kv_rows;
    // Key j is visible from the query at position i when i - left <= j <= i + right; -1 is
    // unbounded.
    int left, right;
    // The softmax scale times log2(e): the exponentials are exp2.
    float scale_log2;
};

// What both exact kernels take beside the Problem, as one struct so that host and kernels
// name each argument instead of counting positions: SoftmaxParams in softmax.rs mirrors
// it, and a test checks the layout against this declaration. Tensors are of the kernel's
// element type; the head dims are the general kernel's (the tensor-core one has its D
// built in).
struct SoftmaxParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    int dim_k, dim_v;
};

template <typename T, int D>
__device__ void forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        T* __restrict__ out, Problem p) {
    using namespace mma;
    const float minus_infinity = __int_as_float(0xff800000);
    constexpr int LD = row_stride<D>(), TILE = ROWS * LD;
    extern __shared__ __align__(128) char smem[];
    T* qs = reinterpret_cast<T*>(smem);
    T* tiles = qs + TILE;  // 2 stages x (k, v)
    // Causal and windowed tiles differ in length: the longest start first.
    const int tile = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z, g = h / (p.heads_q / p.heads_kv);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int q0 = tile * ROWS, rows = min(ROWS, p.len_q - q0), at0 = q0 + p.q_start;
    const int first = p.left < 0 ? 0 : max(0, at0 - p.left) / KEYS * KEYS;
    const int last = p.right < 0 ? p.len_k : min(p.len_k, at0 + rows + p.right);

    load_tile<D, THREADS>(qs, q, b, q0, rows, p.len_q, p.heads_q, h);
    auto issue = [&](int j0, int stage) {
        T* at = tiles + stage * 2 * TILE;
        const int keys = min(KEYS, p.len_k - j0);
        load_tile<D, THREADS>(at, k, b, j0, keys, p.kv_rows, p.heads_kv, g);
        load_tile<D, THREADS>(at + TILE, v, b, j0, keys, p.kv_rows, p.heads_kv, g);
    };
    if (first < last) issue(first, 0);
    commit_copies();

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
    float row_max[2] = {minus_infinity, minus_infinity}, row_sum[2] = {0.f, 0.f};
    const int upper = q0 + 16 * warp + lane / 4;
    unsigned qf[D / 16][4];

    int stage = 0;
    for (int j0 = first; j0 < last; j0 += KEYS, stage ^= 1) {
        wait_copies();
        __syncthreads();
        if (j0 == first) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                load_matrices(qf[kk], qs + (16 * warp + lane % 16) * LD + 16 * kk + (lane / 16) * 8);
        }
        if (j0 + KEYS < last) issue(j0 + KEYS, stage ^ 1);
        commit_copies();
        const T* ks = tiles + stage * 2 * TILE;
        const T* vs = ks + TILE;

        float s[KEYS / 8][4];
#pragma unroll
        for (int n = 0; n < KEYS / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int pair = 0; pair < KEYS / 16; ++pair) {
                unsigned bb[4];
                load_matrices(bb, ks + (16 * pair + lane % 8 + (lane / 16) * 8) * LD + 16 * kk + ((lane / 8) % 2) * 8);
                product<T>(s[2 * pair], qf[kk], bb[0], bb[1]);
                product<T>(s[2 * pair + 1], qf[kk], bb[2], bb[3]);
            }
        }
        // Only tiles that cross the sequence's end or a mask edge test every score.
        const bool edge = j0 + KEYS > p.len_k || (p.right >= 0 && j0 + KEYS - 1 > at0 + p.right) ||
                          (p.left >= 0 && j0 < at0 + ROWS - 1 - p.left);
#pragma unroll
        for (int n = 0; n < KEYS / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[n][e] * p.scale_log2;
                if (edge) {
                    const int i = upper + p.q_start + 8 * (e / 2), j = j0 + 8 * n + (lane % 4) * 2 + e % 2;
                    const bool visible = j < p.len_k && (p.left < 0 || j + p.left >= i) && (p.right < 0 || j <= i + p.right);
                    if (!visible) x = minus_infinity;
                }
                s[n][e] = x;
            }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float largest = row_max[r];
#pragma unroll
            for (int n = 0; n < KEYS / 8; ++n) largest = fmaxf(largest, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
            largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, 1));
            largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, 2));
            // A row with nothing visible yet keeps -inf; 0 as its reference keeps exp2 finite.
            const float reference = largest == minus_infinity ? 0.f : largest;
            const float correction = fast_exp2(row_max[r] - reference);
            row_max[r] = largest;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < KEYS / 8; ++n) {
                s[n][2 * r] = fast_exp2(s[n][2 * r] - reference);
                s[n][2 * r + 1] = fast_exp2(s[n][2 * r + 1] - reference);
                sum += s[n][2 * r] + s[n][2 * r + 1];
            }
            row_sum[r] = row_sum[r] * correction + sum;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                o[n][2 * r] *= correction;
                o[n][2 * r + 1] *= correction;
            }
        }
        // O += P V, P's accumulator layout reused as the A operand.
#pragma unroll
        for (int sk = 0; sk < KEYS / 16; ++sk) {
            const unsigned a[4] = {pack_value<T>(s[2 * sk][0], s[2 * sk][1]), pack_value<T>(s[2 * sk][2], s[2 * sk][3]),
                                   pack_value<T>(s[2 * sk + 1][0], s[2 * sk + 1][1]),
                                   pack_value<T>(s[2 * sk + 1][2], s[2 * sk + 1][3])};
#pragma unroll
            for (int pair = 0; pair < D / 16; ++pair) {
                unsigned bb[4];
                load_matrices_transposed(bb, vs + (16 * sk + lane % 8 + ((lane / 8) % 2) * 8) * LD + 16 * pair + (lane / 16) * 8);
                product<T>(o[2 * pair], a, bb[0], bb[1]);
                product<T>(o[2 * pair + 1], a, bb[2], bb[3]);
            }
        }
    }
    // A block that saw no key still has its query tile in flight.
    wait_copies();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = row_sum[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int i = upper + 8 * r;
        if (i >= p.len_q) continue;
        // A query that sees no key (possible only with a window past the keys' end) gets 0.
        const float inverse = sum > 0.f ? 1.f / sum : 0.f;
        T* row = out + ((static_cast<size_t>(b) * p.len_q + i) * p.heads_q + h) * D + (lane % 4) * 2;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            *reinterpret_cast<unsigned*>(row + 8 * n) = pack_value<T>(o[n][2 * r] * inverse, o[n][2 * r + 1] * inverse);
    }
}

// Every other shape and element type (f32 to f32 accuracy, head dims up to 256, any
// value dim) on the CUDA cores: a block of 128 threads owns 32 query rows, four threads
// a row, each holding every fourth column of its query and output in registers, and
// walks key tiles of 32 in shared memory with the same masks and an online softmax.
namespace general {

// ROWS, KEYS, THREADS and COLUMNS (a thread holds a quarter of a row: head dims up to
// 4 x COLUMNS): tiles.rs.

template <typename T>
__device__ void forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        T* __restrict__ out, Problem p, int dim_k, int dim_v) {
    extern __shared__ __align__(16) float shared[];
    float* ks = shared;              // KEYS x dim_k
    float* vs = ks + KEYS * dim_k;   // KEYS x dim_v
    const float minus_infinity = __int_as_float(0xff800000);
    const int tile = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z, g = h / (p.heads_q / p.heads_kv);
    const int part = threadIdx.x % 4;
    const int q0 = tile * ROWS, i = q0 + threadIdx.x / 4, rows = min(ROWS, p.len_q - q0);
    const bool row = i < p.len_q;

    float query[COLUMNS], o[COLUMNS];
#pragma unroll
    for (int c = 0; c < COLUMNS; ++c) {
        const int d = part + 4 * c;
        query[c] = row && d < dim_k ? to_float(q[((static_cast<size_t>(b) * p.len_q + i) * p.heads_q + h) * dim_k + d]) : 0.f;
        o[c] = 0.f;
    }
    float row_max = minus_infinity, row_sum = 0.f;
    const int at0 = q0 + p.q_start, at = i + p.q_start;
    const int first = p.left < 0 ? 0 : max(0, at0 - p.left) / KEYS * KEYS;
    const int last = p.right < 0 ? p.len_k : min(p.len_k, at0 + rows + p.right);
    for (int j0 = first; j0 < last; j0 += KEYS) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < KEYS * dim_k; idx += THREADS) {
            const int j = j0 + idx / dim_k;
            ks[idx] = j < p.len_k ? to_float(k[((static_cast<size_t>(b) * p.kv_rows + j) * p.heads_kv + g) * dim_k + idx % dim_k]) : 0.f;
        }
        for (int idx = threadIdx.x; idx < KEYS * dim_v; idx += THREADS) {
            const int j = j0 + idx / dim_v;
            vs[idx] = j < p.len_k ? to_float(v[((static_cast<size_t>(b) * p.kv_rows + j) * p.heads_kv + g) * dim_v + idx % dim_v]) : 0.f;
        }
        __syncthreads();
        for (int key = 0; key < KEYS; ++key) {
            float score = 0.f;
#pragma unroll
            for (int c = 0; c < COLUMNS; ++c) {
                const int d = part + 4 * c;
                if (d < dim_k) score = fmaf(query[c], ks[key * dim_k + d], score);
            }
            // The row's four threads are adjacent lanes: every lane takes part.
            score += __shfl_xor_sync(0xffffffffu, score, 1);
            score += __shfl_xor_sync(0xffffffffu, score, 2);
            const int j = j0 + key;
            const bool visible = j < p.len_k && (p.left < 0 || j + p.left >= at) && (p.right < 0 || j <= at + p.right);
            if (!visible) continue;
            const float x = score * p.scale_log2;
            const float largest = fmaxf(row_max, x);
            const float correction = fast_exp2(row_max - largest), weight = fast_exp2(x - largest);
            row_max = largest;
            row_sum = row_sum * correction + weight;
#pragma unroll
            for (int c = 0; c < COLUMNS; ++c) {
                const int d = part + 4 * c;
                if (d < dim_v) o[c] = fmaf(weight, vs[key * dim_v + d], o[c] * correction);
            }
        }
    }
    if (!row) return;
    // A query that sees no key (possible only with a window past the keys' end) gets 0.
    const float inverse = row_sum > 0.f ? 1.f / row_sum : 0.f;
#pragma unroll
    for (int c = 0; c < COLUMNS; ++c) {
        const int d = part + 4 * c;
        if (d < dim_v) out[((static_cast<size_t>(b) * p.len_q + i) * p.heads_q + h) * dim_v + d] = from_float<T>(o[c] * inverse);
    }
}

}  // namespace general
}  // namespace flash
}  // namespace linattn

#define LINATTN_FLASH_INSTANCES(SUFFIX, T, D)                                                               \
    extern "C" __global__ void __launch_bounds__(linattn::flash::THREADS, 2)                                \
        softmax_forward_##SUFFIX##_d##D(linattn::flash::Problem problem, linattn::flash::SoftmaxParams p) { \
        linattn::flash::forward<T, D>(static_cast<const T*>(p.q), static_cast<const T*>(p.k),               \
                                      static_cast<const T*>(p.v), static_cast<T*>(p.out), problem);         \
    }

LINATTN_FLASH_INSTANCES(bf16, __nv_bfloat16, 64)
LINATTN_FLASH_INSTANCES(bf16, __nv_bfloat16, 128)
LINATTN_FLASH_INSTANCES(f16, __half, 64)
LINATTN_FLASH_INSTANCES(f16, __half, 128)

#define LINATTN_GENERAL_INSTANCE(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(linattn::flash::general::THREADS)                           \
        softmax_forward_general_##SUFFIX(linattn::flash::Problem problem, linattn::flash::SoftmaxParams p) { \
        linattn::flash::general::forward<T>(static_cast<const T*>(p.q), static_cast<const T*>(p.k),          \
                                            static_cast<const T*>(p.v), static_cast<T*>(p.out), problem,     \
                                            p.dim_k, p.dim_v);                                               \
    }

LINATTN_GENERAL_INSTANCE(f32, float)
LINATTN_GENERAL_INSTANCE(bf16, __nv_bfloat16)
LINATTN_GENERAL_INSTANCE(f16, __half)
