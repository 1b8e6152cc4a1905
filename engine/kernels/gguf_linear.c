/* Linear layers on GGUF weights as they are stored (llama.cpp's block formats), for CPU:
 *   y[m, n] = sum_k x[m, k] * w[n, k]
 * x: [M, K] fp32 (rows ldx apart), y: [M, N] fp32 (rows ldy apart), w: N rows of `row_bytes` bytes,
 * each row K / block_size blocks of one ggml type (enum below: ggml's own numbers).
 *
 * Every format is, per run of 32 (Q6_K: 16) weights, w = a * q + b: small integers q, a scale a and
 * an offset b (fp16 numbers and 6-bit sub-scales, decoded in fp32 as gguf's numpy dequantizer does).
 * Each 32-weight chunk is dequantized in registers, rounded exactly as numpy rounds it (the product,
 * then the sum), and multiplied into up to MT input rows with fused multiply-adds: the activations
 * stay fp32 (no int8 rounding of them), so the result is the fp32 product with the very weights of
 * the converted checkpoint, up to summation order. `tandem_gguf_dequant` writes the weights out in
 * fp32. From 16 input rows a panel GEMM takes over (below): SmolLM2's matrices at 32 rows run at
 * 84-117 GFLOP/s on 2 AVX2 cores, oneDNN's fp32 GEMM on the dequantized weights at 46-99.
 *
 * One source, three instruction sets: AVX-512 (16 floats a vector), AVX2 with FMA and F16C (8), and
 * plain C (the compiler's own vectorisation). engine/kernels builds it once per x86 level the CPU runs
 * (x86-64-v4, x86-64-v3, x86-64) and picks the best at run time; tests run every level the machine
 * can. Built with -ffp-contract=off: the only fused multiply-adds are the explicit ones.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

enum { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

static inline float f16(const uint8_t *p) {
    _Float16 h;
    memcpy(&h, p, 2);
    return (float)h;
}
static inline float bf16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- vectors: VL floats; a 32-weight chunk is NV of them ---------------------------------------- */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define VL 16
#define MT 8 /* input rows per weight decode (32 zmm registers) */
typedef __m512 vf;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vset1(a) _mm512_set1_ps(a)
#define vhsum(v) _mm512_reduce_add_ps(v)
/* 16 bytes (signed or not) -> 16 floats */
static inline void bytes16(__m128i v, int sgn, vf *w) {
    w[0] = _mm512_cvtepi32_ps(sgn ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v));
}
static inline void half16(const uint8_t *p, vf *w) { w[0] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline void bhalf16(const uint8_t *p, vf *w) {
    w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define VL 8
#define MT 8 /* 8 accumulators and a decoded chunk of 4 in 16 ymm registers */
typedef __m256 vf;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vset1(a) _mm256_set1_ps(a)
static inline float vhsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline __m256 cvt8(__m128i v, int sgn) { /* the low 8 bytes */
    return _mm256_cvtepi32_ps(sgn ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v));
}
static inline void bytes16(__m128i v, int sgn, vf *w) {
    w[0] = cvt8(v, sgn);
    w[1] = cvt8(_mm_unpackhi_epi64(v, v), sgn);
}
static inline void half16(const uint8_t *p, vf *w) {
    w[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    w[1] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)));
}
static inline __m256 bhalf8(const uint8_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline void bhalf16(const uint8_t *p, vf *w) {
    w[0] = bhalf8(p);
    w[1] = bhalf8(p + 16);
}
#else
#define VL 1
#define MT 4
#define SCALAR 1
typedef float vf;
#define vzero() 0.f
#define vload(p) (*(p))
#define vfma(a, b, c) ((a) * (b) + (c)) /* not fused here: plain C has no cheap fma everywhere */
#define vadd(a, b) ((a) + (b))
#define vmul(a, b) ((a) * (b))
#define vset1(a) (a)
#define vhsum(v) (v)
#endif
#define NV (32 / VL)

/* ---- formats ------------------------------------------------------------------------------------ */
static int block_bytes(int t) {
    switch (t) {
    case F16: case BF16: return 64; /* taken as 32-element blocks */
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
    default: return 0;
    }
}
static int block_elems(int t) { return (t == Q4_K || t == Q5_K || t == Q6_K) ? 256 : 32; }
static inline int has_offset(int t) { return t == Q4_1 || t == Q4_K || t == Q5_K; }

/* Q4_K / Q5_K: the 6-bit scale and min of sub-block j (ggml's get_scale_min_k4) */
static inline void scale_min_k4(int j, const uint8_t *s, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* The scales of chunk c's two halves (equal but for Q6_K's 16-weight sub-blocks) and its offset. */
static inline __attribute__((always_inline)) void chunk_scales(const int t, const uint8_t *blk, int c, float *alo,
                                                               float *ahi, float *b) {
    *b = 0.f;
    switch (t) {
    case Q4_0: case Q8_0: *alo = *ahi = f16(blk); return;
    case Q4_1: *alo = *ahi = f16(blk); *b = f16(blk + 2); return;
    case Q4_K: case Q5_K: {
        int sc, mn;
        scale_min_k4(c, blk + 4, &sc, &mn);
        *alo = *ahi = f16(blk) * (float)sc;
        *b = -(f16(blk + 2) * (float)mn);
        return;
    }
    case Q6_K: {
        const int8_t *s = (const int8_t *)(blk + 192);
        float d = f16(blk + 208);
        *alo = d * (float)s[2 * c];
        *ahi = d * (float)s[2 * c + 1];
        return;
    }
    default: *alo = *ahi = 1.f; return;
    }
}

#ifndef SCALAR
/* The integers of chunk c: weights 0-15 in *lo, 16-31 in *hi, as bytes; returns whether signed. */
static inline __attribute__((always_inline)) int chunk_bytes(const int t, const uint8_t *blk, int c, __m128i *lo,
                                                             __m128i *hi) {
    const __m128i nib = _mm_set1_epi8(0xF);
    switch (t) {
    case Q4_0: case Q4_1: {
        __m128i v = _mm_loadu_si128((const __m128i *)(blk + (t == Q4_0 ? 2 : 4)));
        *lo = _mm_and_si128(v, nib);
        *hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
        if (t == Q4_0) {
            *lo = _mm_sub_epi8(*lo, _mm_set1_epi8(8));
            *hi = _mm_sub_epi8(*hi, _mm_set1_epi8(8));
            return 1;
        }
        return 0;
    }
    case Q8_0:
        *lo = _mm_loadu_si128((const __m128i *)(blk + 2));
        *hi = _mm_loadu_si128((const __m128i *)(blk + 18));
        return 1;
    case Q4_K: case Q5_K: {
        const uint8_t *qs = blk + (t == Q4_K ? 16 : 48) + 32 * (c >> 1);
        __m128i a = _mm_loadu_si128((const __m128i *)qs), b = _mm_loadu_si128((const __m128i *)(qs + 16));
        if (c & 1) {
            a = _mm_srli_epi16(a, 4);
            b = _mm_srli_epi16(b, 4);
        }
        *lo = _mm_and_si128(a, nib);
        *hi = _mm_and_si128(b, nib);
        if (t == Q5_K) { /* bit c of qh[l] is bit 4 of weight l */
            const __m128i one = _mm_set1_epi8(1), n = _mm_cvtsi32_si128(c);
            __m128i h0 = _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i *)(blk + 16)), n), one);
            __m128i h1 = _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i *)(blk + 32)), n), one);
            *lo = _mm_or_si128(*lo, _mm_slli_epi16(h0, 4));
            *hi = _mm_or_si128(*hi, _mm_slli_epi16(h1, 4));
        }
        return 0;
    }
    default: { /* Q6_K: chunk c = 4 h + s of 128-weight half h */
        int h = c >> 2, s = c & 3;
        const uint8_t *ql = blk + 64 * h + 32 * (s & 1), *qh = blk + 128 + 32 * h;
        __m128i a = _mm_loadu_si128((const __m128i *)ql), b = _mm_loadu_si128((const __m128i *)(ql + 16));
        if (s >= 2) {
            a = _mm_srli_epi16(a, 4);
            b = _mm_srli_epi16(b, 4);
        }
        const __m128i three = _mm_set1_epi8(3), n = _mm_cvtsi32_si128(2 * s);
        __m128i h0 = _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i *)qh), n), three);
        __m128i h1 = _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i *)(qh + 16)), n), three);
        *lo = _mm_sub_epi8(_mm_or_si128(_mm_and_si128(a, nib), _mm_slli_epi16(h0, 4)), _mm_set1_epi8(32));
        *hi = _mm_sub_epi8(_mm_or_si128(_mm_and_si128(b, nib), _mm_slli_epi16(h1, 4)), _mm_set1_epi8(32));
        return 1;
    }
    }
}

