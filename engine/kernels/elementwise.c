/* Elementwise steps of a forward pass, fused (CPU), one pass over memory each instead of torch's 3-5:
 *
 *   tandem_silu_mul: out = silu(gate) * up          (the SwiGLU MLP's activation)
 *   tandem_rope:     out = x * cos + rot(x) * sin    (RoPE, "rotate half", for every head of a row)
 *   tandem_write_kv: the new tokens' K and V into their cache slots (tandem_write_kv_quant: quantized,
 *                    kvquant.h)
 *   tandem_add_rms_norm: the residual add and the RMSNorm after it
 *
 * In the tensors' dtype as torch computes them: silu(gate) rounded, then the product rounded (bf16);
 * RoPE as in vec.h. Rows of the inputs may be strided (slices of a fused projection); outputs are
 * contiguous. silu uses vec.h's exp (~1 ulp in fp32, so an fp32 result may differ from torch's in its
 * last bit; after rounding to bf16 practically never).
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>

#include "kvquant.h"
#include "vec.h"

/* for (t = 0; t < T; t++) BODY, over nt threads; on the calling thread alone when nt is 1 (an OpenMP
 * region costs microseconds even for one thread: a decode step makes hundreds of these calls) */
#define FOR_ROWS(nt, t, T, ...)                                                                            \
    do {                                                                                                   \
        if ((nt) <= 1) {                                                                                   \
            for (int64_t t = 0; t < (T); t++) __VA_ARGS__                                                   \
        } else {                                                                                           \
            _Pragma("omp parallel for num_threads(nt) schedule(static)")                                   \
            for (int64_t t = 0; t < (T); t++) __VA_ARGS__                                                   \
        }                                                                                                  \
    } while (0)

static inline v16f silu16(v16f g) { /* g * sigmoid(g), with exp of -|g| only (no overflow) */
    v16f a = (v16f)((v16i)g & 0x7fffffff); /* |g| */
    v16f e = vexp((v16f){0} - a);           /* exp(-|g|) in (0, 1] */
    v16f r = 1.0f / (1.0f + e);             /* one division (the costly part) for both signs */
    v16i neg = (v16i)g >> 31; /* the sign bit (not g < 0: vec.h's to_bf16 says why); -0 gives -0 either way */
    /* g >= 0: g / (1 + exp(-g)); g < 0: g exp(g) / (1 + exp(g)) */
    return g * (v16f)((~neg & (v16i)r) | (neg & (v16i)(e * r)));
}

static inline __attribute__((always_inline)) void silu_mul_row(const char *g, const char *u, char *o, int64_t I,
                                                                const int bf16) {
    const size_t es = bf16 ? 2 : 4;
    for (int64_t j = 0; j < I; j += 16) {
        v16f s = silu16(load16(g + j * es, bf16));
        if (bf16) s = round_bf16(s);
        store16(o + j * es, s * load16(u + j * es, bf16), bf16);
    }
}

/* gate, up: [T, I] with row strides gs, us (elements); out: [T, I] contiguous. I % 16 == 0. */
int tandem_silu_mul(const void *gate, int64_t gs, const void *up, int64_t us, int64_t T, int64_t I, void *out,
                    int bf16, int num_threads) {
    if (I % 16) return -2;
    const size_t es = bf16 ? 2 : 4;
    int nt = T * I < 65536 ? 1 : num_threads;
    FOR_ROWS(nt, t, T, {
        const char *g = (const char *)gate + t * gs * es, *u = (const char *)up + t * us * es;
        char *o = (char *)out + t * I * es;
        if (bf16) /* the dtype as a constant: no per-vector branches */
            silu_mul_row(g, u, o, I, 1);
        else
            silu_mul_row(g, u, o, I, 0);
    });
    return 0;
}

/* x: [T, heads, D] with row stride xs (elements; heads contiguous within a row); cos, sin: [T, D]
 * contiguous; out: [T, heads, D] contiguous. D % 16 == 0, D <= MAX_D. */
int tandem_rope(const void *x, int64_t xs, int64_t T, int64_t heads, int64_t D, const void *cos, const void *sin,
                void *out, int bf16, int num_threads) {
    if (D % 16 || D > MAX_D) return -2;
    const size_t es = bf16 ? 2 : 4;
    int nt = T * heads * D < 65536 ? 1 : num_threads;
    FOR_ROWS(nt, t, T, {
        for (int64_t h = 0; h < heads; h++) {
            v16f r[MAX_D / 16];
            rope((const char *)x + (t * xs + h * D) * es, (const char *)cos + t * D * es,
                 (const char *)sin + t * D * es, D, bf16, r);
            char *o = (char *)out + (t * heads + h) * D * es;
            for (int64_t j = 0; j < D / 16; j++) store16(o + j * 16 * es, r[j], bf16);
        }
    });
    return 0;
}

/* The new tokens' K and V into their cache slots: k, v [T, KVH, D] with row strides ks, vs (elements;
 * heads contiguous in a row: k is a slice of the rotated q|k, v one of the fused projection), cache
 * [2][num_blocks][KVH][bs][D] contiguous, slot (block, offset) of token t in slot_blocks[t],
 * slot_offsets[t]. A copy (no arithmetic), rows = es * D bytes each. */
