/* A whole decode step of a llama-family model in one call, for bf16 activations: per layer
 * residual add + RMSNorm, q/k/v projection, RoPE, the K/V write into the paged pool,
 * paged decode attention, o projection, add + norm, gate/up, SiLU * up, down; then the
 * final norm and the LM head at the kept rows.
 *
 * Why: at 1-4 sequences a step is ~240 small native calls from Python (~15-25 us each
 * through ctypes and torch allocation) around ~12 ms of weight streaming. Here each op is
 * the same C function the Python forward calls (linear_rows.c, fused_ops.c,
 * paged_decode.c), in the same order on the same values, so the result is bit-identical
 * to llama.py's forward on the same step (tests/test_decode_forward.py); only the calls
 * from Python and the torch temporaries are gone.
 *
 * Layouts: as llama.py and attention.py. h [T, hidden] is the embedded input; it is the
 * residual stream and is overwritten. cos/sin [T, D]. kv[2 l] is layer l's
 * K pool [num_blocks, KVH, D, block_size], kv[2 l + 1] its V pool [num_blocks *
 * block_size, KVH, D]. write_blocks/offsets [T]: where each row's K/V go. tables [T,
 * table_stride] int32, lens [T] int32: each row's decode context (paged_decode.c). keep
 * [nkeep] rows whose logits are written to logits [nkeep, vocab].
 * Returns 0, -1 for a shape the attention kernel refuses, -2 when memory runs out.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "decode_forward.h"
#include "greedy_head.h"
#include "paged_decode.h"

/* linear_rows.c and fused_ops.c, linked into the same library (native_build.py DEPS). */
int linear_rows(const void *x, int x_bf16, int64_t ldx, int M, int K, const void *w, int wtype,
                const float *scale, const float *bias, void *y, int y_bf16, int N, int nthreads);
void add_rmsnorm_bf16(uint16_t *h, const uint16_t *d, const uint16_t *w, uint16_t *out, int T, int n,
                      float eps, int nthreads);
void rope_qk_bf16(const uint16_t *qkv, int64_t row_stride, const uint16_t *cos, const uint16_t *sin,
                  uint16_t *q, uint16_t *k, int T, int H, int KVH, int D, int nthreads);
void silu_mul_bf16(const uint16_t *gu, int T, int I, uint16_t *out, int nthreads);
void kv_write_bf16(const uint16_t *k, int64_t k_stride, const uint16_t *v, int64_t v_stride, uint16_t *k_cache,
                   uint16_t *v_cache, const int64_t *write_blocks, const int64_t *write_offsets, int T, int KVH,
                   int D, int bs, int nthreads);
void argmax_rows_bf16(const uint16_t *x, int rows, int cols, int64_t *out, int nthreads);

static int proj(const dec_proj *p, const uint16_t *x, int64_t ldx, int M, uint16_t *y, int nthreads) {
    /* linear_rows fails only when it cannot allocate. */
    return linear_rows(x, 1, ldx, M, (int)p->K, p->w, (int)p->wtype, p->scale, p->bias, y, 1, (int)p->N, nthreads)
           ? -2 : 0;
}

/* The step up to the LM head: xk [nkeep, hidden] gets the final norm's output at the kept rows. */
static int forward_rows(const dec_layer *layers, uint16_t *const *kv, const dec_dims *d, uint16_t *h,
                        const uint16_t *cos, const uint16_t *sin, const int64_t *write_blocks,
                        const int64_t *write_offsets, const int32_t *tables, const int32_t *lens,
                        const int64_t *keep, const uint16_t *final_norm, uint16_t *xk) {
    const int T = (int)d->T, n = (int)d->hidden, H = (int)d->H, KVH = (int)d->KVH, D = (int)d->D;
    const int I = (int)d->I, bs = (int)d->block_size, nt = (int)d->nthreads;
    const int64_t qkv_n = (int64_t)(H + 2 * KVH) * D;
    /* One scratch allocation: x, qkv, q, k, attn, delta (o or down output), gu, act. */
    const size_t sizes[8] = {(size_t)T * n, (size_t)T * qkv_n, (size_t)T * H * D, (size_t)T * KVH * D,
                             (size_t)T * H * D, (size_t)T * n, (size_t)T * 2 * I, (size_t)T * I};
    size_t total = 0;
    for (int i = 0; i < 8; i++) total += sizes[i];
    uint16_t *buf = malloc(total * sizeof(uint16_t)), *p = buf, *s[8];
    if (!buf) return -2;
    for (int i = 0; i < 8; i++) { s[i] = p; p += sizes[i]; }
    uint16_t *x = s[0], *qkv = s[1], *q = s[2], *k = s[3], *attn = s[4], *delta = s[5], *gu = s[6], *act = s[7];
    int rc = 0;

    add_rmsnorm_bf16(h, NULL, layers[0].in_norm, x, T, n, d->eps, nt);
    for (int l = 0; l < d->L && !rc; l++) {
        const dec_layer *L = layers + l;
        uint16_t *kc = kv[2 * l], *vc = kv[2 * l + 1];
        if ((rc = proj(&L->qkv, x, n, T, qkv, nt))) break;
        rope_qk_bf16(qkv, qkv_n, cos, sin, q, k, T, H, KVH, D, nt);
        /* Write first: a query attends to its own token (attention.py attend). */
        kv_write_bf16(k, (int64_t)KVH * D, qkv + (size_t)(H + KVH) * D, qkv_n, kc, vc, write_blocks, write_offsets,
                      T, KVH, D, bs, nt);
        if ((rc = paged_decode_bf16(q, kc, vc, attn, tables, (int)d->table_stride, lens, (int)L->window, T,
                                    H, KVH, D, bs, d->scale, nt)))
            break;
        if ((rc = proj(&L->o, attn, H * D, T, delta, nt))) break;
        add_rmsnorm_bf16(h, delta, L->post_norm, x, T, n, d->eps, nt);
        if ((rc = proj(&L->gate_up, x, n, T, gu, nt))) break;
        silu_mul_bf16(gu, T, I, act, nt);
        if ((rc = proj(&L->down, act, I, T, delta, nt))) break;
        if (l + 1 < d->L) add_rmsnorm_bf16(h, delta, layers[l + 1].in_norm, x, T, n, d->eps, nt);
    }
    if (!rc && d->nkeep) {
        /* The last layer's residual add and the final norm, at the kept rows only (llama.py). */
        const int nk = (int)d->nkeep;
        uint16_t *hk = malloc(sizeof(uint16_t) * (size_t)nk * n * 2);
        if (!hk) rc = -2;
        else {
            uint16_t *dk = hk + (size_t)nk * n;
            for (int j = 0; j < nk; j++) {
                memcpy(hk + (size_t)j * n, h + keep[j] * n, sizeof(uint16_t) * n);
                memcpy(dk + (size_t)j * n, delta + keep[j] * n, sizeof(uint16_t) * n);
            }
            add_rmsnorm_bf16(hk, dk, final_norm, xk, nk, n, d->eps, nt);
            free(hk);
        }
    }
    free(buf);
    return rc;
}

