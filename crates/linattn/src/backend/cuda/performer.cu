// Performer (FAVOR+) attention, non-causal, with the feature map fused into both passes.
// Compiled after linear.cu, whose block_gemm, load_rows, add_column_sums and
// store_outputs it uses.
//
// With p = omega x' (x' = x d^(-1/4), folded into omega by the host), diag = |x'|^2 / 2
// and ratio = m^(-1/2), as performer-pytorch's softmax_kernel:
//   phi(q) = ratio (exp(p - diag - max_f p) + eps)     (each query's own maximum)
//   phi(k) = ratio (exp(p - diag - C) + eps)           (C: the maximum over every key)
//   out = phi(Q) S / (phi(Q) z),  S = sum_j phi(k_j) v_j^T,  z = sum_j phi(k_j).
// The key pass takes a span of keys per block with the span's own running maximum; the
// merge brings the spans to the common C and adds the eps terms (ratio eps sum_j v_j and
// ratio eps count); the apply pass maps each chunk of queries and divides.

namespace linattn {
namespace performer {

// What the three FAVOR+ kernels take beside the Shape and the feature count, one struct for
// all so that host and kernels name each argument instead of counting positions:
// PerformerParams in performer.rs mirrors it, and a test checks the layout against this
// declaration (and its bound, as LinearParams's). A kernel reads the fields it uses; the
// host leaves the rest null or 0. q, k, v, omega and out are of the kernel's element type.
//
// The feature count travels as an argument of its own: read from this struct, it changed
// NVVM's code for the passes enough that ptxas spilled registers in apply (bf16) and keys
// (f32), and the bf16 performer ran 9% slower on an H100.
struct PerformerParams {
    const void* q;
    const void* k;
    const void* v;
    const void* omega;
    void* out;
    // Per span, [B, H_kv, spans, ...]: written by keys, read by merge.
    float* states;
    float* k_sums;
    float* v_sums;
    float* maxima;
    // The merged state: written by merge, read by apply.
    float* state;
    float* k_sum;
    // Rows per span (keys, apply) and spans per sequence (merge).
    int span, spans;
    float ratio, eps;
    // What merge adds for the eps terms: ratio eps.
    float constant;
};

// NVRTC has no <cmath>: -inf spelled as its bits.
__device__ __forceinline__ float minus_infinity() { return __int_as_float(0xff800000); }

// Per-row statistics of a chunk's projection live in rows of f32; the features
// overwrite them in place as T, each row by the one warp that read it.
template <typename T> __host__ __device__ constexpr int feature_stride(int ldp) {
    return ldp * static_cast<int>(sizeof(float) / sizeof(T));
}

template <typename T> struct KeySmem {
    int ldk, ldp, ldv, lds;
    T* k;
    float* projection;
    T* v;
    float *state, *k_sum, *v_sum, *diag, *warp_max;

    __host__ __device__ KeySmem(int dim, int features, int value_block)
        : ldk(dim + PAD), ldp(features + PAD), ldv(value_block + PAD), lds(value_block + PAD) {}
    __device__ void carve(char* base, int features, int value_block) {
        Carver c{base};
        k = c.take<T>(CHUNK * ldk);
        projection = c.take<float>(CHUNK * ldp);
        v = c.take<T>(CHUNK * ldv);
        state = c.take<float>(features * lds);
        k_sum = c.take<float>(features);
        v_sum = c.take<float>(value_block);
        diag = c.take<float>(CHUNK);
        warp_max = c.take<float>(32);
    }
};

template <typename T> struct QuerySmem {
    int ldk, ldp, lds, ldo;
    T* q;
    float* projection;
    T* state;
    float *out, *z, *den, *diag;

    __host__ __device__ QuerySmem(int dim, int features, int value_block)
        : ldk(dim + PAD), ldp(features + PAD), lds(value_block + PAD), ldo(value_block + PAD) {}
    __device__ void carve(char* base, int features, int value_block) {
        Carver c{base};
        q = c.take<T>(CHUNK * ldk);
        projection = c.take<float>(CHUNK * ldp);
        state = c.take<T>(features * lds);
        out = c.take<float>(CHUNK * ldo);
        z = c.take<float>(features);
        den = c.take<float>(CHUNK);
        diag = c.take<float>(CHUNK);
    }
};

// |x'|^2 / 2 of each row of x (CHUNK x dim, ld), a warp per row.
template <typename T> __device__ void half_norms(float* diag, const T* x, int ld, int dim, float scale) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int r = warp; r < CHUNK; r += warps) {
        float sum = 0.f;
        for (int d = lane; d < dim; d += 32) {
            const float x_d = to_float(x[r * ld + d]);
            sum = fmaf(x_d, x_d, sum);
        }
        for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (lane == 0) diag[r] = 0.5f * scale * sum;
    }
}

