// Linear attention's tensor-core kernels (16-bit inputs, D_k = D_v = D in {64, 128});
// compiled after linear.cu, whose helpers they use.

namespace linattn {

// ---------------------------------------------------------------------------------------
// Tensor-core kernels for 16-bit inputs with D_k = D_v = D in {64, 128}: mma.sync
// m16n8k16 with the operands in registers (fragments loaded by ldmatrix), cp.async loads
// of the next chunk while this one is computed.
//
// A block owns one (query head, sequence segment) and every value column, so phi and the
// intra-chunk scores are computed once per chunk. It has D / 16 warps; warp w owns value
// columns [16w, 16w + 16): those columns of the outputs, and rows [16w, 16w + 16) of
// S^T = sum v phi(k)^T, which it keeps in registers, as mma accumulators, for the whole
// walk along the sequence. Their accumulator layout is the B-operand layout of
// phi(Q) S, so the state is never staged through shared memory.
namespace mma {

// phi in place on the 8 elements of `packed`; `mapped` receives the values rounded to T,
// as the products see them, so that numerator and denominator agree. Rows past the
// chunk's length (zero-filled by load_tile, and phi(0) = 1) map to 0 so that padding adds
// nothing to scores, S or z; a FULL chunk has none and skips that select.
template <bool FULL, typename T>
__device__ __forceinline__ void map_vector(uint4& packed, bool valid, float (&mapped)[8]) {
    unsigned* pairs = reinterpret_cast<unsigned*>(&packed);
#pragma unroll
    for (int e = 0; e < 8; e += 2) {
        float lo, hi;
        unpack<T>(pairs[e / 2], lo, hi);
        lo = elu_plus_one(lo);
        hi = elu_plus_one(hi);
        if (!FULL && !valid) lo = hi = 0.f;
        pairs[e / 2] = pack<T>(lo, hi);
        mapped[e] = lo;
        mapped[e + 1] = hi;
    }
}

// How the map deals a chunk's rows to THREADS threads: a thread takes the same 8 columns,
// from column() on, of rows row0() + pass * ROWS_PER_PASS for each of the PASSES passes.
template <int D, int THREADS> struct MapLayout {
    static constexpr int VEC = 8, PER_ROW = D / VEC, ROWS_PER_PASS = THREADS / PER_ROW,
                         PASSES = CHUNK / ROWS_PER_PASS;
    static_assert(THREADS % PER_ROW == 0 && 32 % PER_ROW == 0, "a row's vectors lie in one warp");
    static_assert(CHUNK % ROWS_PER_PASS == 0, "every thread takes the same number of rows");
    __device__ static int column() { return (threadIdx.x % PER_ROW) * VEC; }
    __device__ static int row0() { return threadIdx.x / PER_ROW; }
};

template <bool FULL, int D, int THREADS, typename T, typename OnRow>
__device__ __forceinline__ void map_passes(T* x, int len, OnRow& on_row) {
    using L = MapLayout<D, THREADS>;
    uint4 packed[L::PASSES];
#pragma unroll
    for (int pass = 0; pass < L::PASSES; ++pass)
        packed[pass] = *reinterpret_cast<const uint4*>(x + (L::row0() + pass * L::ROWS_PER_PASS) * row_stride<D>() +
                                                       L::column());
#pragma unroll
    for (int pass = 0; pass < L::PASSES; ++pass) {
        const int r = L::row0() + pass * L::ROWS_PER_PASS;
        float mapped[L::VEC];
        map_vector<FULL, T>(packed[pass], r < len, mapped);
        *reinterpret_cast<uint4*>(x + r * row_stride<D>() + L::column()) = packed[pass];
        on_row(pass, mapped);
    }
}

// phi in place on a chunk's rows, then on_row(pass, mapped) with the 8 values a thread
// mapped in its row of that pass (MapLayout). Every row's load is issued before the first
// is mapped (one row at a time, the map waited on each load in turn); full chunks skip
// the select that zeroes the padding rows.
template <int D, int THREADS, typename T, typename OnRow>
__device__ __forceinline__ void map_rows(T* x, int len, OnRow&& on_row) {
    if (len == CHUNK) {
        map_passes<true, D, THREADS>(x, len, on_row);
    } else {
        map_passes<false, D, THREADS>(x, len, on_row);
    }
}

// phi in place on a chunk's rows, nothing else.
template <int D, int THREADS, typename T> __device__ void map_in_place(T* x, int len) {
    map_rows<D, THREADS>(x, len, [](int, const float (&)[8]) {});
}

// phi in place on a chunk's query rows, each row's product with z into dot[r]. The
// rows' partial products are reduced across their lanes together, so the exchanges of
// one row wait behind those of the others rather than each in turn.
template <int D, int THREADS, typename T>
__device__ void map_queries(T* x, int len, const float* z, float* dot) {
    using L = MapLayout<D, THREADS>;
    float zc[L::VEC];
#pragma unroll
    for (int e = 0; e < L::VEC; ++e) zc[e] = z[L::column() + e];
    float parts[L::PASSES];
    map_rows<D, THREADS>(x, len, [&](int pass, const float (&mapped)[L::VEC]) {
        // Two chains of four rather than one of eight.
        float even = 0.f, odd = 0.f;
#pragma unroll
        for (int e = 0; e < L::VEC; e += 2) {
            even = fmaf(mapped[e], zc[e], even);
            odd = fmaf(mapped[e + 1], zc[e + 1], odd);
        }
        parts[pass] = even + odd;
    });
#pragma unroll
    for (int offset = L::PER_ROW / 2; offset > 0; offset /= 2)
#pragma unroll
        for (int pass = 0; pass < L::PASSES; ++pass) parts[pass] += __shfl_xor_sync(0xffffffffu, parts[pass], offset);
    if (L::column() == 0) {
#pragma unroll
        for (int pass = 0; pass < L::PASSES; ++pass) dot[L::row0() + pass * L::ROWS_PER_PASS] = parts[pass];
    }
}

// The state's operand scale: f16 would overflow on S (up to z_d max|v|) over long
// sequences, so S / max(1, max z) is what is rounded, and the product scaled back in f32.
// bf16 has f32's range and needs none.
template <typename T, int D> __device__ float state_scale(const float* z) {
    if constexpr (IsHalf<T>::value) {
        float largest = 1.f;
        for (int d = threadIdx.x % 32; d < D; d += 32) largest = fmaxf(largest, z[d]);
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2)
            largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
        return largest;
    } else {
        return 1.f;
    }
}

// Every accumulator of a warp's 64 x 16 output block to 0.
__device__ __forceinline__ void clear(float (&o)[4][2][4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[i][n][e] = 0.f;
}

// o[i][n] += phi(Q) S for the warp's value columns: m-tile i (rows 16i..), n-tile n
// (columns 16w + 8n..), the B operand built from the S^T accumulators st.
template <typename T, int D>
__device__ void state_product(float (&o)[4][2][4], const float (&st)[D / 8][4], const T* qs, float scale) {
    constexpr int LD = row_stride<D>();
    const int lane = threadIdx.x % 32;
    const unsigned rows = element_address<LD>(qs, lane % 16, (lane / 16) * 8);
    const float inverse = 1.f / scale;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const float* lo = st[2 * kk];
        const float* hi = st[2 * kk + 1];
        const unsigned b00 = pack_value<T>(lo[0] * inverse, lo[1] * inverse);
        const unsigned b01 = pack_value<T>(hi[0] * inverse, hi[1] * inverse);
        const unsigned b10 = pack_value<T>(lo[2] * inverse, lo[3] * inverse);
        const unsigned b11 = pack_value<T>(hi[2] * inverse, hi[3] * inverse);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            unsigned a[4];
            load_matrices(a, rows + 2u * (16 * i * LD + 16 * kk));
            product<T>(o[i][0], a, b00, b01);
            product<T>(o[i][1], a, b10, b11);
        }
    }
    if (scale != 1.f) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) o[i][n][e] *= scale;
    }
}

