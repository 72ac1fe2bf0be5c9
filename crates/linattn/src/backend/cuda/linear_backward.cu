// Backward of causal linear attention (bf16, D_k = D_v in {64, 128}, as many kv heads as
// query heads), compiled after linear.cu. With phi = elu + 1, o_i = n_i / d_i,
// n_i = sum_{j <= i} (phi(q_i) . phi(k_j)) v_j, d_i = sum_{j <= i} phi(q_i) . phi(k_j) + eps,
// and g_i = do_i / d_i, h_i = -(do_i . o_i) / d_i:
//
//   dphi(q_i) = sum_{j <= i} (g_i . v_j) phi(k_j)  +  h_i sum_{j <= i} phi(k_j)
//   dphi(k_j) = sum_{i >= j} (v_j . g_i) phi(q_i)  +  sum_{i >= j} h_i phi(q_i)
//   dv_j      = sum_{i >= j} (phi(k_j) . phi(q_i)) g_i
//
// The first term of each is linear attention without map or denominator (causal for
// dphi(q), anti-causal for the others): the tensor-core causal kernel, PLAIN and, for the
// anti-causal ones, REVERSE. The second terms are prefix and suffix sums over the sequence,
// taken per chunk (chunk_sums, then scan_chunk_sums over the chunks) and finished row by
// row in finish_gradients, which also applies phi'(x) = (x > 0 ? 1 : e^x).

namespace linattn {
namespace backward {

using T = __nv_bfloat16;

// What the element-wise and prefix-sum kernels below take beside the Shape, one struct for
// the four so that host and kernels name each argument instead of counting positions:
// BackwardParams in linear_backward.rs mirrors it, and a test checks the layout against
// this declaration (and its bound, as LinearParams's; the scan counts the chunks from the
// Shape). A kernel reads the fields it uses; the host leaves the rest null or 0.
struct BackwardParams {
    // The forward pass's inputs, output and denominators, and the output's gradient.
    const T* q;
    const T* k;
    const T* out;
    const T* d_out;
    const float* den;
    // What prepare writes for the passes after it: g = do / d, h = -(do . o) / d, and the
    // mapped queries and keys.
    T* g;
    float* h;
    T* phi_q;
    T* phi_k;
    // The first terms of dphi(q) and dphi(k), from the plain passes.
    const float* a;
    const float* bk;
    // Per chunk, [B, H, chunks, D]: written by chunk_sums, scanned in place by scan.
    float* key_sums;
    float* weighted_query_sums;
    T* dq;
    T* dk;
    // Rows (b, t, h) of the tensors, for prepare.
    long long rows;
};

// Four consecutive values, moved as one 8-byte access: a warp then reads or writes whole
// rows per instruction, which the element-wise kernels below need to come near the
// copy bandwidth.
struct Four {
    float x[4];
};

__device__ __forceinline__ Four load_four(const T* p) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
    return {{lo.x, lo.y, hi.x, hi.y}};
}

__device__ __forceinline__ void store_four(T* p, const Four& v) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x[0], v.x[1]);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(v.x[2], v.x[3]);
    uint2 raw;
    raw.x = *reinterpret_cast<const unsigned*>(&lo);
    raw.y = *reinterpret_cast<const unsigned*>(&hi);
    *reinterpret_cast<uint2*>(p) = raw;
}

// D/4 lanes per row (b, t, h), four values each: g = do / d (rounded to T, an operand of
// the passes), h = -(do . o) / d, phi(q) and phi(k) rounded to T as the forward pass used
// them.
template <int D>
__device__ void prepare(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ out,
                        const T* __restrict__ d_out, const float* __restrict__ den, T* __restrict__ g,
                        float* __restrict__ h, T* __restrict__ phi_q, T* __restrict__ phi_k, long long rows) {
    constexpr int LANES_PER_ROW = D / 4;
    const int lane = threadIdx.x % 32;
    const long long row = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / LANES_PER_ROW;
    const bool live = row < rows;
    float dot = 0.f, inverse = 0.f;
    if (live) {
        inverse = 1.f / den[row];
        const long long at = row * D + (lane % LANES_PER_ROW) * 4;
        const Four gradient = load_four(d_out + at), output = load_four(out + at);
        Four scaled, mapped_q = load_four(q + at), mapped_k = load_four(k + at);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            dot = fmaf(gradient.x[e], output.x[e], dot);
            scaled.x[e] = gradient.x[e] * inverse;
            mapped_q.x[e] = elu_plus_one(mapped_q.x[e]);
            mapped_k.x[e] = elu_plus_one(mapped_k.x[e]);
        }
        store_four(g + at, scaled);
        store_four(phi_q + at, mapped_q);
        store_four(phi_k + at, mapped_k);
    }
