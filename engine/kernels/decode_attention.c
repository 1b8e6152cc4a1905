/* Decode attention on a paged KV cache, for steps where every sequence adds one token (CPU):
 *
 *   for each sequence b: rotate its new q and k (RoPE, "rotate half"), write k and v into the cache
 *   slot (slot_blocks[b], slot_offsets[b]), then attend its query heads to its first lens[b] tokens
 *   through its block table.
 *
 * One call per layer replaces ~25 torch ops (rotary, cache writes, K/V gathers, re-layouts, SDPA).
 * Cache layout (engine/attention.py): [2][num_blocks][KVH][bs][D], K then V. Tensors are fp32 or bf16
 * (`bf16`), all contiguous but q/k/v, whose rows are `q_stride`/`kv_stride` elements apart (slices
 * of the fused qkv projection). Grouped-query attention: q head h reads kv head h / (H / KVH).
 *
 * Numerics: RoPE as torch computes it in the tensors' dtype (x * cos and rot(x) * sin each rounded,
 * then their sum rounded: bit for bit, so the cache holds what the torch path writes); scores, softmax
 * and the weighted sum of V in fp32, the output rounded once. Built with -ffp-contract=off so that no
 * product is fused into a sum behind our back. Written with GCC vector extensions: 16 floats a vector,
 * which the compiler maps to AVX-512, AVX2 or plain loops for the CPU at hand. On CPUs with AVX-512
 * bf16, bf16 caches with head sizes a multiple of 32 take `attend_bf16` (intrinsics: the bf16 dot
 * product for q . k, explicit fused multiply-adds for V): the same math within fp32 rounding of the
 * sums, 16-23% faster over a SmolLM2 step's 30 layers at 32 sequences (measured: 12.0 -> 10.1 ms with
 * the KV coming from memory, 9.2 -> 7.1 in cache).
 *
 * A quantized cache (`kv_fmt` KV_INT8 or KV_FP8, kvquant.h) has rows of D one-byte codes and an fp32
 * scale: the new k (rotated) and v are quantized into their slots bit for bit as torch quantizes them,
 * and `attend_quant` reads the codes, converting them to fp32 as it goes: scores are (q . codes) *
 * scale_k, the weights of V p * scale_v, so the same math as dequantizing first within fp32 rounding.
 */
#include <stdlib.h>
#include <omp.h>

#include "kvquant.h"
#include "vec.h"

#define MAX_G 16 /* query heads per KV head taken together (more: one at a time) */

static inline void prefetch_block(const char *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 3);
}

/* scores ph[0, L) -> exp(score - m), in place; returns their sum (ph has room for 16 more) */
static float softmax_row(float *ph, int64_t L, float m) {
    for (int64_t t = L; t < L + 16; t++) ph[t] = m; /* pad the last vector (zeroed below) */
    v16f sum = (v16f){0};
    for (int64_t t = 0; t < L; t += 16) {
        v16f x;
        memcpy(&x, ph + t, sizeof x);
        x = vexp(x - m);
        if (t + 16 > L)
            for (int i = (int)(L - t); i < 16; i++) x[i] = 0.f;
        memcpy(ph + t, &x, sizeof x);
        sum += x;
    }
    return hsum(sum);
}

/* One cached row (a token's K or V for one KV head) as nv vectors of 16 floats; returns the factor its
 * products take: 1 for a float cache (fmt < 0: fp32 or bf16 elements), the row's scale for a quantized
 * one (D codes and a scale, kvquant.h). */
static inline __attribute__((always_inline)) float load_row(const char *row, int64_t D, int64_t nv, int bf16,
                                                            int fmt, v16f *kv) {
    if (fmt < 0) {
        const size_t es = bf16 ? 2 : 4;
        for (int64_t j = 0; j < nv; j++) kv[j] = load16(row + j * 16 * es, bf16);
        return 1.f;
    }
    for (int64_t j = 0; j < nv; j++) kv[j] = kv_codes16((const uint8_t *)row + j * 16, fmt);
    return kv_row_scale((const uint8_t *)row, D);
}