// 1 / x to within an ulp or two, in one instruction (1.f / x takes nine for IEEE rounding).
__device__ __forceinline__ float reciprocal(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Rows [t0, t0 + len) of value columns [16 warp, 16 warp + 16) of out: o / (den + eps),
// where with row_parts a row's denominator is den plus its row sums over key blocks up to
// its own (row_parts[j][row], from masked_scores), and with den_out (16-bit outputs) warp 0
// also stores each row's denominator there ([B, T, H]). PLAIN stores o itself; REVERSE stores row t
// as the sequence's row seq - 1 - t; an f32 `out` takes the f32 values (two 8-byte
// stores per lane, each instruction a whole sector). Otherwise a quad of lanes holds one
// row, two columns of each 8-column tile per lane; two exchanges within the quad give
// each lane four adjacent columns, so the row's 32 bytes (one sector) leave in one 8-byte
// store per lane instead of two half-sector stores. A lane's rows are 8 apart: one
// address, stepped.
template <typename T, int D, bool PLAIN = false, bool REVERSE = false, typename O = T>
__device__ void store_rows(O* out, const float (&o)[4][2][4], const float* den, const float* row_parts, float eps,
                           int b, int t0, int len, int seq, int heads, int head, int warp,
                           float* den_out = nullptr) {
    const int lane = threadIdx.x % 32, quad = lane % 4;
    const bool full = len == CHUNK;
    // The sequence row (of all B x T) of the lane's first row, and the distance of 8 rows
    // in out's elements.
    const long long direction = REVERSE ? -1 : 1;
    const long long lane_row =
        static_cast<long long>(b) * seq + (REVERSE ? seq - 1 - t0 : t0) + direction * (lane / 4);
    const long long step = direction * 8 * heads * D;
    O* at = out + (lane_row * heads + head) * D + 16 * warp + (IsFloat<O>::value ? 2 : 4) * quad;
    const bool stores_den = den_out && warp == 0 && quad == 0;
    const int first = lane - quad + (2 * quad) % 4, second = first + 1;
    // Addresses of the lane's first row in den and row_parts (shared memory), in bytes.
    const unsigned den_row = shared_address(den) + 4 * (lane / 4);
    const unsigned parts_row = row_parts ? shared_address(row_parts) + 4 * (lane / 4) : 0u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int half_rows = 0; half_rows < 2; ++half_rows, at += step) {
            const int r = 16 * i + lane / 4 + 8 * half_rows;
            const bool stored = full || r < len;
            float inverse = 1.f, denominator = 1.f;
            if constexpr (!PLAIN) {
                const int offset = 4 * (r - lane / 4);
                float sum = load_shared(den_row + offset);
                if (row_parts) {
#pragma unroll
                    for (int j = 0; j <= i; ++j) sum += load_shared(parts_row + 4 * j * CHUNK + offset);
                }
                denominator = sum + eps;
                inverse = reciprocal(denominator);
            }
            const float* left = o[i][0] + 2 * half_rows;
            const float* right = o[i][1] + 2 * half_rows;
            if constexpr (IsFloat<O>::value) {
                if (stored) {
                    *reinterpret_cast<float2*>(at) = make_float2(left[0] * inverse, left[1] * inverse);
                    *reinterpret_cast<float2*>(at + 8) = make_float2(right[0] * inverse, right[1] * inverse);
                }
                continue;
            }
            const unsigned left_pair = pack_value<T>(left[0] * inverse, left[1] * inverse);
            const unsigned right_pair = pack_value<T>(right[0] * inverse, right[1] * inverse);
            const unsigned left_first = __shfl_sync(0xffffffffu, left_pair, first);
            const unsigned right_first = __shfl_sync(0xffffffffu, right_pair, first);
            const unsigned left_second = __shfl_sync(0xffffffffu, left_pair, second);
            const unsigned right_second = __shfl_sync(0xffffffffu, right_pair, second);
            if (stored) {
                if (stores_den) den_out[lane_row * heads + head + (r - lane / 4) * direction * heads] = denominator;
                *reinterpret_cast<uint2*>(at) =
                    quad < 2 ? make_uint2(left_first, left_second) : make_uint2(right_first, right_second);
            }
        }
    }
}

