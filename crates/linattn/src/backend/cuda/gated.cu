// The gated and delta-rule family (retention, gla, delta-rule, gated-delta-rule) on NVIDIA
// GPUs: the chunked forward on the CUDA cores in f32, for any head widths that fit shared
// memory. Compiled at run time by NVRTC. The conventions are the CPU engine's
// (engine/gated): q, k [B, T, H, D_k] and v, out [B, T, HV, D_v] of the kernel's element
// type; g [B, T, HV] or [B, T, HV, D_k], beta [B, T, HV], states [N, HV, D_k, D_v] in f32;
// o_t = scale · S_tᵀ q_t.
//
// One block takes one (sequence, value head) and a block of its value columns through
// its chunks of C tokens. With G the
// log decays summed from the chunk's start and S the state before the chunk:
//   X = V, or for the delta rule (I + A) X = Diag(β) (V − (K ⊙ e^G) S) with
//       A_ij = β_i Σ_c k_ic k_jc e^{G_ic − G_jc} (j < i), solved by forward substitution;
//   O = scale ((Q ⊙ e^G) S + M X), M_ij = Σ_c q_ic k_jc e^{G_ic − G_jc} (j ≤ i);
//   S ← e^{G_last} ⊙ S + (K ⊙ e^{G_last − G})ᵀ X.
// Every exponent is ≤ 0, each pair's taken on its own, so no decay overflows anything.