/* Chunk c of a block as NV vectors of its integers in fp32 (F16, BF16: the weights themselves). */
static inline __attribute__((always_inline)) void chunk_ints(const int t, const uint8_t *blk, int c, vf *w) {
    if (t == F16) {
        half16(blk, w);
        half16(blk + 32, w + NV / 2);
        return;
    }
    if (t == BF16) {
        bhalf16(blk, w);
        bhalf16(blk + 32, w + NV / 2);
        return;
    }
    __m128i lo, hi;
    int sgn = chunk_bytes(t, blk, c, &lo, &hi);
    bytes16(lo, sgn, w);
    bytes16(hi, sgn, w + NV / 2);
}
#else
static inline int q_at(const int t, const uint8_t *blk, int c, int l) { /* integer l (0-31) of chunk c */
    switch (t) {
    case Q4_0: return (l < 16 ? blk[2 + l] & 0xF : blk[2 + l - 16] >> 4) - 8;
    case Q4_1: return l < 16 ? blk[4 + l] & 0xF : blk[4 + l - 16] >> 4;
    case Q8_0: return (int8_t)blk[2 + l];
    case Q4_K: case Q5_K: {
        const uint8_t *qs = blk + (t == Q4_K ? 16 : 48) + 32 * (c >> 1);
        int q = (c & 1) ? qs[l] >> 4 : qs[l] & 0xF;
        return t == Q5_K ? q | (((blk[16 + l] >> c) & 1) << 4) : q;
    }
    default: {
        int h = c >> 2, s = c & 3;
        int lo = blk[64 * h + 32 * (s & 1) + l];
        lo = s >= 2 ? lo >> 4 : lo & 0xF;
        return (lo | (((blk[128 + 32 * h + l] >> (2 * s)) & 3) << 4)) - 32;
    }
    }
}
static inline __attribute__((always_inline)) void chunk_ints(const int t, const uint8_t *blk, int c, float *w) {
    for (int l = 0; l < 32; l++)
        w[l] = t == F16 ? f16(blk + 2 * l) : t == BF16 ? bf16(blk + 2 * l) : (float)q_at(t, blk, c, l);
}
#endif