// Largest projection in each row (rows < len), a warp per row; returns the warp's.
__device__ float row_max(const float* projection, int ldp, int features, int r) {
    const int lane = threadIdx.x % 32;
    float best = minus_infinity();
    for (int f = lane; f < features; f += 32) best = fmaxf(best, projection[r * ldp + f]);
    for (int off = 16; off > 0; off /= 2) best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, off));
    return best;
}

// Row r of the projection becomes ratio (exp(p - diag - shift) + eps) in T, in place (0
// for rows past the chunk's end); every lane reads its values before any lane writes.
template <typename T, int MAX_PER_LANE>
__device__ void map_row(float* projection, int ldp, int features, int r, bool valid, float shift, float ratio,
                        float eps, const float* z, float* dot) {
    const int lane = threadIdx.x % 32;
    float mapped[MAX_PER_LANE];
    float sum = 0.f;
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; ++e) {
        const int f = lane + 32 * e;
        mapped[e] = 0.f;
        if (valid && f < features) {
            mapped[e] = ratio * (__expf(projection[r * ldp + f] - shift) + eps);
            if (z) sum = fmaf(to_float(from_float<T>(mapped[e])), z[f], sum);
        }
    }
    __syncwarp();
    T* row = reinterpret_cast<T*>(projection) + r * feature_stride<T>(ldp);
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; ++e) {
        const int f = lane + 32 * e;
        if (f < features) row[f] = from_float<T>(mapped[e]);
    }
    if (z) {
        for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (lane == 0) *dot = sum;
    }
}

// MAX_FEATURES: tiles.rs.
constexpr int PER_LANE = MAX_FEATURES / 32;

// First pass. Grid: (value block, kv head, batch x spans). Writes per span the state
// sum_j e_j v_j^T and key sums sum_j e_j with e_j = ratio exp(p_j - diag_j - C_span),
// the value sums, and C_span, at [B, H_kv, spans, ...].
template <typename T>
__device__ void keys(const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ omega, Shape sh,
                     int features, int span, float ratio, float* states, float* k_sums, float* v_sums,
                     float* maxima) {
    extern __shared__ __align__(128) char smem[];
    KeySmem<T> s(sh.dim_k, features, sh.value_block);
    s.carve(smem, features, sh.value_block);
    const int vb = blockIdx.x, g = blockIdx.y;
    const int spans = gridDim.z / sh.batch;
    const int b = blockIdx.z / spans, which = blockIdx.z % spans, first = which * span;
    const int last = min(sh.len, first + span);
    const int col0 = vb * sh.value_block, width = sh.value_block;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const float diag_scale = rsqrtf(static_cast<float>(sh.dim_k));
    for (int idx = threadIdx.x; idx < features * width; idx += blockDim.x) {
        s.state[(idx / width) * s.lds + idx % width] = 0.f;
    }
    for (int f = threadIdx.x; f < features; f += blockDim.x) s.k_sum[f] = 0.f;
    for (int c = threadIdx.x; c < width; c += blockDim.x) s.v_sum[c] = 0.f;
    float running = minus_infinity();  // the same in every thread
    const int ld_features = feature_stride<T>(s.ldp);
    // The next chunk's rows are in flight in registers while this one is computed.
    constexpr int VEC = 16 / sizeof(T);
    const bool vector_values = sh.dim_v % VEC == 0;
    Stage<T, 128> stage_k;
    Stage<T, 64> stage_v;
    auto issue = [&](int t0) {
        const int len = min(CHUNK, last - t0);
        stage_k.load(k, b, t0, len, sh.len, sh.heads_kv, g, sh.dim_k, 0, sh.dim_k);
        if (vector_values) stage_v.load(v, b, t0, len, sh.len, sh.heads_kv, g, sh.dim_v, col0, width);
    };
    issue(first);
    for (int t0 = first; t0 < last; t0 += CHUNK) {
        const int len = min(CHUNK, last - t0);
        __syncthreads();
        stage_k.template store<false>(s.k, s.ldk, len, sh.dim_k, 0, sh.dim_k);
        if (vector_values) {
            stage_v.template store<false>(s.v, s.ldv, len, sh.dim_v, col0, width);
        } else {
            load_rows<false>(s.v, s.ldv, v, b, t0, len, sh.len, sh.heads_kv, g, sh.dim_v, col0, width);
        }
        __syncthreads();
        if (t0 + CHUNK < last) issue(t0 + CHUNK);
        block_gemm<false, true>(s.projection, s.ldp, s.k, s.ldk, omega, sh.dim_k, CHUNK, features, sh.dim_k, false);
        half_norms(s.diag, s.k, s.ldk, sh.dim_k, diag_scale);
        add_column_sums(s.v_sum, s.v, s.ldv, len, width);
        __syncthreads();
        float best = minus_infinity();
        for (int r = warp; r < len; r += warps) best = fmaxf(best, row_max(s.projection, s.ldp, features, r));
        if (lane == 0) s.warp_max[warp] = best;
        __syncthreads();
        float top = running;
        for (int w = 0; w < warps; ++w) top = fmaxf(top, s.warp_max[w]);
        if (top > running && running > minus_infinity()) {
            // A larger maximum: what was summed so far is rescaled to it.
            const float factor = __expf(running - top);
            for (int idx = threadIdx.x; idx < features * width; idx += blockDim.x) {
                s.state[(idx / width) * s.lds + idx % width] *= factor;
            }
            for (int f = threadIdx.x; f < features; f += blockDim.x) s.k_sum[f] *= factor;
        }
        running = top;
        for (int r = warp; r < CHUNK; r += warps) {
            map_row<T, PER_LANE>(s.projection, s.ldp, features, r, r < len, s.diag[r] + running, ratio, 0.f,
                                 nullptr, nullptr);
        }
        __syncthreads();
        const T* phi = reinterpret_cast<const T*>(s.projection);
        block_gemm<true, false>(s.state, s.lds, phi, ld_features, s.v, s.ldv, features, width, CHUNK, true);
        add_column_sums(s.k_sum, phi, ld_features, len, features);
    }
    __syncthreads();
    const size_t at = (static_cast<size_t>(b) * sh.heads_kv + g) * spans + which;
    for (int idx = threadIdx.x; idx < features * width; idx += blockDim.x) {
        const int f = idx / width, c = idx % width;
        if (col0 + c < sh.dim_v) states[(at * features + f) * sh.dim_v + col0 + c] = s.state[f * s.lds + c];
    }
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        if (col0 + c < sh.dim_v) v_sums[at * sh.dim_v + col0 + c] = s.v_sum[c];
    }
    if (vb == 0) {
        for (int f = threadIdx.x; f < features; f += blockDim.x) k_sums[at * features + f] = s.k_sum[f];
        if (threadIdx.x == 0) maxima[at] = running;
    }
}