// S^T += V^T phi(K) over the chunk for rows [16 warp, 16 warp + 16) of S^T.
template <typename T, int D>
__device__ void absorb_chunk(float (&st)[D / 8][4], const T* ks, const T* vs, int warp) {
    constexpr int LD = row_stride<D>();
    const int lane = threadIdx.x % 32;
    const unsigned value_rows = element_address<LD>(vs, lane % 8 + (lane / 16) * 8, 16 * warp + ((lane / 8) % 2) * 8);
    const unsigned key_rows = element_address<LD>(ks, lane % 8 + ((lane / 8) % 2) * 8, (lane / 16) * 8);
#pragma unroll
    for (int sk = 0; sk < CHUNK / 16; ++sk) {
        unsigned a[4];
        load_matrices_transposed(a, value_rows + 2u * 16 * sk * LD);
#pragma unroll
        for (int p = 0; p < D / 16; ++p) {
            unsigned bb[4];
            load_matrices_transposed(bb, key_rows + 2u * (16 * sk * LD + 16 * p));
            product<T>(st[2 * p], a, bb[0], bb[1]);
            product<T>(st[2 * p + 1], a, bb[2], bb[3]);
        }
    }
}

// The causal kernel's roles and buffers: a warpgroup of PRODUCER_WARPS producers (from
// tiles.rs), a ring of shared stages for q, k, v, and its named barriers (the producers
// among themselves, then per buffer parity: chunk ready (producers arrive, consumers
// wait) and chunk consumed).
constexpr int STAGES = 3;
// Registers per thread of each role where the block has 512 threads (D = 128): the
// launch bound gives everyone 128, the producers need fewer, the consumers, which hold
// S^T and the output block, more (the two sum to 256, the file's 64K over 256 threads).
constexpr int PRODUCER_REGISTERS = 88, CONSUMER_REGISTERS = 168;
constexpr int PRODUCERS = 1, CHUNK_READY = 2, CHUNK_FREE = 4;