/* Chunk c of a block as NV vectors of fp32 weights: a * q (+ b), each rounded as numpy rounds it. */
static inline __attribute__((always_inline)) void chunk(const int t, const uint8_t *blk, int c, vf *w) {
    chunk_ints(t, blk, c, w);
    float alo, ahi, b;
    chunk_scales(t, blk, c, &alo, &ahi, &b);
    const vf va = vset1(alo), vb = vset1(ahi), vo = vset1(b);
    for (int j = 0; j < NV; j++) {
        w[j] = vmul(w[j], j < NV / 2 ? va : vb);
        if (has_offset(t)) w[j] = vadd(w[j], vo);
    }
}

/* out[m] = dot(x[m], row) for mb input rows (a constant after inlining). Each chunk is dequantized
 * once, for all of them. (Multiplying the integers in and scaling once per chunk and row, with the
 * offsets through x's chunk sums, ran 25-50% slower here: more work per row than per chunk.) */
static inline __attribute__((always_inline)) void row_dot(const int t, const uint8_t *row, int64_t K,
                                                          const float *x, int64_t ldx, const int mb, float *out) {
    const int bb = block_bytes(t), cpb = block_elems(t) / 32; /* 32-weight chunks per block */
    /* independent accumulators when there are few rows: one would wait on each fused multiply-add */
    const int na = mb == 1 ? 4 : mb == 2 ? 2 : 1;
    vf acc[MT][4];
    for (int m = 0; m < mb; m++)
        for (int j = 0; j < na; j++) acc[m][j] = vzero();
    for (int64_t c0 = 0; c0 < K / 32; c0 += cpb) {
        const uint8_t *blk = row + (c0 / cpb) * bb;
        for (int c = 0; c < cpb; c++) {
            vf w[NV];
            chunk(t, blk, c, w);
            const float *xc = x + 32 * (c0 + c);
            for (int m = 0; m < mb; m++)
                for (int j = 0; j < NV; j++)
                    acc[m][j % na] = vfma(vload(xc + m * ldx + j * VL), w[j], acc[m][j % na]);
        }
    }
    for (int m = 0; m < mb; m++) {
        vf s = acc[m][0];
        for (int j = 1; j < na; j++) s = vadd(s, acc[m][j]);
        out[m] = vhsum(s);
    }
}