namespace linattn {
namespace gated {

struct Shape {
    int batch, len, heads, heads_v, dim_k, dim_v;
};

// What the kernel takes beside its Shape; GatedParams in gated.rs mirrors it (a test
// checks the layout against this declaration).
struct GatedParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    // Log decays: per token and value head, or per key channel (gate_width = D_k); null
    // for a fixed decay per value head (`fixed`) or none.
    const float* g;
    // Fixed log decays, one per value head (retention's γ); null otherwise.
    const float* fixed;
    // Step sizes of the delta rule; null for the plain sum.
    const float* beta;
    // The states to start from (null: zeros) and to leave.
    const float* state_in;
    float* state_out;
    // N + 1 token offsets of sequences packed along a batch of one; null: batch rows.
    const long long* cu_seqlens;
    // Two values: the smallest flat index of g, then of beta, that is out of range
    // (g > 0, β outside [0, beta_max], or not finite), for the host to name; each left
    // as it was where none is.
    long long* bad;
    float scale;
    float beta_max;
    // Log decays per token: 0 (none), 1 (per token or fixed) or D_k (per channel).
    int gate_width;
    // Rows per chunk, and value columns per block.
    int chunk;
    int value_block;
    int delta;
    int l2norm;
};

// The largest finite float: a log decay below it is −∞.
constexpr float FLOAT_MAX = 3.402823466e+38f;

__device__ __forceinline__ int qk_head(const Shape& s, int hv) {
    return hv / (s.heads_v / s.heads);
}

template <typename T>
__device__ void chunked(const Shape shape, const GatedParams p) {
    extern __shared__ float smem[];
    const int dk = shape.dim_k, dv = shape.dim_v, C = p.chunk, gw = p.gate_width;
    // This block's value columns: every column of S, X and the output is computed apart
    // from the others, so blocks split them (A and M are recomputed by each).
    const int col0 = blockIdx.z * p.value_block, vb = min(p.value_block, dv - col0);
    const int hv = blockIdx.x, sequence = blockIdx.y;
    const int h = qk_head(shape, hv);
    const int tid = threadIdx.x, threads = blockDim.x;
    // The sequence's first token (a flat row of [B·T]) and its length.
    long long first;
    int len;
    if (p.cu_seqlens) {
        first = p.cu_seqlens[sequence];
        len = static_cast<int>(p.cu_seqlens[sequence + 1] - first);
    } else {
        first = static_cast<long long>(sequence) * shape.len;
        len = shape.len;
    }
    float* S = smem;               // dk × vb
    float* Q = S + dk * vb;        // C × dk
    float* K = Q + C * dk;         // C × dk
    float* D = K + C * dk;         // C × dk: q or k rows times decay factors
    float* X = D + C * dk;         // C × vb
    float* A = X + C * vb;         // C × C: A, then M
    float* G = A + C * C;          // C × max(gw, 1)
    float* B = G + C * (gw > 0 ? gw : 1);  // C: β
    const T* q = static_cast<const T*>(p.q);
    const T* k = static_cast<const T*>(p.k);
    const T* v = static_cast<const T*>(p.v);
    T* out = static_cast<T*>(p.out);
    const long long unit = static_cast<long long>(sequence) * shape.heads_v + hv;
    for (int i = tid; i < dk * vb; i += threads) {
        const long long at = (unit * dk + i / vb) * dv + col0 + i % vb;
        S[i] = p.state_in ? p.state_in[at] : 0.f;
    }
    for (int start = 0; start < len; start += C) {
        const int rows = min(C, len - start);
        const long long token0 = first + start;
        __syncthreads();
        for (int i = tid; i < rows * dk; i += threads) {
            const int r = i / dk, c = i % dk;
            const long long at = ((token0 + r) * shape.heads + h) * dk + c;
            Q[i] = to_float(q[at]);
            K[i] = to_float(k[at]);
        }
        for (int i = tid; i < rows * vb; i += threads) {
            const int r = i / vb, c = i % vb;
            X[i] = to_float(v[((token0 + r) * shape.heads_v + hv) * dv + col0 + c]);
        }
        if (gw > 0) {
            for (int i = tid; i < rows * gw; i += threads) {
                const int r = i / gw, c = i % gw;
                float value;
                if (p.g) {
                    const long long at = ((token0 + r) * shape.heads_v + hv) * gw + c;
                    value = p.g[at];
                    if (!(value <= 0.f && value >= -FLOAT_MAX)) atomicMin(p.bad, at);
                } else {
                    value = p.fixed[hv];
                }
                G[i] = value;
            }
        }
        if (p.beta) {
            for (int r = tid; r < rows; r += threads) {
                const long long at = (token0 + r) * shape.heads_v + hv;
                const float b = p.beta[at];
                if (!(b >= 0.f && b <= p.beta_max)) atomicMin(p.bad + 1, at);
                B[r] = b;
            }
        }
        __syncthreads();
        // L2-normalised q and k rows (flash-linear-attention's l2norm: 1e-6 under the root),
        // a warp a row.
        if (p.l2norm) {
            const int warp = tid / 32, lane = tid % 32, warps = threads / 32;
            for (int r = warp; r < 2 * rows; r += warps) {
                float* row = r < rows ? Q + r * dk : K + (r - rows) * dk;
                float sum = 0.f;
                for (int c = lane; c < dk; c += 32) sum += row[c] * row[c];
                for (int offset = 16; offset > 0; offset /= 2) {
                    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
                }
                const float inverse = rsqrtf(sum + 1e-6f);
                for (int c = lane; c < dk; c += 32) row[c] *= inverse;
            }
        }
        // G summed along the chunk, a thread per channel.
        for (int c = tid; c < gw; c += threads) {
            for (int r = 1; r < rows; ++r) G[r * gw + c] += G[(r - 1) * gw + c];
        }
        __syncthreads();
        // The log decay of row r at channel c, summed from the chunk's start.
        auto log_decay = [&](int r, int c) -> float {
            return gw == 0 ? 0.f : G[r * gw + (gw == 1 ? 0 : c)];
        };
        if (p.delta) {
            // D = K ⊙ e^G, then X = β (V − D S).
            for (int i = tid; i < rows * dk; i += threads) {
                D[i] = K[i] * __expf(log_decay(i / dk, i % dk));
            }
            __syncthreads();
            for (int i = tid; i < rows * vb; i += threads) {
                const int r = i / vb, col = i % vb;
                float sum = 0.f;
                for (int c = 0; c < dk; ++c) sum += D[r * dk + c] * S[c * vb + col];
                X[i] = B[r] * (X[i] - sum);
            }
            // A_ij = β_i Σ_c k_ic k_jc e^{G_ic − G_jc} for j < i.
            for (int i = tid; i < rows * rows; i += threads) {
                const int r = i / rows, j = i % rows;
                float sum = 0.f;
                if (j < r) {
                    if (gw == dk && gw > 1) {
                        for (int c = 0; c < dk; ++c) {
                            sum += K[r * dk + c] * K[j * dk + c] *
                                   __expf(G[r * gw + c] - G[j * gw + c]);
                        }
                    } else {
                        for (int c = 0; c < dk; ++c) sum += K[r * dk + c] * K[j * dk + c];
                        sum *= __expf(log_decay(r, 0) - log_decay(j, 0));
                    }
                    sum *= B[r];
                }
                A[r * C + j] = sum;
            }
            __syncthreads();
            // (I + A) X = X, a thread per column: each column's substitution is its own.
            for (int col = tid; col < vb; col += threads) {
                for (int r = 1; r < rows; ++r) {
                    float x = X[r * vb + col];
                    for (int j = 0; j < r; ++j) x -= A[r * C + j] * X[j * vb + col];
                    X[r * vb + col] = x;
                }
            }
            __syncthreads();
        }
        // D = Q ⊙ e^G; M_ij = Σ_c q_ic k_jc e^{G_ic − G_jc} for j ≤ i.
        for (int i = tid; i < rows * dk; i += threads) {
            D[i] = Q[i] * __expf(log_decay(i / dk, i % dk));
        }
        for (int i = tid; i < rows * rows; i += threads) {
            const int r = i / rows, j = i % rows;
            float sum = 0.f;
            if (j <= r) {
                if (gw == dk && gw > 1) {
                    for (int c = 0; c < dk; ++c) {
                        const float decay = __expf(G[r * gw + c] - G[j * gw + c]);
                        sum += Q[r * dk + c] * K[j * dk + c] * decay;
                    }
                } else {
                    for (int c = 0; c < dk; ++c) sum += Q[r * dk + c] * K[j * dk + c];
                    sum *= __expf(log_decay(r, 0) - log_decay(j, 0));
                }
            }
            A[r * C + j] = sum;
        }
        __syncthreads();
        for (int i = tid; i < rows * vb; i += threads) {
            const int r = i / vb, col = i % vb;
            float sum = 0.f;
            for (int c = 0; c < dk; ++c) sum += D[r * dk + c] * S[c * vb + col];
            for (int j = 0; j <= r; ++j) sum += A[r * C + j] * X[j * vb + col];
            const long long at = ((token0 + r) * shape.heads_v + hv) * dv + col0 + col;
            out[at] = from_float<T>(p.scale * sum);
        }
        __syncthreads();
        // S ← e^{G_last} ⊙ S + (K ⊙ e^{G_last − G})ᵀ X.
        for (int i = tid; i < rows * dk; i += threads) {
            const int r = i / dk, c = i % dk;
            D[i] = K[i] * __expf(log_decay(rows - 1, c) - log_decay(r, c));
        }
        __syncthreads();
        for (int i = tid; i < dk * vb; i += threads) {
            const int c = i / vb, col = i % vb;
            float sum = S[i] * __expf(log_decay(rows - 1, c));
            for (int r = 0; r < rows; ++r) sum += D[r * dk + c] * X[r * vb + col];
            S[i] = sum;
        }
    }
    __syncthreads();
    for (int i = tid; i < dk * vb; i += threads) {
        p.state_out[(unit * dk + i / vb) * dv + col0 + i % vb] = S[i];
    }
}

// One recurrent step for a batch of sequences (one token each), the f32 states updated in
// place: S ← Diag(e^g) S (or e^g S), then u = β (v − Sᵀ k) for the delta rule (else v),
// S ← S + k uᵀ, o = scale Sᵀ q. A block takes one (sequence, value head) and
// DECODE_COLUMNS value columns; lane l of warp w holds column l and rows w, w + WARPS,
// ... of the state in registers, so each warp reads and writes whole 128-byte rows and the
// state moves once each way. Every row's sum crosses the warps through shared memory.
constexpr int DECODE_COLUMNS = 32, DECODE_THREADS = 256, DECODE_WARPS = DECODE_THREADS / 32;
constexpr int DECODE_MAX_DIM = 256, DECODE_ROWS = DECODE_MAX_DIM / DECODE_WARPS;
constexpr int DECODE_SHARED = 3 * DECODE_MAX_DIM + DECODE_THREADS;

// What the step kernel takes beside its Shape (len 1); DecodeParams in gated.rs mirrors
// it. Shapes and the meaning of each field as in GatedParams.
struct DecodeParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    const float* g;
    const float* fixed;
    const float* beta;
    float* state;
    long long* bad;
    float scale;
    float beta_max;
    int gate_width;
    int delta;
    int l2norm;
};