int decode_forward(const dec_layer *layers, uint16_t *const *kv, const dec_dims *d, uint16_t *h,
                   const uint16_t *cos, const uint16_t *sin, const int64_t *write_blocks,
                   const int64_t *write_offsets, const int32_t *tables, const int32_t *lens,
                   const int64_t *keep, const uint16_t *final_norm, const dec_proj *head, uint16_t *logits) {
    uint16_t *xk = malloc(sizeof(uint16_t) * (size_t)(d->nkeep ? d->nkeep : 1) * d->hidden);
    if (!xk) return -2;
    int rc = forward_rows(layers, kv, d, h, cos, sin, write_blocks, write_offsets, tables, lens, keep,
                          final_norm, xk);
    if (!rc && d->nkeep) rc = proj(head, xk, d->hidden, (int)d->nkeep, logits, (int)d->nthreads);
    free(xk);
    return rc;
}

/* num_steps greedy decode steps of the same T rows (multi-step scheduling, vLLM's
 * --num-scheduler-steps): step s is decode_forward over every row (d->nkeep == T, keep =
 * 0..T-1) at cos/sin + s T D, write_blocks/offsets + s T, then tokens[s T + t] = the argmax
 * of row t's logits (argmax_rows_bf16, as the sampler's greedy path), whose embedding row
 * is the next step's input. With g (greedy_head.c) the argmax comes from g instead of the
 * head projection and logits: the same token, from about half the head's bytes; logits is
 * then unused. lens is advanced by one per step (it ends at lens + num_steps - 1). Each
 * step is the same calls on the same values as one step from Python followed by the
 * sampler's argmax and F.embedding (a copy of a row), so the tokens are bit-identical to
 * num_steps single steps (tests/test_multi_step.py). Returns as decode_forward. */
int decode_steps(const dec_layer *layers, uint16_t *const *kv, const dec_dims *d, uint16_t *h,
                 const uint16_t *cos, const uint16_t *sin, const int64_t *write_blocks,
                 const int64_t *write_offsets, const int32_t *tables, int32_t *lens, const int64_t *keep,
                 const uint16_t *final_norm, const dec_proj *head, uint16_t *logits, const uint16_t *embed,
                 int64_t num_steps, int64_t *tokens, greedy_head *g) {
    const int64_t T = d->T, n = d->hidden, D = d->D;
    const int nt = (int)d->nthreads;
    if (d->nkeep != T) return -1;
    uint16_t *xk = malloc(sizeof(uint16_t) * (size_t)T * n);
    if (!xk) return -2;
    int rc = 0;
    for (int64_t s = 0; s < num_steps && !rc; s++) {
        rc = forward_rows(layers, kv, d, h, cos + s * T * D, sin + s * T * D, write_blocks + s * T,
                          write_offsets + s * T, tables, lens, keep, final_norm, xk);
        if (rc) break;
        if (g) {
            rc = greedy_head_argmax(g, xk, n, (int)T, tokens + s * T, nt);
        } else if (!(rc = proj(head, xk, n, (int)T, logits, nt))) {
            argmax_rows_bf16(logits, (int)T, (int)d->vocab, tokens + s * T, nt);
        }
        if (rc || s + 1 == num_steps) break;
        for (int64_t t = 0; t < T; t++) {
            memcpy(h + t * n, embed + tokens[s * T + t] * n, sizeof(uint16_t) * n);
            lens[t] += 1;
        }
    }
    free(xk);
    return rc;
}

/* sizeof each struct of decode_forward.h, for the ctypes mirror's check. */
void decode_forward_sizes(int64_t *out) {
    out[0] = sizeof(dec_proj);
    out[1] = sizeof(dec_layer);
    out[2] = sizeof(dec_dims);
}