// The masked scores P = phi(Q) phi(K)^T (keys j <= i) of a chunk, rounded to T, into
// scores, and the row sums of each 16-column block j (of the rounded values, as the
// products see them) into row_parts[j][row] with ROW_SUMS. The ten 16 x 16 blocks on or
// below the diagonal are dealt round the producer warps; the blocks above it are never read.
template <typename T, int D, bool ROW_SUMS>
__device__ void masked_scores(T* scores, float* row_parts, const T* qs, const T* ks, int warp) {
    constexpr int LD = row_stride<D>(), LDS = CHUNK + PAD, BLOCKS = (CHUNK / 16) * (CHUNK / 16 + 1) / 2;
    const int lane = threadIdx.x % 32;
    for (int n = warp; n < BLOCKS; n += PRODUCER_WARPS) {
        const int i = n >= 6 ? 3 : n >= 3 ? 2 : n >= 1 ? 1 : 0, j = n - i * (i + 1) / 2;
        float acc[2][4] = {};
        const unsigned query_rows = element_address<LD>(qs, 16 * i + lane % 16, (lane / 16) * 8);
        const unsigned key_rows = element_address<LD>(ks, 16 * j + lane % 8 + (lane / 16) * 8, ((lane / 8) % 2) * 8);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned a[4], bb[4];
            load_matrices(a, query_rows + 2u * 16 * kk);
            load_matrices(bb, key_rows + 2u * 16 * kk);
            product<T>(acc[0], a, bb[0], bb[1]);
            product<T>(acc[1], a, bb[2], bb[3]);
        }
        const int upper = 16 * i + lane / 4, lower = upper + 8;
        float sum_upper = 0.f, sum_lower = 0.f;
#pragma unroll
        for (int t = 0; t < 2; ++t) {
            const int c = 16 * j + 8 * t + (lane % 4) * 2;
            float x0 = c <= upper ? acc[t][0] : 0.f, x1 = c + 1 <= upper ? acc[t][1] : 0.f;
            float x2 = c <= lower ? acc[t][2] : 0.f, x3 = c + 1 <= lower ? acc[t][3] : 0.f;
            *reinterpret_cast<unsigned*>(scores + upper * LDS + c) = pack<T>(x0, x1);
            *reinterpret_cast<unsigned*>(scores + lower * LDS + c) = pack<T>(x2, x3);
            sum_upper += x0 + x1;
            sum_lower += x2 + x3;
        }
        if constexpr (ROW_SUMS) {
#pragma unroll
            for (int offset = 1; offset < 4; offset *= 2) {
                sum_upper += __shfl_xor_sync(0xffffffffu, sum_upper, offset);
                sum_lower += __shfl_xor_sync(0xffffffffu, sum_lower, offset);
            }
            if (lane % 4 == 0) {
                row_parts[j * CHUNK + upper] = sum_upper;
                row_parts[j * CHUNK + lower] = sum_lower;
            }
        }
    }
}

