// The entry points of linear attention's kernels (linear.cu, linear_mma.cu) for every
// element type and head dim, with C names the host looks up. Each takes the Shape and a
// LinearParams and hands the fields its pass reads to the device function.

#define LINATTN_INSTANCES(SUFFIX, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(256, 1)                                                 \
        linear_causal_##SUFFIX(linattn::Shape shape, linattn::LinearParams p) {                          \
        linattn::causal_forward<T>(static_cast<const T*>(p.q), static_cast<const T*>(p.k),               \
                                   static_cast<const T*>(p.v), static_cast<T*>(p.out), shape, p.eps,     \
                                   p.state_in, p.k_sum_in, p.state_out, p.k_sum_out, p.span, p.parts,    \
                                   p.partial_states, p.partial_sums, p.den_out);                         \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                                    \
        linear_full_state_##SUFFIX(linattn::Shape shape, linattn::LinearParams p) {                      \
        linattn::full_state<T>(static_cast<const T*>(p.k), static_cast<const T*>(p.v), shape, p.span,    \
                               p.state_out, p.k_sum_out, p.per_span != 0);                               \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                                    \
        linear_full_apply_##SUFFIX(linattn::Shape shape, linattn::LinearParams p) {                      \
        linattn::full_apply<T>(static_cast<const T*>(p.q), static_cast<T*>(p.out), shape, p.span, p.eps, \
                               p.state_in, p.k_sum_in);                                                  \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 4)                                                 \
        linear_decode_##SUFFIX(linattn::Shape shape, linattn::LinearParams p) {                          \
        linattn::decode_step<T, 4>(static_cast<const T*>(p.q), static_cast<const T*>(p.k),               \
                                   static_cast<const T*>(p.v), static_cast<T*>(p.out), shape, p.eps,     \
                                   p.state_out, p.k_sum_out);                                            \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                 \
        linear_decode_wide_##SUFFIX(linattn::Shape shape, linattn::LinearParams p) {                     \
        linattn::decode_step<T, 8>(static_cast<const T*>(p.q), static_cast<const T*>(p.k),               \
                                   static_cast<const T*>(p.v), static_cast<T*>(p.out), shape, p.eps,     \
                                   p.state_out, p.k_sum_out);                                            \
    }

LINATTN_INSTANCES(f32, float)
LINATTN_INSTANCES(bf16, __nv_bfloat16)
LINATTN_INSTANCES(f16, __half)

// The state passes ask for two blocks per multiprocessor (at most 128 registers at
// D = 128: left free, ptxas took 129, which leaves room for only one).
#define LINATTN_MMA_INSTANCES(SUFFIX, T, D)                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * linattn::mma::PRODUCER_WARPS + 2 * D, 1)                \
        linear_causal_mma_##SUFFIX##_d##D(linattn::Shape shape, linattn::LinearParams p) {                    \
        linattn::mma::causal_forward<T, D>(static_cast<const T*>(p.q), static_cast<const T*>(p.k),            \
                                           static_cast<const T*>(p.v), static_cast<T*>(p.out), shape, p.eps,  \
                                           p.state_in, p.k_sum_in, p.state_out, p.k_sum_out, p.span, p.parts, \
                                           p.partial_states, p.partial_sums, p.den_out);                      \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(2 * D, 2)                                                    \
        linear_state_mma_##SUFFIX##_d##D(linattn::Shape shape, linattn::LinearParams p) {                     \
        linattn::mma::state_pass<T, D>(static_cast<const T*>(p.k), static_cast<const T*>(p.v), shape, p.span, \
                                       p.state_out, p.k_sum_out, p.per_span != 0);                            \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(2 * D)                                                       \
        linear_apply_mma_##SUFFIX##_d##D(linattn::Shape shape, linattn::LinearParams p) {                     \
        linattn::mma::apply_state<T, D>(static_cast<const T*>(p.q), static_cast<T*>(p.out), shape, p.span,    \
                                        p.eps, p.state_in, p.k_sum_in);                                       \
    }

LINATTN_MMA_INSTANCES(bf16, __nv_bfloat16, 64)
LINATTN_MMA_INSTANCES(bf16, __nv_bfloat16, 128)
LINATTN_MMA_INSTANCES(f16, __half, 64)
LINATTN_MMA_INSTANCES(f16, __half, 128)