/* query heads [h0, h0 + nh) of one sequence (all in KV group h0 / G) against its first L tokens, the
 * cache's rows as `fmt` says (a constant after inlining: float, or a quantized format); the activations
 * (q, out) fp32 or bf16 */
static inline __attribute__((always_inline)) void attend_rows(
    int64_t b, int64_t h0, int nh, const void *q, int64_t q_stride, const void *cos, const void *sin, const char *kc,
    const char *vc, int64_t bs, const int64_t *bt, int64_t L, int64_t KVH, int64_t G, int64_t D, float scale, int bf16,
    int fmt, char *out, int64_t H, float *p, int64_t lp) {
    const size_t es = bf16 ? 2 : 4;
    /* a row: D elements of es bytes, or D codes and a scale */
    const int64_t nv = D / 16, g = h0 / G, nblocks = (L + bs - 1) / bs;
    const int64_t rw = fmt < 0 ? D : D + KV_SCALE_BYTES;
    const size_t res = fmt < 0 ? es : 1;
    v16f qv[MAX_G][MAX_D / 16], o[MAX_G][MAX_D / 16], kv[MAX_D / 16];
    float m[MAX_G];
    for (int hh = 0; hh < nh; hh++) {
        rope((const char *)q + (b * q_stride + (h0 + hh) * D) * es, (const char *)cos + b * D * es,
             (const char *)sin + b * D * es, D, bf16, qv[hh]);
        m[hh] = -INFINITY;
    }
    /* scores, block by block (a block's tokens are a row apart) */
    const int64_t block_bytes = bs * rw * res;
    prefetch_block(kc + kv_row(bt[0], KVH, g, bs, 0, rw, res), block_bytes);
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const char *kb = kc + kv_row(bt[blk], KVH, g, bs, 0, rw, res);
        int64_t n = L - blk * bs < bs ? L - blk * bs : bs;
        /* blocks lie wherever the pool put them: fetch the next one while this one is worked on */
        prefetch_block(blk + 1 < nblocks ? kc + kv_row(bt[blk + 1], KVH, g, bs, 0, rw, res)
                                         : vc + kv_row(bt[0], KVH, g, bs, 0, rw, res), block_bytes);
        for (int64_t i = 0; i < n; i++) {
            const float ks = load_row(kb + i * rw * res, D, nv, bf16, fmt, kv) * scale;
            int64_t t = blk * bs + i;
            for (int hh = 0; hh < nh; hh++) {
                v16f acc = qv[hh][0] * kv[0];
                for (int64_t j = 1; j < nv; j++) acc += qv[hh][j] * kv[j];
                float s = hsum(acc) * ks;
                p[hh * lp + t] = s;
                if (s > m[hh]) m[hh] = s;
            }
        }
    }
    float total[MAX_G];
    for (int hh = 0; hh < nh; hh++) {
        total[hh] = softmax_row(p + hh * lp, L, m[hh]);
        for (int64_t j = 0; j < nv; j++) o[hh][j] = (v16f){0};
    }
    /* the weighted sum of V, each V row read once for the group */
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const char *vb = vc + kv_row(bt[blk], KVH, g, bs, 0, rw, res);
        int64_t n = L - blk * bs < bs ? L - blk * bs : bs;
        if (blk + 1 < nblocks) prefetch_block(vc + kv_row(bt[blk + 1], KVH, g, bs, 0, rw, res), block_bytes);
        for (int64_t i = 0; i < n; i++) {
            const float vs = load_row(vb + i * rw * res, D, nv, bf16, fmt, kv);
            int64_t t = blk * bs + i;
            for (int hh = 0; hh < nh; hh++) {
                v16f w = (v16f){0} + p[hh * lp + t] * vs;
                for (int64_t j = 0; j < nv; j++) o[hh][j] += w * kv[j];
            }
        }
    }
    for (int hh = 0; hh < nh; hh++) {
        char *op = out + (b * H + h0 + hh) * D * es;
        for (int64_t j = 0; j < nv; j++) store16(op + j * 16 * es, o[hh][j] / total[hh], bf16);
    }
}

