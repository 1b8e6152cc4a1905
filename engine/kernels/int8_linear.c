/* Weight-only int8 linear layer for small batches on CPU (decode):
 *   y[m, n] = (sum_k x[m, k] * w[n, k]) * scale[n] + bias[n]
 * x: [M, K] fp32 or bf16 (row-major), scale, bias: fp32 [N] (bias may be NULL), y: [M, N] in x's
 * dtype. w is int8 (symmetric, per output channel), packed once at load time (engine/layers/
 * quantization.py) so that the kernel reads it strictly in order, one cache line per step:
 *   [ceil(N / R)][Kp / KB][R][KB], zero-padded, Kp = K rounded up to KB.
 * (Row-major [N, K] streams R short runs at once and ran at 60% of the packed rate here.)
 *
 * Products and sums in fp32 (bf16 inputs are exact in fp32), rounded once to bf16 on output: the
 * arithmetic of torch's weight-only int8 kernel, in another summation order. Each weight block is
 * converted to fp32 once and used for up to MB input rows. Built by engine/kernels/__init__.py with
 * -O3 -march=native; the OpenMP runtime is torch's own (libgomp.so.1, loaded before this library).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#include <omp.h>

#define R 4              /* weight rows per group */
#define KB 16            /* k per block: R * KB = 64 bytes, one cache line */
#define PF (16 * R * KB) /* prefetch distance in bytes */

int tandem_int8_rows_per_group(void) { return R; }
int tandem_int8_k_block(void) { return KB; }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* out[m * R + r] = dot(x[m], row r of the group at w), for mb input rows (x rows are Kp apart) */
#if defined(__AVX512F__)
#define MB 4
static inline __attribute__((always_inline)) void group_dot(const float *x, int64_t Kp, const int mb,
                                                            const int8_t *w, float *out) {
    __m512 acc[MB][R];
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < Kp; k += KB) {
        const int8_t *wk = w + k * R;
        _mm_prefetch((const char *)(wk + PF), _MM_HINT_T0);
        __m512 wv[R];
        for (int r = 0; r < R; r++)
            wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wk + KB * r))));
        for (int m = 0; m < mb; m++) {
            __m512 xv = _mm512_loadu_ps(x + m * Kp + k);
            for (int r = 0; r < R; r++) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < R; r++) out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define MB 2 /* 16 ymm registers */
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) void group_dot(const float *x, int64_t Kp, const int mb,
                                                            const int8_t *w, float *out) {
    __m256 acc[MB][R];
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < Kp; k += KB) {
        const int8_t *wk = w + k * R;
        _mm_prefetch((const char *)(wk + PF), _MM_HINT_T0);
        for (int h = 0; h < KB; h += 8) {
            __m256 wv[R];
            for (int r = 0; r < R; r++)
                wv[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(wk + KB * r + h))));
            for (int m = 0; m < mb; m++) {
                __m256 xv = _mm256_loadu_ps(x + m * Kp + k + h);
                for (int r = 0; r < R; r++) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
            }
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < R; r++) out[m * R + r] = hsum256(acc[m][r]);
}
#else
#define MB 1
static inline void group_dot(const float *x, int64_t Kp, const int mb, const int8_t *w, float *out) {
    (void)mb;
    float acc[R] = {0};
    for (int64_t k = 0; k < Kp; k += KB)
        for (int r = 0; r < R; r++)
            for (int j = 0; j < KB; j++) acc[r] += x[k + j] * (float)w[k * R + r * KB + j];
    for (int r = 0; r < R; r++) out[r] = acc[r];
}
#endif

/* groups [g0, g1) of the output, for every input row */
static void run_groups(const float *xf, int64_t M, int64_t Kp, const int8_t *w, int64_t N, const float *scale,
                       const float *bias, void *y, int y_bf16, int64_t g0, int64_t g1) {
    float acc[MB * R];
    for (int64_t g = g0; g < g1; g++) {
        const int8_t *wg = w + g * Kp * R;
        int64_t n = g * R;
        int nr = (int)(N - n < R ? N - n : R);
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            int mb = (int)(M - m0 < MB ? M - m0 : MB);
            const float *xm = xf + m0 * Kp;
            switch (mb) { /* constant row counts: the accumulators stay in registers */
#if MB >= 4
            case 4: group_dot(xm, Kp, 4, wg, acc); break;
            case 3: group_dot(xm, Kp, 3, wg, acc); break;
#endif
#if MB >= 2
            case 2: group_dot(xm, Kp, 2, wg, acc); break;
#endif
            default: group_dot(xm, Kp, 1, wg, acc); break;
            }
            for (int m = 0; m < mb; m++)
                for (int r = 0; r < nr; r++) {
                    float v = acc[m * R + r] * scale[n + r] + (bias ? bias[n + r] : 0.f);
                    int64_t i = (m0 + m) * N + n + r;
                    if (y_bf16)
                        ((uint16_t *)y)[i] = f32_to_bf16(v);
                    else
                        ((float *)y)[i] = v;
                }
        }
    }
}

/* w: packed as above for (N, K). Returns 0, or -1 when a buffer could not be allocated. */
int tandem_int8_linear(const void *x, int x_bf16, int64_t M, int64_t K, const int8_t *w, int64_t N,
                       const float *scale, const float *bias, void *y, int num_threads) {
    int64_t Kp = (K + KB - 1) / KB * KB;
    /* the input rows in fp32, zero-padded to Kp (a few KB) */
    float *xf = (float *)aligned_alloc(64, (size_t)((M * Kp * sizeof(float) + 63) / 64 * 64));
    if (!xf) return -1;
    for (int64_t m = 0; m < M; m++) {
        float *row = xf + m * Kp;
        if (x_bf16)
            for (int64_t k = 0; k < K; k++) row[k] = bf16_to_f32(((const uint16_t *)x)[m * K + k]);
        else
            memcpy(row, (const float *)x + m * K, (size_t)K * sizeof(float));
        for (int64_t k = K; k < Kp; k++) row[k] = 0.f;
    }
    int64_t groups = (N + R - 1) / R;
    int nt = num_threads;
    if (nt > groups) nt = (int)groups;
    if (N * Kp < (1 << 16)) nt = 1; /* not worth waking a thread */
    if (nt <= 1) {
        run_groups(xf, M, Kp, w, N, scale, bias, y, x_bf16, 0, groups);
    } else {
#pragma omp parallel num_threads(nt)
        {
            int t = omp_get_thread_num(), T = omp_get_num_threads();
            run_groups(xf, M, Kp, w, N, scale, bias, y, x_bf16, groups * t / T, groups * (t + 1) / T);
        }
    }
    free(xf);
    return 0;
}