// The sum over the block's warps of each lane's `x`, for every thread: `sums` holds
// DECODE_WARPS × 32 floats and is free again when this returns.
__device__ __forceinline__ float sum_over_warps(float x, float* sums) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    sums[warp * 32 + lane] = x;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < DECODE_WARPS; ++w) total += sums[w * 32 + lane];
    __syncthreads();
    return total;
}

template <typename T> __device__ void decode_step(const Shape shape, const DecodeParams p) {
    // Dynamic, as every kernel's shared memory is (the launch raises its limit to the
    // GPU's): DECODE_SHARED floats.
    extern __shared__ float decode_shared[];
    float* qs = decode_shared;
    float* ks = qs + DECODE_MAX_DIM;
    float* decays = ks + DECODE_MAX_DIM;
    float* sums = decays + DECODE_MAX_DIM;
    const int hv = blockIdx.x, b = blockIdx.y, col = blockIdx.z * DECODE_COLUMNS + threadIdx.x % 32;
    const int warp = threadIdx.x / 32, tid = threadIdx.x;
    const int dk = shape.dim_k, dv = shape.dim_v, gw = p.gate_width, h = qk_head(shape, hv);
    const long long unit = static_cast<long long>(b) * shape.heads_v + hv;
    const bool checks = blockIdx.z == 0;
    float q_norm = 0.f, k_norm = 0.f;
    for (int c = tid; c < dk; c += DECODE_THREADS) {
        const long long at = (static_cast<long long>(b) * shape.heads + h) * dk + c;
        const float x = to_float(static_cast<const T*>(p.q)[at]), y = to_float(static_cast<const T*>(p.k)[at]);
        qs[c] = x;
        ks[c] = y;
        q_norm += x * x;
        k_norm += y * y;
        float g = 0.f;
        if (p.g) {
            const long long gat = unit * gw + (gw == 1 ? 0 : c);
            g = p.g[gat];
            if (checks && (gw > 1 || c == 0) && !(g <= 0.f && g >= -FLOAT_MAX)) atomicMin(p.bad, gat);
        } else if (p.fixed) {
            g = p.fixed[hv];
        }
        decays[c] = __expf(g);
    }
    float beta = 1.f;
    if (p.beta) {
        beta = p.beta[unit];
        if (checks && tid == 0 && !(beta >= 0.f && beta <= p.beta_max)) atomicMin(p.bad + 1, unit);
    }
    float q_scale = 1.f, k_scale = 1.f;
    if (p.l2norm) {
        // Every thread's partial sums, then the block's: lanes first, then the warps.
        for (int offset = 16; offset > 0; offset /= 2) {
            q_norm += __shfl_xor_sync(0xffffffffu, q_norm, offset);
            k_norm += __shfl_xor_sync(0xffffffffu, k_norm, offset);
        }
        q_scale = rsqrtf(sum_over_warps(q_norm, sums) + 1e-6f);
        k_scale = rsqrtf(sum_over_warps(k_norm, sums) + 1e-6f);
    } else {
        __syncthreads();
    }
    const bool live = col < dv;
    float* state = p.state + unit * dk * dv + col;
    float s[DECODE_ROWS];
    float predicted = 0.f;
#pragma unroll
    for (int i = 0; i < DECODE_ROWS; ++i) {
        const int r = warp + i * DECODE_WARPS;
        s[i] = 0.f;
        if (r < dk && live) {
            s[i] = state[static_cast<long long>(r) * dv] * decays[r];
            predicted = fmaf(ks[r] * k_scale, s[i], predicted);
        }
    }
    const float v = live ? to_float(static_cast<const T*>(p.v)[unit * dv + col]) : 0.f;
    float u = v;
    if (p.delta) u = beta * (v - sum_over_warps(predicted, sums));
    float out = 0.f;
#pragma unroll
    for (int i = 0; i < DECODE_ROWS; ++i) {
        const int r = warp + i * DECODE_WARPS;
        if (r < dk && live) {
            s[i] = fmaf(ks[r] * k_scale, u, s[i]);
            state[static_cast<long long>(r) * dv] = s[i];
            out = fmaf(qs[r] * q_scale, s[i], out);
        }
    }
    out = sum_over_warps(out, sums);
    if (warp == 0 && live) static_cast<T*>(p.out)[unit * dv + col] = from_float<T>(p.scale * out);
}

}  // namespace gated
}  // namespace linattn

