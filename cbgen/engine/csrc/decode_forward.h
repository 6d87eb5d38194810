/* decode_forward.c's structs and prototype, the one statement of its C interface:
 * decode_forward.py's ctypes Structures mirror them field for field (same order, same
 * types), and tests/test_decode_forward.py checks the sizes agree (decode_forward_sizes). */
#ifndef CBGEN_DECODE_FORWARD_H
#define CBGEN_DECODE_FORWARD_H
#include <stdint.h>

#include "greedy_head.h"

/* One projection y = x W^T (* scale) + bias, as linear_rows.c takes it. */
typedef struct {
    const void *w;          /* [N, K] bf16 or int8 */
    const float *scale;     /* [N] float32 for int8, else NULL */
    const float *bias;      /* [N] float32 or NULL */
    int64_t wtype;          /* 0 bf16, 1 int8 (linear_rows.c) */
    int64_t N, K;
} dec_proj;

typedef struct {
    const uint16_t *in_norm, *post_norm;    /* [hidden] bf16 RMSNorm weights */
    dec_proj qkv, o, gate_up, down;         /* qkv: [(H + 2 KVH) D, hidden]; gate_up: [2I, hidden] */
    int64_t window;                         /* 0: full attention; W > 0: sliding window */
} dec_layer;

/* Shapes of the step and the model. */
typedef struct {
    int64_t T, hidden, H, KVH, D, I, L, block_size, table_stride, nkeep, vocab, nthreads;
    float scale, eps;
} dec_dims;

void decode_forward_sizes(int64_t *out);   /* sizeof dec_proj, dec_layer, dec_dims */

int decode_forward(const dec_layer *layers, uint16_t *const *kv, const dec_dims *dims, uint16_t *h,
                   const uint16_t *cos, const uint16_t *sin, const int64_t *write_blocks,
                   const int64_t *write_offsets, const int32_t *tables, const int32_t *lens,
                   const int64_t *keep, const uint16_t *final_norm, const dec_proj *head, uint16_t *logits);

/* num_steps greedy steps: decode_forward's arguments with cos/sin [num_steps, T, D] and
 * write_blocks/offsets [num_steps, T]; embed [vocab, hidden] bf16; tokens [num_steps, T];
 * g: the head's greedy_head, or NULL for the head projection and argmax_rows_bf16. */
int decode_steps(const dec_layer *layers, uint16_t *const *kv, const dec_dims *dims, uint16_t *h,
                 const uint16_t *cos, const uint16_t *sin, const int64_t *write_blocks,
                 const int64_t *write_offsets, const int32_t *tables, int32_t *lens, const int64_t *keep,
                 const uint16_t *final_norm, const dec_proj *head, uint16_t *logits, const uint16_t *embed,
                 int64_t num_steps, int64_t *tokens, greedy_head *g);
#endif