static void attend(int64_t b, int64_t h0, int nh, const void *q, int64_t q_stride, const void *cos,
                   const void *sin, const char *kc, const char *vc, int64_t bs, const int64_t *bt, int64_t L,
                   int64_t KVH, int64_t G, int64_t D, float scale, int bf16, char *out, int64_t H, float *p,
                   int64_t lp) {
    attend_rows(b, h0, nh, q, q_stride, cos, sin, kc, vc, bs, bt, L, KVH, G, D, scale, bf16, -1, out, H, p, lp);
}

/* `attend` for a quantized cache (kvquant.h's formats) */
static void attend_quant(int64_t b, int64_t h0, int nh, const void *q, int64_t q_stride, const void *cos,
                         const void *sin, const char *kc, const char *vc, int64_t bs, const int64_t *bt, int64_t L,
                         int64_t KVH, int64_t G, int64_t D, float scale, int bf16, int fmt, char *out, int64_t H,
                         float *p, int64_t lp) {
    attend_rows(b, h0, nh, q, q_stride, cos, sin, kc, vc, bs, bt, L, KVH, G, D, scale, bf16, fmt, out, H, p, lp);
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_ATTEND_F32_AVX2 1

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* `attend` for fp32 caches on AVX2 (without AVX-512): GCC keeps 16-float vectors in halves spilled
 * through the stack there (store-forwarding stalls: ~250 cycles a token and head, 0.75 us a token for
 * SmolLM2's 9 heads); native 8-float vectors and explicit fused multiply-adds instead, ~10x faster.
 * The same math within fp32 rounding (products fused into the sums). */
static void attend_f32_avx2(int64_t b, int64_t h0, int nh, const void *q, int64_t q_stride, const void *cos,
                            const void *sin, const char *kc, const char *vc, int64_t bs, const int64_t *bt,
                            int64_t L, int64_t KVH, int64_t G, int64_t D, float scale, char *out, int64_t H,
                            float *p, int64_t lp) {
    const int64_t g = h0 / G, nblocks = (L + bs - 1) / bs;
    float qf[MAX_G][MAX_D] __attribute__((aligned(32)));
    float m[MAX_G];
    for (int hh = 0; hh < nh; hh++) {
        v16f r[MAX_D / 16];
        rope((const char *)q + (b * q_stride + (h0 + hh) * D) * 4, (const char *)cos + b * D * 4,
             (const char *)sin + b * D * 4, D, 0, r);
        memcpy(qf[hh], r, (size_t)D * 4);
        m[hh] = -INFINITY;
    }
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const float *kb = (const float *)(kc + kv_row(bt[blk], KVH, g, bs, 0, D, 4));
        int64_t n = L - blk * bs < bs ? L - blk * bs : bs;
        /* the next K block, and this block's V (the V pass below then reads L2, not memory) */
        if (blk + 1 < nblocks) prefetch_block(kc + kv_row(bt[blk + 1], KVH, g, bs, 0, D, 4), bs * D * 4);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) { /* 8 tokens a head at once: 8 sums reduced together, not one by one */
            const float *k = kb + i * D;
            for (int hh = 0; hh < nh; hh++) {
                __m256 a[8];
                for (int t = 0; t < 8; t++) a[t] = _mm256_setzero_ps();
                for (int64_t j = 0; j < D; j += 8) {
                    const __m256 qj = _mm256_load_ps(qf[hh] + j);
                    for (int t = 0; t < 8; t++) a[t] = _mm256_fmadd_ps(qj, _mm256_loadu_ps(k + t * D + j), a[t]);
                }
                /* r[t] = sum of a[t]'s lanes: pairs, then quads, then the two halves */
                const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
                const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
                const __m256 r = _mm256_mul_ps(_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                                             _mm256_permute2f128_ps(u0, u1, 0x31)),
                                               _mm256_set1_ps(scale));
                float *ph = p + hh * lp + blk * bs + i;
                _mm256_storeu_ps(ph, r);
                for (int t = 0; t < 8; t++)
                    if (ph[t] > m[hh]) m[hh] = ph[t];
            }
        }
        for (; i < n; i++) {
            const float *k = kb + i * D;
            for (int hh = 0; hh < nh; hh++) {
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                for (int64_t j = 0; j < D; j += 16) {
                    a0 = _mm256_fmadd_ps(_mm256_load_ps(qf[hh] + j), _mm256_loadu_ps(k + j), a0);
                    a1 = _mm256_fmadd_ps(_mm256_load_ps(qf[hh] + j + 8), _mm256_loadu_ps(k + j + 8), a1);
                }
                float sc = hsum8(_mm256_add_ps(a0, a1)) * scale;
                p[hh * lp + blk * bs + i] = sc;
                if (sc > m[hh]) m[hh] = sc;
            }
        }
    }
    for (int hh = 0; hh < nh; hh++) {
        const float total = softmax_row(p + hh * lp, L, m[hh]);
        float *op = (float *)out + (b * H + h0 + hh) * D;
        /* the weighted sum of V, 64 columns at a time in 8 accumulators */
        for (int64_t d0 = 0; d0 < D; d0 += 64) {
            const int nv = (int)((D - d0 < 64 ? D - d0 : 64) / 8);
            __m256 acc[8];
            for (int j = 0; j < nv; j++) acc[j] = _mm256_setzero_ps();
            for (int64_t blk = 0; blk < nblocks; blk++) {
                const float *vb = (const float *)(vc + kv_row(bt[blk], KVH, g, bs, 0, D, 4)) + d0;
                int64_t n = L - blk * bs < bs ? L - blk * bs : bs;
                const float *ph = p + hh * lp + blk * bs;
                for (int64_t i = 0; i < n; i++) {
                    __m256 w = _mm256_set1_ps(ph[i]);
                    for (int j = 0; j < nv; j++) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vb + i * D + 8 * j), acc[j]);
                }
            }
            /* o / total, as the generic path divides */
            for (int j = 0; j < nv; j++) _mm256_storeu_ps(op + d0 + 8 * j, _mm256_div_ps(acc[j], _mm256_set1_ps(total)));
        }
    }
}