extern "C" __global__ void gated_chunked_f32(linattn::gated::Shape shape,
                                             linattn::gated::GatedParams params) {
    linattn::gated::chunked<float>(shape, params);
}
extern "C" __global__ void gated_chunked_bf16(linattn::gated::Shape shape,
                                              linattn::gated::GatedParams params) {
    linattn::gated::chunked<__nv_bfloat16>(shape, params);
}
extern "C" __global__ void gated_chunked_f16(linattn::gated::Shape shape,
                                             linattn::gated::GatedParams params) {
    linattn::gated::chunked<__half>(shape, params);
}

extern "C" __global__ void __launch_bounds__(linattn::gated::DECODE_THREADS)
    gated_decode_f32(linattn::gated::Shape shape, linattn::gated::DecodeParams params) {
    linattn::gated::decode_step<float>(shape, params);
}
extern "C" __global__ void __launch_bounds__(linattn::gated::DECODE_THREADS)
    gated_decode_bf16(linattn::gated::Shape shape, linattn::gated::DecodeParams params) {
    linattn::gated::decode_step<__nv_bfloat16>(shape, params);
}
extern "C" __global__ void __launch_bounds__(linattn::gated::DECODE_THREADS)
    gated_decode_f16(linattn::gated::Shape shape, linattn::gated::DecodeParams params) {
    linattn::gated::decode_step<__half>(shape, params);
}
