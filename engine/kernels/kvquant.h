/* Quantized KV cache rows (engine/kv_quant.py), shared by the kernels that write or read them
 * (included, not compiled alone). A row is one (token, KV head) vector: D one-byte codes, then its
 * fp32 scale (D + 4 bytes). Quantization is bit for bit torch's (`engine.kv_quant.quantize`):
 *
 *   int8:      scale = amax / 127, code = x / scale rounded to the nearest integer, ties to even
 *   fp8_e4m3:  scale = amax / 448, code = x / scale clamped to +-448, to float8_e4m3fn the way
 *              c10 converts (nearest, ties to even)
 *
 * and a code reads back as code * scale (fp32). */
#ifndef TANDEM_KVQUANT_H
#define TANDEM_KVQUANT_H
#include <stdint.h>
#include <string.h>

#include "vec.h"

#define KV_FLOAT 0 /* the cache holds the activations' dtype */
#define KV_INT8 1
#define KV_FP8 2
#define KV_SCALE_BYTES 4

static inline float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* fp32 -> float8_e4m3fn, nearest with ties to even, for |x| <= 448 (the caller clamps) */
static inline uint8_t fp8_e4m3_from_f32(float x) {
    uint32_t u = f32_bits(x);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint8_t code;
    if (u < (121u << 23)) {
        /* below 2^-6, e4m3's smallest normal: 2^14's fp32 ulp is 2^-9, e4m3's subnormal step, so adding
         * 2^14 rounds x to that step (in the fp32 add itself) and leaves the code in the low bits */
        const float magic = f32_from_bits(141u << 23);
        code = (uint8_t)(f32_bits(f32_from_bits(u) + magic) - (141u << 23));
    } else {
        /* rebias the exponent (127 -> 7) and round the 20 dropped mantissa bits to nearest, ties to even */
        const uint32_t odd = (u >> 20) & 1u;
        u += ((uint32_t)(7 - 127) << 23) + 0x7ffffu + odd;
        code = (uint8_t)(u >> 20);
    }
    return code | (uint8_t)(sign >> 24);
}

/* float8_e4m3fn -> fp32, exactly (NaN's code 0x7f is never written: codes stay within +-448) */
static inline float fp8_e4m3_to_f32(uint8_t c) {
    const uint32_t e = (c >> 3) & 15u, m = c & 7u;
    float mag = e ? f32_from_bits(((e + 120u) << 23) | (m << 20)) : (float)m * 0x1p-9f;
    return (c & 0x80) ? -mag : mag;
}

/* x[0, D) -> one row at dst: D codes, then the scale */
static inline void kv_quantize_row(const float *x, int64_t D, int fmt, uint8_t *dst) {
    float amax = 0.f;
    for (int64_t i = 0; i < D; i++) {
        const float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
    }
    const float scale = amax / (fmt == KV_INT8 ? 127.0f : 448.0f);
    if (fmt == KV_INT8) {
        for (int64_t i = 0; i < D; i++) {
            float y = scale > 0.f ? x[i] / scale : 0.f;
            y = (y + 0x1.8p23f) - 0x1.8p23f; /* to the nearest integer, ties to even (|y| <= 127 + rounding) */
            y = y > 127.f ? 127.f : (y < -127.f ? -127.f : y);
            dst[i] = (uint8_t)(int8_t)y;
        }
    } else {
        for (int64_t i = 0; i < D; i++) {
            float y = scale > 0.f ? x[i] / scale : 0.f;
            y = y > 448.f ? 448.f : (y < -448.f ? -448.f : y);
            dst[i] = fp8_e4m3_from_f32(y);
        }
    }
    memcpy(dst + D, &scale, sizeof scale);
}

static inline float kv_row_scale(const uint8_t *row, int64_t D) {
    float s;
    memcpy(&s, row + D, sizeof s);
    return s;
}

/* 16 codes -> their values (not yet scaled) */
static inline v16f kv_codes16(const uint8_t *p, int fmt) {
    if (fmt == KV_INT8) {
        typedef int8_t v16c __attribute__((vector_size(16)));
        v16c c;
        memcpy(&c, p, sizeof c);
        return __builtin_convertvector(c, v16f);
    }
    /* fp8_e4m3_to_f32 on 16 lanes: normals by moving the bits into place, subnormals (exponent 0) as
     * m * 2^-9 (no fp32 subnormal in between, which a flush-to-zero mode would zero) */
    typedef uint8_t v16b __attribute__((vector_size(16)));
    v16b raw;
    memcpy(&raw, p, sizeof raw);
    const v16i c = __builtin_convertvector(raw, v16i), e = (c >> 3) & 15, m = c & 7;
    const v16i normal = ((e + 120) << 23) | (m << 20);
    const v16f sub = __builtin_convertvector(m, v16f) * 0x1p-9f;
    const v16i is_normal = e != 0; /* -1 or 0 per lane */
    const v16i bits = (is_normal & normal) | (~is_normal & (v16i)sub) | ((c & 0x80) << 24);
    v16f f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#endif