#if defined(__F16C__)
#define HAVE_ATTEND_QUANT_AVX2 1

/* 8 codes -> their values (not yet scaled), as kv_codes16 converts them. fp8 by way of fp16: e4m3's
 * bits moved into an fp16's (the exponent field lands 8 below e4m3's bias, subnormals included: fp16's
 * are exact, and F16C converts them whatever the denormal modes), converted, times 2^8. */
static inline __m256 codes8(const uint8_t *p, int fmt) {
    const __m128i raw = _mm_loadl_epi64((const __m128i *)p);
    if (fmt == KV_INT8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
    const __m128i c = _mm_cvtepu8_epi16(raw);
    const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x80)), 8),
                                   _mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x7f)), 7));
    return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));
}

/* `attend_quant` on AVX2 (without AVX-512), for the reason `attend_f32_avx2` exists: native 8-float
 * vectors and fused multiply-adds; the activations fp32 or bf16. A K row's codes are converted once for
 * the group's heads; V's rows 16 at a time into fp32 values (code * scale, as torch dequantizes), once
 * for the group, then summed into each head's output. */
static void attend_quant_avx2(int64_t b, int64_t h0, int nh, const void *q, int64_t q_stride, const void *cos,
                              const void *sin, const char *kc, const char *vc, int64_t bs, const int64_t *bt,
                              int64_t L, int64_t KVH, int64_t G, int64_t D, float scale, int bf16, int fmt, char *out,
                              int64_t H, float *p, int64_t lp) {
    const size_t es = bf16 ? 2 : 4;
    const int64_t g = h0 / G, nblocks = (L + bs - 1) / bs, rb = D + KV_SCALE_BYTES, nv = D / 8;
    float qf[MAX_G][MAX_D] __attribute__((aligned(32)));
    float m[MAX_G];
    for (int hh = 0; hh < nh; hh++) {
        v16f r[MAX_D / 16];
        rope((const char *)q + (b * q_stride + (h0 + hh) * D) * es, (const char *)cos + b * D * es,
             (const char *)sin + b * D * es, D, bf16, r);
        memcpy(qf[hh], r, (size_t)D * 4);
        m[hh] = -INFINITY;
    }
    __m256 kf[MAX_D / 8];
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const uint8_t *kb = (const uint8_t *)kc + kv_row(bt[blk], KVH, g, bs, 0, rb, 1);
        int64_t n = L - blk * bs < bs ? L - blk * bs : bs;
        prefetch_block(blk + 1 < nblocks ? kc + kv_row(bt[blk + 1], KVH, g, bs, 0, rb, 1)
                                         : vc + kv_row(bt[0], KVH, g, bs, 0, rb, 1), bs * rb);
        for (int64_t i = 0; i < n; i++) {
            const uint8_t *row = kb + i * rb;
            for (int64_t j = 0; j < nv; j++) kf[j] = codes8(row + 8 * j, fmt);
            const float ks = kv_row_scale(row, D) * scale;
            for (int hh = 0; hh < nh; hh++) {
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                for (int64_t j = 0; j < nv; j += 2) {
                    a0 = _mm256_fmadd_ps(_mm256_load_ps(qf[hh] + 8 * j), kf[j], a0);
                    a1 = _mm256_fmadd_ps(_mm256_load_ps(qf[hh] + 8 * j + 8), kf[j + 1], a1);
                }
                float sc = hsum8(_mm256_add_ps(a0, a1)) * ks;
                p[hh * lp + blk * bs + i] = sc;
                if (sc > m[hh]) m[hh] = sc;
            }
        }
    }
    float total[MAX_G];
    float o[MAX_G][MAX_D] __attribute__((aligned(32)));
    for (int hh = 0; hh < nh; hh++) {
        total[hh] = softmax_row(p + hh * lp, L, m[hh]);
        memset(o[hh], 0, (size_t)D * 4);
    }
    float vf[16][MAX_D] __attribute__((aligned(32)));
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const uint8_t *vb = (const uint8_t *)vc + kv_row(bt[blk], KVH, g, bs, 0, rb, 1);
        int64_t n = L - blk * bs < bs ? L - blk * bs : bs;
        if (blk + 1 < nblocks) prefetch_block(vc + kv_row(bt[blk + 1], KVH, g, bs, 0, rb, 1), bs * rb);
        for (int64_t i0 = 0; i0 < n; i0 += 16) {
            const int c = n - i0 < 16 ? (int)(n - i0) : 16;
            for (int i = 0; i < c; i++) {
                const uint8_t *row = vb + (i0 + i) * rb;
                const __m256 sv = _mm256_set1_ps(kv_row_scale(row, D));
                for (int64_t j = 0; j < nv; j++) _mm256_store_ps(vf[i] + 8 * j, _mm256_mul_ps(codes8(row + 8 * j, fmt), sv));
            }
            for (int hh = 0; hh < nh; hh++) {
                const float *ph = p + hh * lp + blk * bs + i0;
                /* 64 columns at a time in 8 accumulators */
                for (int64_t d0 = 0; d0 < D; d0 += 64) {
                    const int nc = (int)((D - d0 < 64 ? D - d0 : 64) / 8);
                    __m256 acc[8];
                    for (int j = 0; j < nc; j++) acc[j] = _mm256_load_ps(o[hh] + d0 + 8 * j);
                    for (int i = 0; i < c; i++) {
                        const __m256 w = _mm256_set1_ps(ph[i]);
                        for (int j = 0; j < nc; j++) acc[j] = _mm256_fmadd_ps(w, _mm256_load_ps(vf[i] + d0 + 8 * j), acc[j]);
                    }
                    for (int j = 0; j < nc; j++) _mm256_store_ps(o[hh] + d0 + 8 * j, acc[j]);
                }
            }
        }
    }
    for (int hh = 0; hh < nh; hh++) {
        char *op = out + (b * H + h0 + hh) * D * es;
        for (int64_t j = 0; j < D / 16; j++) {
            v16f x;
            memcpy(&x, o[hh] + 16 * j, sizeof x);
            store16(op + j * 16 * es, x / total[hh], bf16); /* o / total, as the generic path divides */
        }
    }
}
#endif
#endif

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define HAVE_ATTEND_BF16 1