// den[r] = phi(q_r) . z (the key sums before the chunk) for the chunk's rows, on the
// tensor cores: z enters as two bf16 columns, its rounding and the rest (z minus it), so
// the product keeps ~16 bits of z, while phi(q) enters rounded, as the products see it.
// One 16-row tile per warp, on warps that form a single score block (the two with two
// set the pace), in place of a dot product per element in the map and its reduction
// across lanes. bf16 only: f16 cannot hold z over long sequences.
template <typename T, int D>
__device__ void state_denominators(float* den, const float* z, const T* qs, int warp) {
    constexpr int LD = row_stride<D>(), TILES = CHUNK / 16, FIRST = PRODUCER_WARPS - TILES;
    static_assert(FIRST >= TILES * (TILES + 1) / 2 - PRODUCER_WARPS, "only warps with one score block take a tile");
    const int tile = warp - FIRST;
    if (tile < 0) return;
    const int lane = threadIdx.x % 32, column = lane / 4;
    const unsigned query_rows = element_address<LD>(qs, 16 * tile + lane % 16, (lane / 16) * 8);
    float acc[4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        // B (features x 8 columns): lane l holds features 2 (l % 4) + {0, 1} (and 8 on) of
        // column l / 4: column 0 is z rounded, column 1 the rest, the others zero.
        unsigned b[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const float2 x = *reinterpret_cast<const float2*>(z + 16 * kk + 8 * half + 2 * (lane % 4));
            float first = x.x, second = x.y;
            const unsigned rounded = pack<T>(first, second);
            const unsigned rest = pack_value<T>(x.x - first, x.y - second);
            b[half] = column == 0 ? rounded : column == 1 ? rest : 0u;
        }
        unsigned a[4];
        load_matrices(a, query_rows + 2u * 16 * kk);
        product<T>(acc, a, b[0], b[1]);
    }
    if (lane % 4 == 0) {
        den[16 * tile + lane / 4] = acc[0] + acc[1];
        den[16 * tile + lane / 4 + 8] = acc[2] + acc[3];
    }
}

// sums += the column sums of features [16 tile, 16 tile + 16) of a chunk's mapped keys:
// phi(K)^T times a column of ones on the tensor cores, the rounded values the products
// see summed in f32 (in place of an add per element in the map and a reduction across
// the warps). Every column of the product holds the sums: lane l has features l / 4
// (sums[0]) and l / 4 + 8 (sums[2]).
template <typename T, int D>
__device__ __forceinline__ void add_key_sums(float (&sums)[4], const T* ks, int tile) {
    constexpr int LD = row_stride<D>();
    const int lane = threadIdx.x % 32;
    const unsigned ones = pack_value<T>(1.f, 1.f);
    const unsigned key_rows = element_address<LD>(ks, lane % 8 + (lane / 16) * 8, 16 * tile + ((lane / 8) % 2) * 8);
#pragma unroll
    for (int sk = 0; sk < CHUNK / 16; ++sk) {
        unsigned a[4];
        load_matrices_transposed(a, key_rows + 2u * 16 * sk * LD);
        product<T>(sums, a, ones, ones);
    }
}

// z = z_before + the chunk's key sums, 16 features per producer warp.
template <typename T, int D>
__device__ void advance_key_sums(float* z, const float* z_before, const T* ks, int warp) {
    const int lane = threadIdx.x % 32;
    for (int tile = warp; tile < D / 16; tile += PRODUCER_WARPS) {
        float sums[4] = {};
        add_key_sums<T, D>(sums, ks, tile);
        if (lane % 4 == 0) {
            const int d = 16 * tile + lane / 4;
            z[d] = z_before[d] + sums[0];
            z[d + 8] = z_before[d + 8] + sums[2];
        }
    }
}

// The consumer side of causal_forward: S^T of the warp's 16 value columns in registers,
// one chunk at a time as the producers release them.
template <typename T, int D, bool PLAIN, bool REVERSE, typename O>
__device__ void consume_chunks(const T* tiles, const T* scores, const float* den, const float* row_parts, const float* z,
                               O* __restrict__ out, Shape sh, float eps, const float* state_in, float* state_out,
                               const float* partial_states, float* den_out, int b, int h, size_t head_kv, int first,
                               int last, int chunks, int parts_before, int all_parts, bool writes_state) {
    constexpr int THREADS = 32 * (PRODUCER_WARPS + D / 16);
    constexpr int LD = row_stride<D>(), LDS = CHUNK + PAD, TILE = CHUNK * LD;
    const int lane = threadIdx.x % 32;
    const int value_warp = threadIdx.x / 32 - PRODUCER_WARPS;
    float st[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const size_t at = static_cast<size_t>(state_feature(j, e)) * D + state_column(e, value_warp);
            float x = state_in ? state_in[head_kv * D * D + at] : 0.f;
            for (int part = 0; part < parts_before; ++part)
                x += partial_states[(head_kv * all_parts + part) * D * D + at];
            st[j][e] = x;
        }
    for (int c = 0; c < chunks; ++c) {
        const int p = c % 2, t0 = first + c * CHUNK, len = min(CHUNK, last - t0);
        const T* qs = tiles + (c % STAGES) * 3 * TILE;
        const T* ks = qs + TILE;
        const T* vs = ks + TILE;
        const T* chunk_scores = scores + p * CHUNK * LDS;
        named_barrier_sync(CHUNK_READY + p, THREADS);
        float o[4][2][4];
        clear(o);
        // The state before this chunk (z through it: a larger bound, still a bound).
        state_product<T, D>(o, st, qs, PLAIN ? 1.f : state_scale<T, D>(z + p * D));
        // Plus the masked scores times V: key tiles past the query tile are all masked.
        const unsigned value_rows =
            element_address<LD>(vs, lane % 8 + ((lane / 8) % 2) * 8, 16 * value_warp + (lane / 16) * 8);
        const unsigned score_rows = element_address<LDS>(chunk_scores, lane % 16, (lane / 16) * 8);
#pragma unroll
        for (int sk = 0; sk < CHUNK / 16; ++sk) {
            unsigned bb[4];
            load_matrices_transposed(bb, value_rows + 2u * 16 * sk * LD);
#pragma unroll
            for (int i = sk; i < 4; ++i) {
                unsigned a[4];
                load_matrices(a, score_rows + 2u * (16 * i * LDS + 16 * sk));
                product<T>(o[i][0], a, bb[0], bb[1]);
                product<T>(o[i][1], a, bb[2], bb[3]);
            }
        }
        store_rows<T, D, PLAIN, REVERSE, O>(out, o, den + p * CHUNK, row_parts + p * (CHUNK / 16) * CHUNK, eps, b, t0,
                                         len, sh.len, sh.heads_q, h, value_warp, den_out);
        absorb_chunk<T, D>(st, ks, vs, value_warp);
        if (c + 2 < chunks) named_barrier_arrive(CHUNK_FREE + p, THREADS);
    }
    if (state_out && writes_state) {
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                state_out[head_kv * D * D + static_cast<size_t>(state_feature(j, e)) * D +
                          state_column(e, value_warp)] = st[j][e];
    }
}