/* out = dot(x, row) for one input row (decode at batch 1): the integers are multiplied in and each
 * chunk's sums scaled once, a * (x . q) (+ b * sum(x), from xs, x's chunk sums), instead of scaling
 * every weight first: a third fewer operations per weight, where one row gets no reuse of a decoded
 * chunk to pay for them. fp32 throughout; the rounding differs from dequantize-then-dot by summation
 * order only (tests/unit/test_gguf_kernels.py bounds both the same way). */
static inline __attribute__((always_inline)) float row_dot1(const int t, const uint8_t *row, int64_t K,
                                                            const float *x, const float *xs) {
    const int bb = block_bytes(t), cpb = block_elems(t) / 32;
    vf acc0 = vzero(), acc1 = vzero();
    float off = 0.f;
    for (int64_t c0 = 0; c0 < K / 32; c0 += cpb) {
        const uint8_t *blk = row + (c0 / cpb) * bb;
        for (int c = 0; c < cpb; c++) {
            vf w[NV];
            chunk_ints(t, blk, c, w);
            float alo, ahi, b;
            chunk_scales(t, blk, c, &alo, &ahi, &b);
            const float *xc = x + 32 * (c0 + c);
            vf lo = vmul(vload(xc), w[0]), hi = vmul(vload(xc + 16), w[NV / 2]);
            for (int j = 1; j < NV / 2; j++) {
                lo = vfma(vload(xc + j * VL), w[j], lo);
                hi = vfma(vload(xc + 16 + j * VL), w[NV / 2 + j], hi);
            }
            acc0 = vfma(vset1(alo), lo, acc0);
            acc1 = vfma(vset1(ahi), hi, acc1);
            if (has_offset(t)) off += b * xs[c0 + c];
        }
    }
    return vhsum(vadd(acc0, acc1)) + off;
}

/* the sums of x's 32-value chunks (the offsets' factor in row_dot1) */
static void chunk_sums(const float *x, int64_t K, float *xs) {
    for (int64_t c = 0; c < K / 32; c++) {
        vf s = vzero();
        for (int j = 0; j < NV; j++) s = vadd(s, vload(x + 32 * c + j * VL));
        xs[c] = vhsum(s);
    }
}

#define ROW_CASE(T, n) case n: row_dot(T, row, K, xm, ldx, n, out); break;
#if MT == 8
#define ROW_CASES(T) ROW_CASE(T, 2) ROW_CASE(T, 3) ROW_CASE(T, 4) ROW_CASE(T, 5) ROW_CASE(T, 6) ROW_CASE(T, 7) ROW_CASE(T, 8)
#else
#define ROW_CASES(T) ROW_CASE(T, 2) ROW_CASE(T, 3) ROW_CASE(T, 4)
#endif
/* rows [n0, n1) of the output for every input row, for one weight type */
#define ROWS(T)                                                                                           \
    static void rows_##T(const uint8_t *w, int64_t rb, int64_t n0, int64_t n1, int64_t K, const float *x,  \
                         int64_t ldx, int64_t M, float *y, int64_t ldy) {                                 \
        float out[MT];                                                                                    \
        if (M == 1 && T != F16 && T != BF16) { /* no scales to factor out of those */                     \
            float xs[K / 32 + 1];                                                                         \
            if (has_offset(T)) chunk_sums(x, K, xs); /* only offsets read them */                         \
            for (int64_t n = n0; n < n1; n++) y[n] = row_dot1(T, w + n * rb, K, x, xs);                   \
            return;                                                                                       \
        }                                                                                                 \
        for (int64_t n = n0; n < n1; n++) {                                                               \
            const uint8_t *row = w + n * rb;                                                              \
            for (int64_t m0 = 0; m0 < M; m0 += MT) {                                                      \
                int mb = (int)(M - m0 < MT ? M - m0 : MT);                                                \
                const float *xm = x + m0 * ldx;                                                           \
                switch (mb) {                                                                             \
                ROW_CASES(T)                                                                              \
                default: row_dot(T, row, K, xm, ldx, 1, out); break;                                      \
                }                                                                                         \
                for (int m = 0; m < mb; m++) y[(m0 + m) * ldy + n] = out[m];                              \
            }                                                                                             \
        }                                                                                                 \
    }