/* hsum of 16 vectors at once: lane t of the result is hsum(a[t]), the same sums in the same order
 * (halves, then quarters, ...), with lanes of two vectors paired at each step: 15 vector adds in all */
static inline v16f hsum16(const v16f a[16]) {
    const __m512i lo1 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                  hi1 = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31),
                  lo2 = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
                  hi2 = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31),
                  lo3 = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29),
                  hi3 = _mm512_setr_epi32(2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31),
                  lo4 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                  hi4 = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#define PAIR(x, y, lo, hi) _mm512_add_ps(_mm512_permutex2var_ps(x, lo, y), _mm512_permutex2var_ps(x, hi, y))
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++) b[i] = PAIR((__m512)a[2 * i], (__m512)a[2 * i + 1], lo1, hi1);
    for (int i = 0; i < 4; i++) c[i] = PAIR(b[2 * i], b[2 * i + 1], lo2, hi2);
    for (int i = 0; i < 2; i++) d[i] = PAIR(c[2 * i], c[2 * i + 1], lo3, hi3);
    return (v16f)PAIR(d[0], d[1], lo4, hi4);
#undef PAIR
}

/* `attend` for bf16 caches and head sizes a multiple of 32, on CPUs with AVX-512 bf16: q . k with
 * the bf16 dot-product instruction (products exact, summed in fp32 pairwise: the query is bf16 already,
 * as RoPE rounds it), 16 tokens' sums reduced together (hsum16), and V summed with fused multiply-adds.
 * The same math as `attend` within fp32 rounding of the sums. */