#pragma unroll
    for (int offset = LANES_PER_ROW / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    if (live && lane % LANES_PER_ROW == 0) h[row] = -dot * inverse;
}

// Per (chunk, head, batch), thread d: the chunk's sums of phi(k)[., d] and of
// h . phi(q)[., d], into [B, H, chunks, D].
template <int D>
__device__ void chunk_sums(const T* __restrict__ phi_q, const T* __restrict__ phi_k, const float* __restrict__ h,
                           Shape sh, float* key_sums, float* weighted_query_sums) {
    const int c = blockIdx.x, chunks = gridDim.x, head = blockIdx.y, b = blockIdx.z, d = threadIdx.x;
    const int t0 = c * CHUNK, len = min(CHUNK, sh.len - t0);
    float keys = 0.f, queries = 0.f;
#pragma unroll 8
    for (int r = 0; r < len; ++r) {
        const size_t row = (static_cast<size_t>(b) * sh.len + t0 + r) * sh.heads_q + head;
        keys += to_float(phi_k[row * D + d]);
        queries = fmaf(h[row], to_float(phi_q[row * D + d]), queries);
    }
    const size_t at = ((static_cast<size_t>(b) * sh.heads_q + head) * chunks + c) * D + d;
    key_sums[at] = keys;
    weighted_query_sums[at] = queries;
}

// Per (head, batch), thread d: the key sums become the sums of the chunks before each
// chunk, the weighted query sums those of the chunks after it.
template <int D>
__device__ void scan_chunk_sums(Shape sh, int chunks, float* key_sums, float* weighted_query_sums) {
    const size_t at = (static_cast<size_t>(blockIdx.y) * sh.heads_q + blockIdx.x) * chunks * D + threadIdx.x;
    float before = 0.f;
    for (int c = 0; c < chunks; ++c) {
        const float own = key_sums[at + static_cast<size_t>(c) * D];
        key_sums[at + static_cast<size_t>(c) * D] = before;
        before += own;
    }
    float after = 0.f;
    for (int c = chunks - 1; c >= 0; --c) {
        const float own = weighted_query_sums[at + static_cast<size_t>(c) * D];
        weighted_query_sums[at + static_cast<size_t>(c) * D] = after;
        after += own;
    }
}

__device__ __forceinline__ float elu_plus_one_slope(float x) { return x > 0.f ? 1.f : __expf(x); }

// phi(x) rounded to T, as the passes and the chunk sums saw it.
__device__ __forceinline__ float rounded_phi(float x) { return to_float(from_float<T>(elu_plus_one(x))); }

// Per (chunk, head, batch), thread d/2 for columns d and d + 1 (4- and 8-byte accesses):
// dq = (a + h z) phi'(q) with z the sums of phi(k) through the row, and dk = (bk + s)
// phi'(k) with s the sums of h phi(q) from the row on (a and bk the PLAIN passes'
// outputs, kept in f32: each nearly cancels the sum added to it, as g_i . v_j + h_i =
// g_i . (v_j - o_i)). phi is recomputed from q and k, which are read for phi' anyway.
template <int D>
__device__ void finish_gradients(const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ h,
                                 const float* __restrict__ a, const float* __restrict__ bk, const float* key_sums,
                                 const float* weighted_query_sums, Shape sh, T* __restrict__ dq,
                                 T* __restrict__ dk) {
    const int c = blockIdx.x, chunks = gridDim.x, head = blockIdx.y, b = blockIdx.z, d = 2 * threadIdx.x;
    const int t0 = c * CHUNK, len = min(CHUNK, sh.len - t0);
    const size_t at = ((static_cast<size_t>(b) * sh.heads_q + head) * chunks + c) * D + d;
    const auto pair = [](const T* p) { return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p)); };
    const auto put = [](T* p, float x, float y) { *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y); };
    float2 z = *reinterpret_cast<const float2*>(key_sums + at);
#pragma unroll 8
    for (int r = 0; r < len; ++r) {
        const size_t row = (static_cast<size_t>(b) * sh.len + t0 + r) * sh.heads_q + head;
        const size_t e = row * D + d;
        const float2 key = pair(k + e), query = pair(q + e);
        const float2 first = *reinterpret_cast<const float2*>(a + e);
        const float weight = h[row];
        z.x += rounded_phi(key.x);
        z.y += rounded_phi(key.y);
        put(dq + e, fmaf(weight, z.x, first.x) * elu_plus_one_slope(query.x),
            fmaf(weight, z.y, first.y) * elu_plus_one_slope(query.y));
    }
    float2 s = *reinterpret_cast<const float2*>(weighted_query_sums + at);
