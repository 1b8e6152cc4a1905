/* Vector helpers shared by the CPU kernels (included, not compiled alone): 16 floats a vector with
 * GCC vector extensions, which the compiler maps to AVX-512, AVX2 or plain loops for the CPU at
 * hand; bf16 <-> fp32 as torch converts; exp; RoPE in the tensors' dtype. */
#ifndef TANDEM_VEC_H
#define TANDEM_VEC_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_D 256 /* largest head size RoPE takes */

/* Byte offset of token `offset` of KV head `h` in cache block `block`, in one of the K or V halves of
 * a layer's cache laid out [2][num_blocks][KVH][bs][D] (engine/attention.py); es: element size. */
static inline size_t kv_row(int64_t block, int64_t KVH, int64_t h, int64_t bs, int64_t offset, int64_t D,
                            size_t es) {
    return ((size_t)(block * KVH + h) * bs + offset) * D * es;
}

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

static inline v16f from_bf16(v16h h);

static inline v16f load16(const void *p, int bf16) {
    v16f f;
    if (bf16) {
        v16h h;
        memcpy(&h, p, sizeof h);
        return from_bf16(h);
    }
    memcpy(&f, p, sizeof f);
    return f;
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
static inline v16h to_bf16(v16f f) { /* one instruction: round to nearest even (denormals flush to 0) */
    __m256bh h = _mm512_cvtneps_pbh((__m512)f);
    v16h r;
    memcpy(&r, &h, sizeof r);
    return r;
}
#else
static inline v16h to_bf16(v16f f) { /* to the nearest bf16, ties to even, NaN stays NaN (as torch) */
    v16u u;
    memcpy(&u, &f, sizeof u);
    /* |u| > inf's bits, as a mask from the sign of the difference: GCC 12 turns a compare of 64-byte
     * vectors into 16 scalar ones where the target's vectors are narrower (AVX2), a shift it does not */
    v16u nan = (v16u)((v16i)(0x7f800000u - (u & 0x7fffffffu)) >> 31);
    v16u r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    r = (nan & ((u >> 16) | 0x40u)) | (~nan & r);
    return __builtin_convertvector(r, v16h);
}
#endif

static inline v16f from_bf16(v16h h) {
    v16u u = __builtin_convertvector(h, v16u) << 16;
    v16f f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline v16f round_bf16(v16f f) { return from_bf16(to_bf16(f)); } /* rounded, kept in fp32 */

static inline void store16(void *p, v16f f, int bf16) {
    if (bf16) {
        v16h h = to_bf16(f);
        memcpy(p, &h, sizeof h);
    } else {
        memcpy(p, &f, sizeof f);
    }
}

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

static inline float hsum(v16f v) { /* a tree of halves: 3 vector adds and 3 scalar ones */
    v8f a, b;
    memcpy(&a, &v, sizeof a);
    memcpy(&b, (const char *)&v + sizeof a, sizeof b);
    a += b;
    v4f c, d;
    memcpy(&c, &a, sizeof c);
    memcpy(&d, (const char *)&a + sizeof c, sizeof d);
    c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* exp(x) for x <= 0 (Cephes' expf: range reduction by ln 2, a degree-6 polynomial; ~1 ulp), subnormal
 * results included (scaled by 2^(n + 25), a normal float, then by 2^-25: one rounding); 0 below -104,
 * where exp is under half the smallest subnormal */
static inline v16f vexp(v16f x) {
    const v16f lo = (v16f){0} - 104.0f;
    const v16i below = (v16i)(x - lo) >> 31; /* x < lo (the sign of x - lo; see to_bf16 for why not <) */
    x = (v16f)((below & (v16i)lo) | (~below & (v16i)x));
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    v16f t = x * 1.44269504088896341f + magic;
    v16f n = t - magic;
    v16f r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    v16f p = (v16f){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    v16i e = (__builtin_convertvector(n, v16i) + 127 + 25) << 23;
    v16f scale;
    memcpy(&scale, &e, sizeof scale);
    return (v16f)(~below & (v16i)(p * scale * 0x1p-25f));
}

/* x rotated (HF "rotate half"): out = x * cos + cat(-x2, x1) * sin, in the dtype's arithmetic */
static void rope(const void *x, const void *cos, const void *sin, int64_t D, int bf16, v16f *out) {
    const int64_t half = D / 2, nv = D / 16;
    const size_t es = bf16 ? 2 : 4;
    v16f xs[MAX_D / 16];
    for (int64_t j = 0; j < nv; j++) xs[j] = load16((const char *)x + j * 16 * es, bf16);
    for (int64_t j = 0; j < nv; j++) {
        /* rot = cat(-x[half:], x[:half]): element i of rot is -x[i + half] (i < half), else x[i - half] */
        v16f rot;
        if (half % 16 == 0) { /* whole vectors */
            int64_t hv = half / 16;
            rot = j < hv ? -xs[j + hv] : xs[j - hv];
        } else {
            for (int i = 0; i < 16; i++) {
                int64_t idx = j * 16 + i;
                const float *xf = (const float *)xs;
                rot[i] = idx < half ? -xf[idx + half] : xf[idx - half];
            }
        }
        v16f c = load16((const char *)cos + j * 16 * es, bf16), s = load16((const char *)sin + j * 16 * es, bf16);
        v16f a = xs[j] * c, b = rot * s;
        if (bf16) {
            a = round_bf16(a);
            b = round_bf16(b);
        }
        v16f y = a + b;
        out[j] = bf16 ? round_bf16(y) : y;
    }
}

#endif