int tandem_write_kv(const void *k, int64_t ks, const void *v, int64_t vs, int64_t T, int64_t KVH, int64_t D,
                    void *cache, int64_t num_blocks, int64_t bs, const int64_t *slot_blocks,
                    const int64_t *slot_offsets, int64_t es, int num_threads) {
    char *kc = (char *)cache, *vc = (char *)cache + (size_t)num_blocks * KVH * bs * D * es;
    const size_t row = (size_t)D * es;
    int nt = T * KVH * D < 65536 ? 1 : num_threads;
    FOR_ROWS(nt, t, T, {
        for (int64_t h = 0; h < KVH; h++) {
            size_t slot = kv_row(slot_blocks[t], KVH, h, bs, slot_offsets[t], D, es);
            memcpy(kc + slot, (const char *)k + (t * ks + h * D) * es, row);
            memcpy(vc + slot, (const char *)v + (t * vs + h * D) * es, row);
        }
    });
    return 0;
}

/* tandem_write_kv into a quantized cache (kv_fmt KV_INT8 or KV_FP8): k, v fp32 or bf16 (`bf16`), each
 * (token, head) row quantized into its slot, D codes and the scale (kvquant.h: bit for bit torch's). */
int tandem_write_kv_quant(const void *k, int64_t ks, const void *v, int64_t vs, int64_t T, int64_t KVH, int64_t D,
                          void *cache, int64_t num_blocks, int64_t bs, const int64_t *slot_blocks,
                          const int64_t *slot_offsets, int bf16, int kv_fmt, int num_threads) {
    if (D % 16 || D > MAX_D || (kv_fmt != KV_INT8 && kv_fmt != KV_FP8)) return -2;
    const size_t es = bf16 ? 2 : 4;
    const int64_t rb = D + KV_SCALE_BYTES;
    uint8_t *kc = (uint8_t *)cache, *vc = (uint8_t *)cache + (size_t)num_blocks * KVH * bs * rb;
    int nt = T * KVH * D < 16384 ? 1 : num_threads;
    FOR_ROWS(nt, t, T, {
        for (int64_t h = 0; h < KVH; h++) {
            size_t slot = kv_row(slot_blocks[t], KVH, h, bs, slot_offsets[t], rb, 1);
            v16f x[MAX_D / 16];
            const char *kr = (const char *)k + (t * ks + h * D) * es, *vr = (const char *)v + (t * vs + h * D) * es;
            for (int64_t j = 0; j < D / 16; j++) x[j] = load16(kr + j * 16 * es, bf16);
            kv_quantize_row((const float *)x, D, kv_fmt, kc + slot);
            for (int64_t j = 0; j < D / 16; j++) x[j] = load16(vr + j * 16 * es, bf16);
            kv_quantize_row((const float *)x, D, kv_fmt, vc + slot);
        }
    });
    return 0;
}

/* RMSNorm with the residual add before it fused in, rounded as transformers rounds it:
 *
 *   x = h + a (rounded to the dtype; a may be NULL: x = h), written to x_out when a is given;
 *   bf16: out = w * bf16(x * rsqrt(mean(x * x) + eps)), the product rounded to bf16;
 *   fp32: out = (x * rsqrt(mean(x * x) + eps)) * w.
 *
 * h, a: [T, N] with row strides hs, as (elements); x_out, out: [T, N] contiguous; w: [N], all in the
 * same dtype. The sum of squares is in fp32 in this kernel's order (torch's cascade sums in its own), so
 * `out` may differ from torch's in the last bit of a rare element; x_out is torch's add bit for bit.
 * N % 16 == 0. */
static inline __attribute__((always_inline)) void add_rms_norm_row(const char *hr, const char *ar, char *xr,
                                                                   const char *w, int64_t N, float eps, char *orow,
                                                                   const int bf16) {
    const size_t es = bf16 ? 2 : 4;
    v16f acc = (v16f){0};
    for (int64_t j = 0; j < N; j += 16) {
        v16f x = load16(hr + j * es, bf16);
        if (ar) {
            x = x + load16(ar + j * es, bf16);
            if (bf16) x = round_bf16(x);
            store16(xr + j * es, x, bf16);
        }
        acc += x * x;
    }
    const float r = 1.0f / sqrtf(hsum(acc) / (float)N + eps);
    const char *src = ar ? xr : hr; /* x again: from the rounded sum just written, or the input */
    for (int64_t j = 0; j < N; j += 16) {
        v16f y = load16(src + j * es, bf16) * r;
        if (bf16) y = round_bf16(y);
        store16(orow + j * es, y * load16(w + j * es, bf16), bf16);
    }
}

int tandem_add_rms_norm(const void *h, int64_t hs, const void *a, int64_t as, void *x_out, const void *w,
                        int64_t T, int64_t N, float eps, void *out, int bf16, int num_threads) {
    if (N % 16 || N > 1 << 16) return -2;
    const size_t es = bf16 ? 2 : 4;
    int nt = T * N < 65536 ? 1 : num_threads;
    FOR_ROWS(nt, t, T, {
        const char *hr = (const char *)h + t * hs * es, *ar = a ? (const char *)a + t * as * es : 0;
        char *xr = a ? (char *)x_out + t * N * es : 0, *orow = (char *)out + t * N * es;
        if (bf16)
            add_rms_norm_row(hr, ar, xr, (const char *)w, N, eps, orow, 1);
        else
            add_rms_norm_row(hr, ar, xr, (const char *)w, N, eps, orow, 0);
    });
    return 0;
}