#pragma unroll 8
    for (int r = len - 1; r >= 0; --r) {
        const size_t row = (static_cast<size_t>(b) * sh.len + t0 + r) * sh.heads_q + head;
        const size_t e = row * D + d;
        const float2 key = pair(k + e), query = pair(q + e);
        const float2 first = *reinterpret_cast<const float2*>(bk + e);
        const float weight = h[row];
        s.x = fmaf(weight, rounded_phi(query.x), s.x);
        s.y = fmaf(weight, rounded_phi(query.y), s.y);
        put(dk + e, (first.x + s.x) * elu_plus_one_slope(key.x), (first.y + s.y) * elu_plus_one_slope(key.y));
    }
}

}  // namespace backward
}  // namespace linattn

// The plain passes (bf16 operands; NAME_d<D> is linear_<NAME>_d<D>, its output of type O).
#define LINATTN_PLAIN_INSTANCE(D, NAME, REVERSE, O)                                                       \
    extern "C" __global__ void __launch_bounds__(32 * linattn::mma::PRODUCER_WARPS + 2 * D, 1)            \
        linear_##NAME##_d##D(linattn::Shape shape, linattn::LinearParams p) {                             \
        linattn::mma::causal_forward<__nv_bfloat16, D, true, REVERSE, O>(                                 \
            static_cast<const __nv_bfloat16*>(p.q), static_cast<const __nv_bfloat16*>(p.k),               \
            static_cast<const __nv_bfloat16*>(p.v), static_cast<O*>(p.out), shape, 0.f, nullptr, nullptr, \
            nullptr, nullptr, p.span, p.parts, p.partial_states, nullptr, nullptr);                       \
    }

#define LINATTN_BACKWARD_INSTANCES(D)                                                                       \
    LINATTN_PLAIN_INSTANCE(D, causal_plain_bf16_f32, false, float)                                          \
    LINATTN_PLAIN_INSTANCE(D, anticausal_plain_bf16_f32, true, float)                                       \
    LINATTN_PLAIN_INSTANCE(D, anticausal_plain_bf16_bf16, true, __nv_bfloat16)                              \
    extern "C" __global__ void __launch_bounds__(2 * D, 2)                                                  \
        linear_state_plain_bf16_d##D(linattn::Shape shape, linattn::LinearParams p) {                       \
        linattn::mma::state_pass<__nv_bfloat16, D, true, false>(                                            \
            static_cast<const __nv_bfloat16*>(p.k), static_cast<const __nv_bfloat16*>(p.v), shape, p.span,  \
            p.state_out, p.k_sum_out, p.per_span != 0);                                                     \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(2 * D, 2)                                                  \
        linear_anticausal_state_plain_bf16_d##D(linattn::Shape shape, linattn::LinearParams p) {            \
        linattn::mma::state_pass<__nv_bfloat16, D, true, true>(                                             \
            static_cast<const __nv_bfloat16*>(p.k), static_cast<const __nv_bfloat16*>(p.v), shape, p.span,  \
            p.state_out, p.k_sum_out, p.per_span != 0);                                                     \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256)                                                       \
        linear_backward_prepare_bf16_d##D(linattn::Shape shape, linattn::backward::BackwardParams p) {      \
        linattn::backward::prepare<D>(p.q, p.k, p.out, p.d_out, p.den, p.g, p.h, p.phi_q, p.phi_k, p.rows); \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(D)                                                         \
        linear_backward_chunk_sums_bf16_d##D(linattn::Shape shape, linattn::backward::BackwardParams p) {   \
        linattn::backward::chunk_sums<D>(p.phi_q, p.phi_k, p.h, shape, p.key_sums, p.weighted_query_sums);  \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(D)                                                         \
        linear_backward_scan_bf16_d##D(linattn::Shape shape, linattn::backward::BackwardParams p) {         \
        const int chunks = (shape.len + linattn::CHUNK - 1) / linattn::CHUNK;                               \
        linattn::backward::scan_chunk_sums<D>(shape, chunks, p.key_sums, p.weighted_query_sums);            \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(D / 2)                                                     \
        linear_backward_finish_bf16_d##D(linattn::Shape shape, linattn::backward::BackwardParams p) {       \
        linattn::backward::finish_gradients<D>(p.q, p.k, p.h, p.a, p.bk, p.key_sums, p.weighted_query_sums, \
                                               shape, p.dq, p.dk);                                          \
    }

LINATTN_BACKWARD_INSTANCES(64)
LINATTN_BACKWARD_INSTANCES(128)
