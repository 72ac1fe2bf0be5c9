// The entry points of linear attention's kernels (linear.cu, linear_mma.cu) for every
// element type and head dim, with C names the host looks up.

#define LINATTN_INSTANCES(SUFFIX, T)                                                            \
    extern "C" __global__ void __launch_bounds__(256, 1) linear_causal_##SUFFIX(                \
        const T* q, const T* k, const T* v, T* out, linattn::Shape sh, float eps,              \
        const float* state_in, const float* k_sum_in, float* state_out, float* k_sum_out,      \
        int span, int parts, const float* partial_states, const float* partial_sums,           \
        float* den_out) {                                                                       \
        linattn::causal_forward<T>(q, k, v, out, sh, eps, state_in, k_sum_in, state_out,       \
                                   k_sum_out, span, parts, partial_states, partial_sums,        \
                                   den_out);                                                    \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256) linear_full_state_##SUFFIX(               \
        const T* k, const T* v, linattn::Shape sh, int span, float* state, float* k_sum,        \
        int per_span) {                                                                         \
        linattn::full_state<T>(k, v, sh, span, state, k_sum, per_span != 0);                    \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256) linear_full_apply_##SUFFIX(               \
        const T* q, T* out, linattn::Shape sh, int span, float eps, const float* state,         \
        const float* k_sum) {                                                                   \
        linattn::full_apply<T>(q, out, sh, span, eps, state, k_sum);                            \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256, 4) linear_decode_##SUFFIX(                 \
        const T* q, const T* k, const T* v, T* out, linattn::Shape sh, float eps, float* state, \
        float* k_sum) {                                                                         \
        linattn::decode_step<T, 4>(q, k, v, out, sh, eps, state, k_sum);                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256, 2) linear_decode_wide_##SUFFIX(            \
        const T* q, const T* k, const T* v, T* out, linattn::Shape sh, float eps, float* state, \
        float* k_sum) {                                                                         \
        linattn::decode_step<T, 8>(q, k, v, out, sh, eps, state, k_sum);                        \
    }

LINATTN_INSTANCES(f32, float)
LINATTN_INSTANCES(bf16, __nv_bfloat16)
LINATTN_INSTANCES(f16, __half)

// The state passes ask for two blocks per multiprocessor (at most 128 registers at
// D = 128: left free, ptxas took 129, which leaves room for only one).
#define LINATTN_MMA_INSTANCES(SUFFIX, T, D)                                                        \
    extern "C" __global__ void __launch_bounds__(32 * linattn::mma::PRODUCER_WARPS + 2 * D, 1)      \
        linear_causal_mma_##SUFFIX##_d##D(                                                         \
            const T* q, const T* k, const T* v, T* out, linattn::Shape sh, float eps,             \
            const float* state_in, const float* k_sum_in, float* state_out, float* k_sum_out,     \
            int span, int parts, const float* partial_states, const float* partial_sums,          \
            float* den_out) {                                                                      \
        linattn::mma::causal_forward<T, D>(q, k, v, out, sh, eps, state_in, k_sum_in, state_out,  \
                                           k_sum_out, span, parts, partial_states, partial_sums,   \
                                           den_out);                                               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(2 * D, 2) linear_state_mma_##SUFFIX##_d##D(       \
        const T* k, const T* v, linattn::Shape sh, int span, float* state, float* k_sum,           \
        int per_span) {                                                                            \
        linattn::mma::state_pass<T, D>(k, v, sh, span, state, k_sum, per_span != 0);               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(2 * D) linear_apply_mma_##SUFFIX##_d##D(          \
        const T* q, T* out, linattn::Shape sh, int span, float eps, const float* state,            \
        const float* k_sum) {                                                                      \
        linattn::mma::apply_state<T, D>(q, out, sh, span, eps, state, k_sum);                      \
    }

LINATTN_MMA_INSTANCES(bf16, __nv_bfloat16, 64)
LINATTN_MMA_INSTANCES(bf16, __nv_bfloat16, 128)
LINATTN_MMA_INSTANCES(f16, __half, 64)
LINATTN_MMA_INSTANCES(f16, __half, 128)