static inline __attribute__((always_inline)) void attend_bf16_k(
    const int64_t nw, int64_t b, int64_t h0, int nh, const void *q, int64_t q_stride, const void *cos,
    const void *sin, const char *kc, const char *vc, int64_t bs, const int64_t *bt, int64_t L, int64_t KVH,
    int64_t G, float scale, char *out, int64_t H, float *p, int64_t lp) {
    const int64_t D = nw * 32, nv = nw * 2, g = h0 / G, nblocks = (L + bs - 1) / bs;
    const int64_t row_bytes = D * 2, block_bytes = bs * row_bytes;
    __m512bh qb[MAX_G][MAX_D / 32];
    v16f o[MAX_G][MAX_D / 16];
    float m[MAX_G];
    for (int hh = 0; hh < nh; hh++) {
        v16f qv[MAX_D / 16];
        rope((const char *)q + (b * q_stride + (h0 + hh) * D) * 2, (const char *)cos + b * D * 2,
             (const char *)sin + b * D * 2, D, 1, qv);
        for (int64_t w = 0; w < nw; w++) qb[hh][w] = _mm512_cvtne2ps_pbh((__m512)qv[2 * w + 1], (__m512)qv[2 * w]);
        m[hh] = -INFINITY;
    }
    /* two blocks ahead: K's, then (as K runs out) V's first ones */
    for (int64_t i = 0; i < 2 && i < nblocks; i++) prefetch_block(kc + kv_row(bt[i], KVH, g, bs, 0, D, 2), block_bytes);
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const char *kb = kc + kv_row(bt[blk], KVH, g, bs, 0, D, 2);
        int64_t n = L - blk * bs < bs ? L - blk * bs : bs;
        const int64_t ahead = blk + 2;
        if (ahead < nblocks)
            prefetch_block(kc + kv_row(bt[ahead], KVH, g, bs, 0, D, 2), block_bytes);
        else if (ahead - nblocks < nblocks) /* bt has nblocks entries of this sequence's, maybe no more */
            prefetch_block(vc + kv_row(bt[ahead - nblocks], KVH, g, bs, 0, D, 2), block_bytes);
        for (int hh = 0; hh < nh; hh++) {
            float *ph = p + hh * lp + blk * bs;
            for (int64_t i0 = 0; i0 < n; i0 += 16) {
                const int c = n - i0 < 16 ? (int)(n - i0) : 16;
                v16f acc[16];
                for (int i = 0; i < c; i++) {
                    const char *row = kb + (i0 + i) * row_bytes;
                    __m512 a = _mm512_setzero_ps();
                    for (int64_t w = 0; w < nw; w++)
                        a = _mm512_dpbf16_ps(a, qb[hh][w], (__m512bh)_mm512_loadu_si512(row + w * 64));
                    acc[i] = (v16f)a;
                }
                for (int i = c; i < 16; i++) acc[i] = (v16f){0};
                /* lanes past n land where later blocks, or the padding below, overwrite them */
                v16f sc = hsum16(acc) * scale;
                memcpy(ph + i0, &sc, sizeof sc);
                for (int i = 0; i < c; i++)
                    if (sc[i] > m[hh]) m[hh] = sc[i];
            }
        }
    }
    float total[MAX_G];
    for (int hh = 0; hh < nh; hh++) {
        total[hh] = softmax_row(p + hh * lp, L, m[hh]);
        for (int64_t j = 0; j < nv; j++) o[hh][j] = (v16f){0};
    }
    /* V: 16 rows at a time into fp32 (once for all heads), then each head's sum in registers */
    __m512 vf[16][MAX_D / 16];
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const char *vb = vc + kv_row(bt[blk], KVH, g, bs, 0, D, 2);
        int64_t n = L - blk * bs < bs ? L - blk * bs : bs;
        if (blk + 2 < nblocks) prefetch_block(vc + kv_row(bt[blk + 2], KVH, g, bs, 0, D, 2), block_bytes);
        for (int64_t i0 = 0; i0 < n; i0 += 16) {
            const int c = n - i0 < 16 ? (int)(n - i0) : 16;
            for (int i = 0; i < c; i++)
                for (int64_t j = 0; j < nv; j++)
                    vf[i][j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                        _mm256_loadu_si256((const __m256i *)(vb + (i0 + i) * row_bytes + j * 32))), 16));
            for (int hh = 0; hh < nh; hh++) {
                __m512 acc[MAX_D / 16];
                for (int64_t j = 0; j < nv; j++) acc[j] = (__m512)o[hh][j];
                const float *ph = p + hh * lp + blk * bs + i0;
                for (int i = 0; i < c; i++) {
                    __m512 w = _mm512_set1_ps(ph[i]);
                    for (int64_t j = 0; j < nv; j++) acc[j] = _mm512_fmadd_ps(w, vf[i][j], acc[j]);
                }
                for (int64_t j = 0; j < nv; j++) o[hh][j] = (v16f)acc[j];
            }
        }
    }
    for (int hh = 0; hh < nh; hh++) {
        char *op = out + (b * H + h0 + hh) * D * 2;
        for (int64_t j = 0; j < nv; j++) store16(op + j * 32, o[hh][j] / total[hh], 1);
    }
}