ROWS(Q4_0)
ROWS(Q4_1)
ROWS(Q8_0)
ROWS(Q4_K)
ROWS(Q5_K)
ROWS(Q6_K)
ROWS(F16)
ROWS(BF16)

typedef void (*rows_fn)(const uint8_t *, int64_t, int64_t, int64_t, int64_t, const float *, int64_t, int64_t,
                        float *, int64_t);

static rows_fn rows_for(int t) {
    switch (t) {
    case Q4_0: return rows_Q4_0;
    case Q4_1: return rows_Q4_1;
    case Q8_0: return rows_Q8_0;
    case Q4_K: return rows_Q4_K;
    case Q5_K: return rows_Q5_K;
    case Q6_K: return rows_Q6_K;
    case F16: return rows_F16;
    case BF16: return rows_BF16;
    default: return 0;
    }
}

/* The bytes of a row of K weights of type t; 0 where t is not taken or K is not whole blocks. */
int64_t tandem_gguf_row_bytes(int t, int64_t K) {
    if (!rows_for(t) || K <= 0 || K % block_elems(t)) return 0;
    return K / block_elems(t) * block_bytes(t);
}

int tandem_gguf_max_rows(void) { return MT; }

/* Threads for the row kernels over N rows of rb bytes and M inputs: one where there is too little work
 * to be worth waking another. */
static int row_threads(int64_t N, int64_t rb, int64_t M, int num_threads) {
    if (N * rb * ((M + MT - 1) / MT) < (1 << 14)) return 1;
    return num_threads < N ? num_threads : (int)N;
}

/* Returns 0, or -2 for a type or K it does not take. */
#ifndef SCALAR
static int gemm(int t, const float *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *w, int64_t rb, int64_t N,
                float *y, int64_t ldy, int num_threads);
#define GEMM_MIN_ROWS 16 /* from here on the panel GEMM below beats the row kernel (AVX2: 66 vs ~60 GFLOP/s) */
#else
#define GEMM_MIN_ROWS 0
#endif

int tandem_gguf_gemm_min_rows(void) { return GEMM_MIN_ROWS; }

int tandem_gguf_linear(int t, const float *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *w, int64_t N,
                       float *y, int64_t ldy, int num_threads) {
    rows_fn fn = rows_for(t);
    int64_t rb = tandem_gguf_row_bytes(t, K);
    if (!fn || !rb) return -2;
#ifndef SCALAR
    if (M >= GEMM_MIN_ROWS) return gemm(t, x, M, K, ldx, w, rb, N, y, ldy, num_threads);
#endif
    int nt = row_threads(N, rb, M, num_threads);
    if (nt <= 1) {
        fn(w, rb, 0, N, K, x, ldx, M, y, ldy);
    } else {
#pragma omp parallel num_threads(nt)
        {
            int i = omp_get_thread_num(), T = omp_get_num_threads();
            fn(w, rb, N * i / T, N * (i + 1) / T, K, x, ldx, M, y, ldy);
        }
    }
    return 0;
}

#define CHUNK_CASE(T) case T: chunk(T, blk, c, v); break;
/* chunk() for a type known at run time: each case inlines one format */
static void chunk_any(int t, const uint8_t *blk, int c, vf *v) {
    switch (t) {
    CHUNK_CASE(Q4_0) CHUNK_CASE(Q4_1) CHUNK_CASE(Q8_0) CHUNK_CASE(Q4_K)
    CHUNK_CASE(Q5_K) CHUNK_CASE(Q6_K) CHUNK_CASE(F16) CHUNK_CASE(BF16)
    }
}