// Causal forward, warp-specialised. Grid: (segment, query head, batch). The producer
// warps stream each chunk's q, k, v into a ring of STAGES shared buffers, apply phi in
// place and form the masked scores and the denominators; one chunk behind them, each of
// the D / 16 consumer warps owns 16 value columns of S^T in registers, forms
// O = phi(Q) S + P V, stores it, and adds V^T phi(K) to its S^T. The two sides meet only
// at named barriers, one pair per buffer parity, so the maps and scores of a chunk overlap
// the products of the one before. A segment of `span` rows starts from state_in plus the
// sums of the `parts` spans per segment before it that state_pass wrote
// ([B, H_kv, (segments - 1) parts, D, D]); den_out, when given, receives each row's
// denominator.
//
// PLAIN computes sum_{j <= i} (q_i . k_j) v_j itself: no feature map, no denominator
// (the terms of the backward pass), into an output of type O. REVERSE walks the sequence
// from its end, which makes the sum run over j >= i.
template <typename T, int D, bool PLAIN = false, bool REVERSE = false, typename O = T>
__device__ void causal_forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                               O* __restrict__ out, Shape sh, float eps, const float* state_in,
                               const float* k_sum_in, float* state_out, float* k_sum_out, int span, int parts,
                               const float* partial_states, const float* partial_sums, float* den_out) {
    static_assert(!PLAIN || !IsHalf<T>::value, "without the key sums' bound an f16 state could overflow");
    constexpr int CONSUMERS = D / 16, PRODUCER_THREADS = 32 * PRODUCER_WARPS;
    constexpr int THREADS = 32 * (PRODUCER_WARPS + CONSUMERS);
    constexpr int LD = row_stride<D>(), LDS = CHUNK + PAD, TILE = CHUNK * LD;
    extern __shared__ __align__(128) char smem[];
    T* tiles = reinterpret_cast<T*>(smem);                            // STAGES x (q, k, v)
    T* scores = tiles + STAGES * 3 * TILE;                            // by parity: CHUNK x LDS
    float* den = reinterpret_cast<float*>(scores + 2 * CHUNK * LDS);  // by parity: CHUNK
    float* row_parts = den + 2 * CHUNK;              // by parity: CHUNK / 16 x CHUNK row sums per key block
    float* z = row_parts + 2 * CHUNK / 16 * CHUNK;   // by parity: key sums through the chunk

    const int segment = blockIdx.x, last_segment = gridDim.x - 1, h = blockIdx.y, b = blockIdx.z;
    const int group = sh.heads_q / sh.heads_kv, g = h / group;
    const int warp = threadIdx.x / 32;
    const size_t head_kv = static_cast<size_t>(b) * sh.heads_kv + g;
    const int parts_before = segment * parts, all_parts = last_segment * parts;
    const int first = segment * span, last = min(sh.len, first + span);
    const int chunks = (last - first + CHUNK - 1) / CHUNK;
    // Only the first query head of a group writes the group's final state.
    const bool writes_state = segment == last_segment && h % group == 0;

    if (warp < PRODUCER_WARPS) {
        if constexpr (THREADS == 512) asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGISTERS));
        for (int d = threadIdx.x; !PLAIN && d < D; d += PRODUCER_THREADS) {
            float x = k_sum_in ? k_sum_in[head_kv * D + d] : 0.f;
            for (int j = 0; j < parts_before; ++j) x += partial_sums[(head_kv * all_parts + j) * D + d];
            z[D + d] = x;  // parity 1 holds the sums before chunk 0
        }
        auto issue = [&](int c) {
            const int t0 = first + c * CHUNK, len = min(CHUNK, last - t0);
            T* at = tiles + (c % STAGES) * 3 * TILE;
            load_tile<D, PRODUCER_THREADS, REVERSE>(at, q, b, t0, len, sh.len, sh.heads_q, h);
            load_tile<D, PRODUCER_THREADS, REVERSE>(at + TILE, k, b, t0, len, sh.len, sh.heads_kv, g);
            load_tile<D, PRODUCER_THREADS, REVERSE>(at + 2 * TILE, v, b, t0, len, sh.len, sh.heads_kv, g);
            commit_copies();
        };
        issue(0);
        for (int c = 0; c < chunks; ++c) {
            const int p = c % 2, len = min(CHUNK, last - first - c * CHUNK);
            // Chunk c - 2 is consumed: its scores, sums and stage (the next chunk's) are free.
            if (c >= 2) named_barrier_sync(CHUNK_FREE + p, THREADS);
            if (c + 1 < chunks) {
                issue(c + 1);
                wait_copies_but_newest();
            } else {
                wait_copies();
            }
            named_barrier_sync(PRODUCERS, PRODUCER_THREADS);
            T* qs = tiles + (c % STAGES) * 3 * TILE;
            T* ks = qs + TILE;
            float* chunk_den = den + p * CHUNK;
            // The keys' sums come from advance_key_sums and (bf16) the queries' products with
            // z from state_denominators, on the tensor cores.
            if constexpr (!PLAIN) {
                if constexpr (IsHalf<T>::value) {
                    map_queries<D, PRODUCER_THREADS>(qs, len, z + (p ^ 1) * D, chunk_den);
                } else {
                    map_in_place<D, PRODUCER_THREADS>(qs, len);
                }
                map_in_place<D, PRODUCER_THREADS>(ks, len);
                named_barrier_sync(PRODUCERS, PRODUCER_THREADS);
            }
            // The plain passes have no denominator: no row sums.
            masked_scores<T, D, !PLAIN>(scores + p * CHUNK * LDS, row_parts + p * (CHUNK / 16) * CHUNK, qs, ks, warp);
            if constexpr (!PLAIN) {
                if constexpr (!IsHalf<T>::value) state_denominators<T, D>(chunk_den, z + (p ^ 1) * D, qs, warp);
                advance_key_sums<T, D>(z + p * D, z + (p ^ 1) * D, ks, warp);
            }
            named_barrier_arrive(CHUNK_READY + p, THREADS);
        }
        if (k_sum_out && writes_state) {
            named_barrier_sync(PRODUCERS, PRODUCER_THREADS);
            for (int d = threadIdx.x; d < D; d += PRODUCER_THREADS) k_sum_out[head_kv * D + d] = z[((chunks - 1) % 2) * D + d];
        }
    } else {
        if constexpr (THREADS == 512) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGISTERS));
        consume_chunks<T, D, PLAIN, REVERSE, O>(tiles, scores, den, row_parts, z, out, sh, eps, state_in, state_out,
                                             partial_states, den_out, b, h, head_kv, first, last, chunks, parts_before,
                                             all_parts, writes_state);
    }
}