// The spans of each (kv head, batch) brought to their common maximum, with the eps
// terms: S = sum_s S_s e^(C_s - C) + ratio eps sum_j v_j, z likewise with the count.
// Grid: (kv head, batch).
__device__ void merge(Shape sh, int features, int spans, float constant, const float* states,
                      const float* k_sums, const float* v_sums, const float* maxima, float* state, float* k_sum) {
    const int g = blockIdx.x, b = blockIdx.y;
    const size_t head = static_cast<size_t>(b) * sh.heads_kv + g;
    float top = minus_infinity();
    for (int s = 0; s < spans; ++s) top = fmaxf(top, maxima[head * spans + s]);
    for (int idx = threadIdx.x; idx < features * sh.dim_v; idx += blockDim.x) {
        const int c = idx % sh.dim_v;
        float sum = 0.f, values = 0.f;
        for (int s = 0; s < spans; ++s) {
            const size_t at = head * spans + s;
            sum = fmaf(states[at * features * sh.dim_v + idx], __expf(maxima[at] - top), sum);
            values += v_sums[at * sh.dim_v + c];
        }
        state[head * features * sh.dim_v + idx] = fmaf(constant, values, sum);
    }
    for (int f = threadIdx.x; f < features; f += blockDim.x) {
        float sum = 0.f;
        for (int s = 0; s < spans; ++s) {
            const size_t at = head * spans + s;
            sum = fmaf(k_sums[at * features + f], __expf(maxima[at] - top), sum);
        }
        k_sum[head * features + f] = fmaf(constant, static_cast<float>(sh.len), sum);
    }
}