/* rows [n0, n1) as fp32 [n1 - n0, K] at out */
static void dequant_rows(int t, const uint8_t *w, int64_t rb, int64_t n0, int64_t n1, int64_t K, float *out) {
    const int bb = block_bytes(t), cpb = block_elems(t) / 32;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * rb;
        float *o = out + (n - n0) * K;
        for (int64_t c0 = 0; c0 < K / 32; c0 += cpb) {
            const uint8_t *blk = row + (c0 / cpb) * bb;
            for (int c = 0; c < cpb; c++) {
                vf v[NV];
                chunk_any(t, blk, c, v);
                memcpy(o + 32 * (c0 + c), v, sizeof v);
            }
        }
    }
}

int tandem_gguf_dequant(int t, const uint8_t *w, int64_t N, int64_t K, float *out, int num_threads) {
    int64_t rb = tandem_gguf_row_bytes(t, K);
    if (!rb) return -2;
    int nt = num_threads < N ? num_threads : (int)N;
#pragma omp parallel num_threads(nt > 1 ? nt : 1)
    {
        int i = omp_get_thread_num(), T = omp_get_num_threads();
        int64_t n0 = N * i / T, n1 = N * (i + 1) / T;
        dequant_rows(t, w, rb, n0, n1, K, out + n0 * K);
    }
    return 0;
}

#ifndef SCALAR
/* ---- larger batches: panels of PN weight rows dequantized once (row-major fp32, in cache), then
 * tiles of TM input rows x TN weight rows with TM x TN accumulators: per VL columns of k, TM + TN
 * loads feed TM * TN fused multiply-adds (the row kernel: one load each), and each weight is decoded
 * once a call instead of once per MT input rows. */
#if VL == 16
#define TM 4
#define TN 4 /* 16 accumulators, 8 operands of 32 zmm */
#else
#define TM 4
#define TN 3 /* 12 accumulators, 4 operands of 16 ymm */
#endif
#define PN (8 * TN) /* weight rows a panel */

/* y[i][j] = dot(x[i], wt[j]) for i < tm, j < tn (constants after inlining) */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx, const float *wt, int64_t K,
                                                       const int tm, const int tn, float *y, int64_t ldy) {
    vf acc[TM][TN];
    for (int i = 0; i < tm; i++)
        for (int j = 0; j < tn; j++) acc[i][j] = vzero();
    for (int64_t k = 0; k < K; k += VL) {
        vf xv[TM];
        for (int i = 0; i < tm; i++) xv[i] = vload(x + i * ldx + k);
        for (int j = 0; j < tn; j++) {
            const vf wv = vload(wt + j * K + k);
            for (int i = 0; i < tm; i++) acc[i][j] = vfma(xv[i], wv, acc[i][j]);
        }
    }
    for (int i = 0; i < tm; i++)
        for (int j = 0; j < tn; j++) y[i * ldy + j] = vhsum(acc[i][j]);
}

#define TILE(tm, tn) tile(x + m * ldx, ldx, wt + j * K, K, tm, tn, y + m * ldy + n0 + j, ldy)
/* every input row against a panel's nr rows: whole TM x TN tiles, then the edges */
static void panel_rows(const float *x, int64_t M, int64_t K, int64_t ldx, const float *wt, int nr, float *y,
                       int64_t ldy, int64_t n0) {
    for (int64_t m = 0; m < M; m += TM) {
        const int tm = (int)(M - m < TM ? M - m : TM);
        for (int j = 0; j < nr; j += TN) {
            const int tn = nr - j < TN ? nr - j : TN;
            if (tm == TM && tn == TN) {
                TILE(TM, TN);
                continue;
            }
            for (int i = 0; i < tm; i++) /* edges: one input row at a time */
                for (int jj = 0; jj < tn; jj++)
                    tile(x + (m + i) * ldx, ldx, wt + (j + jj) * K, K, 1, 1, y + (m + i) * ldy + n0 + j + jj, ldy);
        }
    }
}