// S and z over the first spans of the sequence, as full_state but on the tensor cores. Grid:
// (span, kv head, batch). PLAIN and REVERSE as in causal_forward (S = sum k_j v_j^T over
// the spans, z unused).
template <typename T, int D, bool PLAIN = false, bool REVERSE = false>
__device__ void state_pass(const T* __restrict__ k, const T* __restrict__ v, Shape sh, int span,
                           float* state, float* k_sum, bool per_span) {
    constexpr int WARPS = D / 16, THREADS = 32 * WARPS, TILE = CHUNK * row_stride<D>();
    extern __shared__ __align__(128) char smem[];
    T* tiles = reinterpret_cast<T*>(smem);  // 2 stages x (k, v)
    const int which = blockIdx.x, spans = gridDim.x, g = blockIdx.y, b = blockIdx.z, warp = threadIdx.x / 32;
    const size_t head_kv = static_cast<size_t>(b) * sh.heads_kv + g;
    float st[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[j][e] = 0.f;
    float sums[4] = {};  // features 16 warp + lane / 4 (+ 8), add_key_sums' layout
    const int first = which * span, last = min(sh.len, first + span);
    auto issue = [&](int t0, int stage) {
        const int len = min(CHUNK, last - t0);
        T* at = tiles + stage * 2 * TILE;
        load_tile<D, THREADS, REVERSE>(at, k, b, t0, len, sh.len, sh.heads_kv, g);
        load_tile<D, THREADS, REVERSE>(at + TILE, v, b, t0, len, sh.len, sh.heads_kv, g);
        commit_copies();
    };
    issue(first, 0);
    int stage = 0;
    for (int t0 = first; t0 < last; t0 += CHUNK, stage ^= 1) {
        T* ks = tiles + stage * 2 * TILE;
        wait_copies();
        __syncthreads();
        if (t0 + CHUNK < last) issue(t0 + CHUNK, stage ^ 1);
        if constexpr (!PLAIN) map_in_place<D, THREADS>(ks, min(CHUNK, last - t0));
        __syncthreads();
        if constexpr (!PLAIN) add_key_sums<T, D>(sums, ks, warp);
        absorb_chunk<T, D>(st, ks, ks + TILE, warp);
    }
    const size_t at = (per_span ? head_kv * spans + which : head_kv) * D;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float* target = &state[(at + state_feature(j, e)) * D + state_column(e, warp)];
            if (per_span) {
                *target = st[j][e];
            } else {
                atomicAdd(target, st[j][e]);
            }
        }
    if (threadIdx.x % 4 == 0) {
        const int d = 16 * warp + (threadIdx.x % 32) / 4;
        if (per_span) {
            k_sum[at + d] = sums[0];
            k_sum[at + d + 8] = sums[2];
        } else {
            atomicAdd(&k_sum[at + d], sums[0]);
            atomicAdd(&k_sum[at + d + 8], sums[2]);
        }
    }
}