// Second pass: O = phi(Q) S / (phi(Q) z) for `span` query rows per block. Grid: (value
// block, query head, batch x spans).
template <typename T>
__device__ void apply(const T* __restrict__ q, const T* __restrict__ omega, T* __restrict__ out, Shape sh,
                      int features, int span, float ratio, float eps, const float* state, const float* k_sum) {
    extern __shared__ __align__(128) char smem[];
    QuerySmem<T> s(sh.dim_k, features, sh.value_block);
    s.carve(smem, features, sh.value_block);
    const int vb = blockIdx.x, h = blockIdx.y;
    const int g = h / (sh.heads_q / sh.heads_kv);
    const int spans = (sh.len + span - 1) / span;
    const int b = blockIdx.z / spans, first = (blockIdx.z % spans) * span;
    const int last = min(sh.len, first + span);
    const int col0 = vb * sh.value_block, width = sh.value_block;
    const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const float diag_scale = rsqrtf(static_cast<float>(sh.dim_k));
    const size_t head = static_cast<size_t>(b) * sh.heads_kv + g;
    for (int idx = threadIdx.x; idx < features * width; idx += blockDim.x) {
        const int f = idx / width, c = idx % width;
        const float x = col0 + c < sh.dim_v ? state[(head * features + f) * sh.dim_v + col0 + c] : 0.f;
        s.state[f * s.lds + c] = from_float<T>(x);
    }
    for (int f = threadIdx.x; f < features; f += blockDim.x) s.z[f] = k_sum[head * features + f];
    const int ld_features = feature_stride<T>(s.ldp);
    Stage<T, 128> stage_q;
    stage_q.load(q, b, first, min(CHUNK, last - first), sh.len, sh.heads_q, h, sh.dim_k, 0, sh.dim_k);
    for (int t0 = first; t0 < last; t0 += CHUNK) {
        const int len = min(CHUNK, last - t0);
        __syncthreads();
        stage_q.template store<false>(s.q, s.ldk, len, sh.dim_k, 0, sh.dim_k);
        __syncthreads();
        if (t0 + CHUNK < last) {
            stage_q.load(q, b, t0 + CHUNK, min(CHUNK, last - t0 - CHUNK), sh.len, sh.heads_q, h, sh.dim_k, 0,
                         sh.dim_k);
        }
        block_gemm<false, true>(s.projection, s.ldp, s.q, s.ldk, omega, sh.dim_k, CHUNK, features, sh.dim_k, false);
        half_norms(s.diag, s.q, s.ldk, sh.dim_k, diag_scale);
        __syncthreads();
        for (int r = warp; r < CHUNK; r += warps) {
            const float top = row_max(s.projection, s.ldp, features, r);
            map_row<T, PER_LANE>(s.projection, s.ldp, features, r, r < len, s.diag[r] + top, ratio, eps, s.z,
                                 &s.den[r]);
        }
        __syncthreads();
        const T* phi = reinterpret_cast<const T*>(s.projection);
        block_gemm<false, false>(s.out, s.ldo, phi, ld_features, s.state, s.lds, CHUNK, width, features, false);
        __syncthreads();
        store_outputs(out, s.out, s.ldo, s.den, 0.f, b, t0, len, sh.len, sh.heads_q, h, sh.dim_v, col0,
                      min(width, sh.dim_v - col0));
    }
}

}  // namespace performer
}  // namespace linattn

#define LINATTN_PERFORMER_INSTANCES(SUFFIX, T)                                                                \
    extern "C" __global__ void __launch_bounds__(256)                                                         \
        performer_keys_##SUFFIX(linattn::Shape shape, int features, linattn::performer::PerformerParams p) {  \
        linattn::performer::keys<T>(static_cast<const T*>(p.k), static_cast<const T*>(p.v),                   \
                                    static_cast<const T*>(p.omega), shape, features, p.span, p.ratio,         \
                                    p.states, p.k_sums, p.v_sums, p.maxima);                                  \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                         \
        performer_apply_##SUFFIX(linattn::Shape shape, int features, linattn::performer::PerformerParams p) { \
        linattn::performer::apply<T>(static_cast<const T*>(p.q), static_cast<const T*>(p.omega),              \
                                     static_cast<T*>(p.out), shape, features, p.span, p.ratio, p.eps,         \
                                     p.state, p.k_sum);                                                       \
    }

LINATTN_PERFORMER_INSTANCES(f32, float)
LINATTN_PERFORMER_INSTANCES(bf16, __nv_bfloat16)
LINATTN_PERFORMER_INSTANCES(f16, __half)

extern "C" __global__ void __launch_bounds__(256)
    performer_merge(linattn::Shape shape, int features, linattn::performer::PerformerParams p) {
    linattn::performer::merge(shape, features, p.spans, p.constant, p.states, p.k_sums, p.v_sums, p.maxima,
                              p.state, p.k_sum);
}
