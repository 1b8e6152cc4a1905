/* A decode step's decoder layers in one call (CPU, fp32 activations, GGUF weights, one TP rank, an fp32
 * or quantized KV cache):
 *
 *   for each layer: x = RMSNorm(h); qkv = x Wqkv; o = attention(RoPE(q), RoPE(k), v) over the paged
 *   cache (the new k, v written into it); h += o Wo; x = RMSNorm(h); h += (silu(x Wg) * (x Wu)) Wd
 *
 * for B sequences that each add one token. The same kernels as the layer-by-layer path (this file
 * includes their sources: gguf_linear.c, decode_attention.c, elementwise.c), in the same order, so
 * the same numbers; what it saves is the ~15 Python-level calls a layer costs there (~10 ms of a 35 ms
 * SmolLM2 step on 2 cores). Built once per x86 level, like gguf_linear.c.
 */
#include "gguf_linear.c"
#include "decode_attention.c"
#include "elementwise.c"

#define MAX_SEGMENTS 4

/* a projection's weight: runs of output rows, each of one ggml type */
typedef struct {
    int32_t n;    /* segments */
    int32_t int8; /* activations rounded to int8 (tandem_gguf_linear_q8) where the type has that path */
    int32_t type[MAX_SEGMENTS];
    int64_t offset[MAX_SEGMENTS], rows[MAX_SEGMENTS];
    const uint8_t *data[MAX_SEGMENTS];
} tandem_weight;

typedef struct {
    const float *input_norm, *post_norm; /* [hidden] */
    tandem_weight qkv, o, gate_up, down;
    void *kv_cache; /* [2][num_blocks][KVH][bs][D] fp32, or rows of D + 4 bytes quantized (kvquant.h) */
} tandem_layer;

typedef struct {
    int64_t hidden, inter, heads, kv_heads, head_dim, num_blocks, block_size;
    float eps, scale;
    int32_t kv_fmt; /* KV_FLOAT, KV_INT8, KV_FP8 */
} tandem_shape;

static int project(const tandem_weight *w, const float *x, int64_t M, int64_t K, float *y, int64_t N, int nt) {
    for (int s = 0; s < w->n; s++) {
        const int q8 = w->int8 && tandem_gguf_q8_takes(w->type[s]);
        int rc = (q8 ? tandem_gguf_linear_q8 : tandem_gguf_linear)(w->type[s], x, M, K, K, w->data[s], w->rows[s],
                                                                  y + w->offset[s], N, nt);
        if (rc) return rc;
    }
    return 0;
}

/* h: [B, hidden] fp32, updated in place through layers [0, n). cos, sin: [B, D]; slots, block tables
 * and lengths as tandem_decode_attention takes them. Returns 0; -1 out of memory; -2 a shape or type
 * it does not take. */
int tandem_decode_step(const tandem_layer *layers, int n, const tandem_shape *s, float *h, int64_t B,
                       const float *cos, const float *sin, const int64_t *slot_blocks, const int64_t *slot_offsets,
                       const int64_t *block_tables, int64_t nb, const int64_t *lens, int num_threads) {
    const int64_t E = s->hidden, I = s->inter, H = s->heads, KVH = s->kv_heads, D = s->head_dim;
    const int64_t qkv_n = (H + 2 * KVH) * D;
    float *x = (float *)malloc(sizeof(float) * (size_t)B * (size_t)(E + qkv_n + H * D + 3 * I + E));
    if (!x) return -1;
    float *qkv = x + B * E, *att = qkv + B * qkv_n, *gu = att + B * H * D, *act = gu + B * 2 * I,
          *tmp = act + B * I;
    int rc = 0;
    for (int l = 0; l < n && !rc; l++) {
        const tandem_layer *L = &layers[l];
        tandem_add_rms_norm(h, E, NULL, 0, NULL, L->input_norm, B, E, s->eps, x, 0, num_threads);
        if ((rc = project(&L->qkv, x, B, E, qkv, qkv_n, num_threads))) break;
        rc = tandem_decode_attention(qkv, qkv + H * D, qkv + (H + KVH) * D, qkv_n, qkv_n, cos, sin, L->kv_cache,
                                     s->num_blocks, s->block_size, slot_blocks, slot_offsets, block_tables, nb, lens,
                                     B, H, KVH, D, s->scale, 0, s->kv_fmt, att, num_threads);
        if (rc || (rc = project(&L->o, att, B, H * D, tmp, E, num_threads))) break;
        /* h += o; x = RMSNorm(h) (the add written back into h) */
        tandem_add_rms_norm(tmp, E, h, E, h, L->post_norm, B, E, s->eps, x, 0, num_threads);
        if ((rc = project(&L->gate_up, x, B, E, gu, 2 * I, num_threads))) break;
        if ((rc = tandem_silu_mul(gu, 2 * I, gu + I, 2 * I, B, I, act, 0, num_threads))) break;
        if ((rc = project(&L->down, act, B, I, tmp, E, num_threads))) break;
        for (int64_t i = 0; i < B * E; i++) h[i] += tmp[i];
    }
    free(x);
    return rc;
}