/* head sizes 64 and 128 get copies of their own, with the loops over a row's vectors unrolled */
static void attend_bf16(int64_t b, int64_t h0, int nh, const void *q, int64_t q_stride, const void *cos,
                        const void *sin, const char *kc, const char *vc, int64_t bs, const int64_t *bt, int64_t L,
                        int64_t KVH, int64_t G, int64_t D, float scale, char *out, int64_t H, float *p, int64_t lp) {
#define ATTEND(nw) attend_bf16_k(nw, b, h0, nh, q, q_stride, cos, sin, kc, vc, bs, bt, L, KVH, G, scale, out, H, p, lp)
    if (D == 64)
        ATTEND(2);
    else if (D == 128)
        ATTEND(4);
    else
        ATTEND(D / 32);
#undef ATTEND
}
#endif

int tandem_decode_attention_max_head_dim(void) { return MAX_D; }

/* kv_fmt: KV_FLOAT (the cache in the activations' dtype), KV_INT8 or KV_FP8 (kvquant.h). Returns 0; -1
 * when a buffer could not be allocated; -2 for a head size or format it does not take. */
int tandem_decode_attention(const void *q, const void *k, const void *v, int64_t q_stride, int64_t kv_stride,
                            const void *cos, const void *sin, void *cache, int64_t num_blocks, int64_t bs,
                            const int64_t *slot_blocks, const int64_t *slot_offsets, const int64_t *block_tables,
                            int64_t nb, const int64_t *lens, int64_t B, int64_t H, int64_t KVH, int64_t D,
                            float scale, int bf16, int kv_fmt, void *out, int num_threads) {
    if (D % 16 || D > MAX_D || H % KVH || kv_fmt < KV_FLOAT || kv_fmt > KV_FP8) return -2;
    const size_t es = bf16 ? 2 : 4;
    const int64_t nv = D / 16, G = H / KVH;
    const int64_t rb = kv_fmt ? D + KV_SCALE_BYTES : D * (int64_t)es; /* bytes of a cache row */
    char *kc = (char *)cache, *vc = (char *)cache + (size_t)num_blocks * KVH * bs * rb;
    int64_t max_len = 0, work = 0;
    for (int64_t b = 0; b < B; b++) {
        if (lens[b] > max_len) max_len = lens[b];
        work += lens[b];
    }
    work *= H * D;
    int nt = work < 32768 ? 1 : num_threads;
    /* heads per task: a whole KV group reads each K/V row once for all its query heads; one head per
     * task where there would be fewer tasks than ~2 per thread */
    const int64_t hb = (G > MAX_G || B * KVH < 2 * nt) ? 1 : G;
    int failed = 0;
#pragma omp parallel num_threads(nt)
    {
        /* 1. the new tokens' K (rotated) and V into their slots */
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            for (int64_t g = 0; g < KVH; g++) {
                size_t slot = kv_row(slot_blocks[b], KVH, g, bs, slot_offsets[b], rb, 1);
                v16f kr[MAX_D / 16];
                rope((const char *)k + (b * kv_stride + g * D) * es, (const char *)cos + b * D * es,
                     (const char *)sin + b * D * es, D, bf16, kr);
                const char *vrow = (const char *)v + (b * kv_stride + g * D) * es;
                if (kv_fmt) { /* the rotated k as torch rounds it (bf16: rope's bf16 values), then quantized */
                    v16f vr[MAX_D / 16];
                    for (int64_t j = 0; j < nv; j++) vr[j] = load16(vrow + j * 16 * es, bf16);
                    kv_quantize_row((const float *)kr, D, kv_fmt, (uint8_t *)kc + slot);
                    kv_quantize_row((const float *)vr, D, kv_fmt, (uint8_t *)vc + slot);
                    continue;
                }
                for (int64_t j = 0; j < nv; j++) store16(kc + slot + j * 16 * es, kr[j], bf16);
                memcpy(vc + slot, vrow, D * es);
            }
        }
        /* 2. one task: a sequence's query heads [h0, h0 + nh) of one KV head (all G of them when
         * there are enough tasks to keep the threads busy, else one each) */
        float *p = (float *)malloc((size_t)hb * ((size_t)max_len + 16) * sizeof(float));
        if (!p) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * (H / hb); task++) {
            if (!p) continue;
            const int64_t b = task / (H / hb), h0 = task % (H / hb) * hb;
            const int64_t *bt = block_tables + b * nb;
            if (kv_fmt) {
#ifdef HAVE_ATTEND_QUANT_AVX2
                attend_quant_avx2(b, h0, (int)hb, q, q_stride, cos, sin, kc, vc, bs, bt, lens[b], KVH, G, D, scale,
                                  bf16, kv_fmt, (char *)out, H, p, max_len + 16);
#else
                attend_quant(b, h0, (int)hb, q, q_stride, cos, sin, kc, vc, bs, bt, lens[b], KVH, G, D, scale, bf16,
                             kv_fmt, (char *)out, H, p, max_len + 16);
#endif
                continue;
            }
#ifdef HAVE_ATTEND_BF16
            if (bf16 && D % 32 == 0) {
                attend_bf16(b, h0, (int)hb, q, q_stride, cos, sin, kc, vc, bs, bt, lens[b], KVH, G, D, scale,
                            (char *)out, H, p, max_len + 16);
                continue;
            }
#endif
#ifdef HAVE_ATTEND_F32_AVX2
            if (!bf16) {
                attend_f32_avx2(b, h0, (int)hb, q, q_stride, cos, sin, kc, vc, bs, bt, lens[b], KVH, G, D, scale,
                                (char *)out, H, p, max_len + 16);
                continue;
            }
#endif
            attend(b, h0, (int)hb, q, q_stride, cos, sin, kc, vc, bs, bt, lens[b], KVH, G, D, scale, bf16,
                   (char *)out, H, p, max_len + 16);
        }
        free(p);
    }
    return failed ? -1 : 0;
}
