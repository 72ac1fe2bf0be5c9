// What every kernel source shares (it is prepended to each before NVRTC compiles it):
// element conversions, and the tensor-core building blocks of the mma.sync kernels.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace linattn {

// CHUNK (rows of every tile the mma kernels stage) and PAD (of 16-bit shared-memory
// rows) come before this file, from backend/cuda/tiles.rs.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
    return __float2half_rn(x);
}

// 2^x by ex2.approx with subnormal results flushed to 0: without .ftz the compiler
// wraps each call in a rescaling for them (four more instructions). Every caller adds
// 2^x to sums it is far below, multiplies by it, or discards it (x > 0 in elu + 1).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

template <typename T> struct IsFloat { static constexpr bool value = false; };
template <> struct IsFloat<float> { static constexpr bool value = true; };
template <typename T> struct IsHalf { static constexpr bool value = false; };
template <> struct IsHalf<__half> { static constexpr bool value = true; };

namespace mma {

__device__ __forceinline__ unsigned shared_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices of 16-bit elements; lane l gives the (shared-space) address of row
// l % 8 of matrix l / 8. Without .trans lane l receives row l / 4, columns 2 (l % 4) +
// {0, 1} of each; with .trans, rows 2 (l % 4) + {0, 1} of column l / 4. Hot loops pass
// a lane's base address plus a constant, which ptxas folds into the instruction: from a
// pointer, each address costs two integer instructions per use.
__device__ __forceinline__ void load_matrices(unsigned (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}
__device__ __forceinline__ void load_matrices_transposed(unsigned (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}
__device__ __forceinline__ void load_matrices(unsigned (&r)[4], const void* p) { load_matrices(r, shared_address(p)); }
__device__ __forceinline__ void load_matrices_transposed(unsigned (&r)[4], const void* p) {
    load_matrices_transposed(r, shared_address(p));
}

// A float from shared memory at a shared-space byte address, for the same reason as
// load_matrices takes one; volatile, like the barriers, so it is not moved across them.
__device__ __forceinline__ float load_shared(unsigned address) {
    float x;
    asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(x) : "r"(address));
    return x;
}

// The shared-space byte address of element (row, column) of a 16-bit tile whose rows
// are LD elements apart.
template <int LD> __device__ __forceinline__ unsigned element_address(const void* tile, int row, int column) {
    return shared_address(tile) + 2u * static_cast<unsigned>(row * LD + column);
}

// c += a b for a 16x16 (row-major fragment) and b 16x8 (column-major fragment).
template <typename T>
__device__ __forceinline__ void product(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);
template <>
__device__ __forceinline__ void product<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                                       unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void product<__half>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The two elements of an operand register as floats. bf16 is the upper half of an f32,
// so a shift and a mask convert it (the compiler's own conversion spends a third
// instruction moving the upper element down first).
template <typename T> __device__ __forceinline__ void unpack(unsigned bits, float& lo, float& hi);
template <> __device__ __forceinline__ void unpack<__nv_bfloat16>(unsigned bits, float& lo, float& hi) {
    lo = __uint_as_float(bits << 16);
    hi = __uint_as_float(bits & 0xffff0000u);
}
template <> __device__ __forceinline__ void unpack<__half>(unsigned bits, float& lo, float& hi) {
    const __half2 pair = *reinterpret_cast<const __half2*>(&bits);
    lo = __low2float(pair);
    hi = __high2float(pair);
}

// Two floats rounded to T and packed as an operand register; lo and hi become the
// rounded values.
template <typename T> __device__ __forceinline__ unsigned pack(float& lo, float& hi);
template <> __device__ __forceinline__ unsigned pack<__nv_bfloat16>(float& lo, float& hi) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    const unsigned bits = *reinterpret_cast<const unsigned*>(&pair);
    unpack<__nv_bfloat16>(bits, lo, hi);
    return bits;
}
template <> __device__ __forceinline__ unsigned pack<__half>(float& lo, float& hi) {
    const __half2 pair = __floats2half2_rn(lo, hi);
    const unsigned bits = *reinterpret_cast<const unsigned*>(&pair);
    unpack<__half>(bits, lo, hi);
    return bits;
}
template <typename T> __device__ __forceinline__ unsigned pack_value(float lo, float hi) { return pack<T>(lo, hi); }

__device__ __forceinline__ void copy_async(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void wait_copies() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// Every group of copies but the last committed one has landed.
__device__ __forceinline__ void wait_copies_but_newest() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

// Named barrier `id` (1..15; 0 is __syncthreads) over `threads` threads: sync waits for
// all of them, arrive counts the caller in without waiting. Shared-memory writes before
// either are visible after the barrier completes to the threads that synced on it.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// A state kept as mma accumulators of Sᵀ, 16 value columns a warp: accumulator (j, e)
// of warp `warp` holds (value column, key feature).
__device__ __forceinline__ int state_column(int e, int warp) { return 16 * warp + (threadIdx.x % 32) / 4 + 8 * (e / 2); }
__device__ __forceinline__ int state_feature(int j, int e) { return 8 * j + (threadIdx.x % 4) * 2 + e % 2; }

// Shared rows of a D-wide tile are D + PAD elements apart: ldmatrix's eight row
// addresses then fall in different banks.
template <int D> __host__ __device__ constexpr int row_stride() { return D + PAD; }

// Rows [t0, t0 + len) of head `head` into dst (CHUNK x D), in flight until wait_copies;
// rows from len on are zero. With REVERSE, row t is the sequence's row seq - 1 - t (an
// anti-causal pass walks the sequence backwards as if it were forwards). A thread copies
// the same 16 bytes of every ROWS_PER_PASS-th row, so one address is formed and stepped.
template <int D, int THREADS, bool REVERSE = false, typename T>
__device__ void load_tile(T* dst, const T* x, int b, int t0, int len, int seq, int heads, int head) {
    constexpr int VEC = 8, PER_ROW = D / VEC, ROWS_PER_PASS = THREADS / PER_ROW;
    static_assert(THREADS % PER_ROW == 0 && CHUNK % ROWS_PER_PASS == 0, "whole rows per pass");
    const int r0 = threadIdx.x / PER_ROW, c = (threadIdx.x % PER_ROW) * VEC;
    const long long row = static_cast<long long>(b) * seq + (REVERSE ? seq - 1 - (t0 + r0) : t0 + r0);
    const long long step = (REVERSE ? -1LL : 1LL) * ROWS_PER_PASS * heads * D;
    const T* src = x + (row * heads + head) * D + c;
#pragma unroll
    for (int pass = 0; pass < CHUNK / ROWS_PER_PASS; ++pass) {
        const int r = r0 + pass * ROWS_PER_PASS;
        const bool valid = r < len;
        copy_async(dst + r * row_stride<D>() + c, valid ? src + pass * step : x, valid);
    }
}

}  // namespace mma
}  // namespace linattn