// Non-causal second pass, O = phi(Q) S / (phi(Q) z + eps) for `span` rows per block.
// Grid: (span, query head, batch).
template <typename T, int D>
__device__ void apply_state(const T* __restrict__ q, T* __restrict__ out, Shape sh, int span, float eps,
                            const float* state, const float* k_sum) {
    constexpr int WARPS = D / 16, THREADS = 32 * WARPS, TILE = CHUNK * row_stride<D>();
    extern __shared__ __align__(128) char smem[];
    T* tiles = reinterpret_cast<T*>(smem);  // 2 stages x q
    float* den = reinterpret_cast<float*>(tiles + 2 * TILE);
    float* z = den + CHUNK;
    const int h = blockIdx.y, b = blockIdx.z;
    const size_t head_kv = static_cast<size_t>(b) * sh.heads_kv + h / (sh.heads_q / sh.heads_kv);
    float st[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            st[j][e] = state[(head_kv * D + state_feature(j, e)) * D + state_column(e, threadIdx.x / 32)];
    for (int d = threadIdx.x; d < D; d += THREADS) z[d] = k_sum[head_kv * D + d];
    const int first = blockIdx.x * span, last = min(sh.len, first + span);
    auto issue = [&](int t0, int stage) {
        load_tile<D, THREADS>(tiles + stage * TILE, q, b, t0, min(CHUNK, last - t0), sh.len, sh.heads_q, h);
        commit_copies();
    };
    issue(first, 0);
    __syncthreads();
    const float scale = state_scale<T, D>(z);
    int stage = 0;
    for (int t0 = first; t0 < last; t0 += CHUNK, stage ^= 1) {
        const int len = min(CHUNK, last - t0);
        T* qs = tiles + stage * TILE;
        wait_copies();
        __syncthreads();
        if (t0 + CHUNK < last) issue(t0 + CHUNK, stage ^ 1);
        map_queries<D, THREADS>(qs, len, z, den);
        __syncthreads();
        float o[4][2][4];
        clear(o);
        state_product<T, D>(o, st, qs, scale);
        store_rows<T, D>(out, o, den, nullptr, eps, b, t0, len, sh.len, sh.heads_q, h, threadIdx.x / 32);
    }
}

}  // namespace mma
}  // namespace linattn