static int gemm(int t, const float *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *w, int64_t rb, int64_t N,
                float *y, int64_t ldy, int num_threads) {
    const int64_t np = (N + PN - 1) / PN;
    int nt = num_threads < np ? num_threads : (int)np;
    if (nt < 1) nt = 1;
    int failed = 0;
#pragma omp parallel num_threads(nt)
    {
        float *wt = (float *)aligned_alloc(64, (size_t)((PN * K * sizeof(float) + 63) / 64 * 64));
        int i = omp_get_thread_num(), T = omp_get_num_threads();
        if (wt) {
            for (int64_t p = np * i / T; p < np * (i + 1) / T; p++) {
                const int64_t n0 = p * PN;
                const int nr = (int)(N - n0 < PN ? N - n0 : PN);
                dequant_rows(t, w, rb, n0, n0 + nr, K, wt);
                panel_rows(x, M, K, ldx, wt, nr, y, ldy, n0);
            }
        } else {
#pragma omp atomic write
            failed = 1;
        }
        free(wt);
    }
    return failed ? -1 : 0;
}
#endif

/* ---- int8 activations (opt-in, lossy, as llama.cpp computes): each 32 values of an input row become
 * int8 with one fp32 scale (round(x / d), d = max |x| / 127), and a block's dot product is an integer
 * one, scaled once: d_w * d_x * sum(q_w q_x) (+ m_w * d_x * sum(q_x) for Q4_1). Q4_0, Q4_1 and Q8_0;
 * other types keep the exact path. AVX2 (and AVX-512 machines, through the same instructions); plain C
 * elsewhere. */
typedef struct {
    float d, s;   /* scale, and d * sum(q) */
    int8_t q[32];
} q8_block;

static void quantize_row_q8(const float *x, int64_t K, q8_block *out) {
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.f;
        for (int l = 0; l < 32; l++) amax = fabsf(xb[l]) > amax ? fabsf(xb[l]) : amax;
        const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
        int sum = 0;
        for (int l = 0; l < 32; l++) {
            int v = (int)nearbyintf(xb[l] * id);
            out[b].q[l] = (int8_t)v;
            sum += v;
        }
        out[b].d = d;
        out[b].s = d * (float)sum;
    }
}

#if defined(__AVX2__)
static inline float hsum8f(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 dot_i8(__m256i w, __m256i x, int w_signed) { /* 8 lanes of int32 sums, as floats */
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p = w_signed ? _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
                         : _mm256_maddubs_epi16(w, x);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
}
#endif

/* out[m] = dot(x[m], row) over nb blocks, x as q8 blocks (nb a row) */
static inline __attribute__((always_inline)) void row_dot_q8(const int t, const uint8_t *row, int64_t nb,
                                                             const q8_block *xq, const int mb, float *out) {
    const int bb = block_bytes(t);
#if defined(__AVX2__)
    __m256 acc[MT];
    float off[MT];
    for (int m = 0; m < mb; m++) {
        acc[m] = _mm256_setzero_ps();
        off[m] = 0.f;
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bb;
        __m256i w;
        if (t == Q8_0) {
            w = _mm256_loadu_si256((const __m256i *)(blk + 2));
        } else {
            __m128i v = _mm_loadu_si128((const __m128i *)(blk + (t == Q4_0 ? 2 : 4)));
            w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0xF));
            if (t == Q4_0) w = _mm256_sub_epi8(w, _mm256_set1_epi8(8));
        }
        const float dw = f16(blk), mw = t == Q4_1 ? f16(blk + 2) : 0.f;
        for (int m = 0; m < mb; m++) {
            const q8_block *xb = xq + m * nb + b;
            __m256 s = dot_i8(w, _mm256_loadu_si256((const __m256i *)xb->q), t != Q4_1);
            acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xb->d), s, acc[m]);
            if (t == Q4_1) off[m] += mw * xb->s;
        }
    }
    for (int m = 0; m < mb; m++) out[m] = hsum8f(acc[m]) + off[m];
#else
    for (int m = 0; m < mb; m++) {
        float sum = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * bb;
            const q8_block *xb = xq + m * nb + b;
            int dot = 0;
            for (int l = 0; l < 32; l++) {
                int q = t == Q8_0 ? (int8_t)blk[2 + l]
                                  : (l < 16 ? blk[(t == Q4_0 ? 2 : 4) + l] & 0xF : blk[(t == Q4_0 ? 2 : 4) + l - 16] >> 4);
                if (t == Q4_0) q -= 8;
                dot += q * xb->q[l];
            }
            sum += f16(blk) * xb->d * (float)dot + (t == Q4_1 ? f16(blk + 2) * xb->s : 0.f);
        }
        out[m] = sum;
    }
#endif
}

#define Q8_CASE(T, n) case n: row_dot_q8(T, row, nb, xm, n, out); break;
#define ROWS_Q8(T)                                                                                        \
    static void rows_q8_##T(const uint8_t *w, int64_t rb, int64_t n0, int64_t n1, int64_t nb,               \
                            const q8_block *xq, int64_t M, float *y, int64_t ldy) {                       \
        float out[MT];                                                                                    \
        for (int64_t n = n0; n < n1; n++) {                                                               \
            const uint8_t *row = w + n * rb;                                                              \
            for (int64_t m0 = 0; m0 < M; m0 += MT) {                                                      \
                int mb = (int)(M - m0 < MT ? M - m0 : MT);                                                \
                const q8_block *xm = xq + m0 * nb;                                                        \
                switch (mb) {                                                                             \
                ROW_Q8_CASES(T)                                                                           \
                default: row_dot_q8(T, row, nb, xm, 1, out); break;                                       \
                }                                                                                         \
                for (int m = 0; m < mb; m++) y[(m0 + m) * ldy + n] = out[m];                              \
            }                                                                                             \
        }                                                                                                 \
    }
#if MT == 8
#define ROW_Q8_CASES(T) Q8_CASE(T, 2) Q8_CASE(T, 3) Q8_CASE(T, 4) Q8_CASE(T, 5) Q8_CASE(T, 6) Q8_CASE(T, 7) Q8_CASE(T, 8)
#else
#define ROW_Q8_CASES(T) Q8_CASE(T, 2) Q8_CASE(T, 3) Q8_CASE(T, 4)
#endif
ROWS_Q8(Q4_0)
ROWS_Q8(Q4_1)
ROWS_Q8(Q8_0)

/* Whether type t has the int8-activation path. */
int tandem_gguf_q8_takes(int t) { return t == Q4_0 || t == Q4_1 || t == Q8_0; }

/* y = x w^T with x rounded to int8 blocks first (see above); from GEMM_MIN_ROWS rows on, the exact panel
 * GEMM instead (the int8 path is for small batches). Returns 0, -1 out of memory, -2 a type or K it does
 * not take. */
int tandem_gguf_linear_q8(int t, const float *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *w, int64_t N,
                          float *y, int64_t ldy, int num_threads) {
    int64_t rb = tandem_gguf_row_bytes(t, K);
    if (!tandem_gguf_q8_takes(t) || !rb) return -2;
    if (GEMM_MIN_ROWS && M >= GEMM_MIN_ROWS) return tandem_gguf_linear(t, x, M, K, ldx, w, N, y, ldy, num_threads);
    const int64_t nb = K / 32;
    q8_block *xq = (q8_block *)malloc(sizeof(q8_block) * (size_t)(M * nb));
    if (!xq) return -1;
    for (int64_t m = 0; m < M; m++) quantize_row_q8(x + m * ldx, K, xq + m * nb);
    void (*fn)(const uint8_t *, int64_t, int64_t, int64_t, int64_t, const q8_block *, int64_t, float *, int64_t) =
        t == Q4_0 ? rows_q8_Q4_0 : t == Q4_1 ? rows_q8_Q4_1 : rows_q8_Q8_0;
    int nt = row_threads(N, rb, M, num_threads);
    if (nt <= 1) {
        fn(w, rb, 0, N, nb, xq, M, y, ldy);
    } else {
#pragma omp parallel num_threads(nt)
        {
            int i = omp_get_thread_num(), T = omp_get_num_threads();
            fn(w, rb, N * i / T, N * (i + 1) / T, nb, xq, M, y, ldy);
        }
    }
    free(xq);
    return 0;
}
