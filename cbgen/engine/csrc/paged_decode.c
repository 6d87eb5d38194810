/* Paged decode attention: one query token per sequence, K/V read in place
 * from the block pool (no gather, no padding to the longest context).
 *
 * Layouts (row-major, contiguous):
 *   q, out   [nd, H, D]               one decode token per sequence
 *   k        [num_blocks, KVH, D, bs] keys, token-minor inside a block
 *   v        [num_blocks, bs, KVH, D] values, one row per slot
 *   tables   [nd, table_stride]       block ids of each sequence
 *   lens     [nd]                     context length including the new token
 * Position t of sequence i lives in block tables[i][t / bs], offset t % bs.
 * window: 0 for full causal attention; W > 0 for a sliding window: sequence i
 * attends to positions [max(0, lens[i] - W), lens[i]) (the query at position
 * q = lens[i] - 1 sees q - W < t <= q, as transformers' sliding_window_overlay),
 * and table entries of blocks wholly before that are never read.
 * Requirements (checked, -1 otherwise): D % 16 == 0, D <= 256, bs % 16 == 0,
 * H % KVH == 0, H / KVH <= 8, window >= 0. Prototypes: paged_decode.h.
 *
 * Why K is token-minor: q.K for 16 tokens is then D multiply-adds of a
 * broadcast q[d] with 16 contiguous keys, vectorised over tokens with no
 * horizontal sums. V rows are contiguous in D, so p[t] * V[t] vectorises
 * over D.
 *
 * Work item = (sequence, kv head): its G = H / KVH query heads share every
 * K and V load (GQA without repeating K/V). Scores and sums accumulate in
 * float32; softmax is exact up to expf rounding (max-subtracted, two passes).
 * Common (G, D) pairs get their own specialisation so the accumulators live
 * in registers.
 *
 * Memory: in the engine every layer's K/V comes from DRAM (the weights evict
 * it between layers) in 2 KB pieces scattered over the pool, and the loads
 * stalled on DRAM latency (16 GB/s of ~40). So items are dealt out
 * round-robin (schedule(static, 1)): a thread knows its next item and, while
 * it works on block b of this one, prefetches block b of the next one into
 * L2 and block b + 1 of this one into L1. 64 sequences x 258 tokens x 30
 * layers (bf16, 2 threads): 22.8 -> 15 ms; the in-L3 compute floor is ~9 ms.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "paged_decode.h"
#include "vexp.h"

typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

#define MAX_D 256
#define MAX_G 8

static inline v16f load16_bf16(const uint16_t *p) {
    v16h h;
    memcpy(&h, p, sizeof h);
    v16u u = __builtin_convertvector(h, v16u) << 16;
    v16f f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline v16f load16_f32(const float *p) {
    v16f f;
    memcpy(&f, p, sizeof f);
    return f;
}

static inline float f32_to_f32(float x) { return x; }

/* Prefetch block `blk` of kv head h: its K piece [D, bs] and its bs V rows. */
static inline void prefetch_block(const char *k, const char *v, int32_t blk, int h, int KVH, int D, int bs,
                                  size_t elem, int far) {
    const size_t kbytes = (size_t)D * bs * elem, row = (size_t)D * elem;
    const char *kp = k + ((size_t)blk * KVH + h) * kbytes;
    for (size_t o = 0; o < kbytes; o += 64) {
        if (far) __builtin_prefetch(kp + o, 0, 2); else __builtin_prefetch(kp + o, 0, 3);
    }
    for (int t = 0; t < bs; t++) {
        const char *vp = v + (((size_t)blk * bs + t) * KVH + h) * row;
        for (size_t o = 0; o < row; o += 64) {
            if (far) __builtin_prefetch(vp + o, 0, 2); else __builtin_prefetch(vp + o, 0, 3);
        }
    }
}


static inline v16f vmax(v16f a, v16f b) {
    const v16i m = a > b;
    return (v16f)((m & (v16i)a) | (~m & (v16i)b));
}


/* One (sequence i, kv head h) work item over positions [first, L) of its context: blocks
 * b0 = first / bs .. nb - 1 (whole blocks before the window are never read). s is scratch
 * for G * (nb - b0) * bs scores, indexed from block b0. next_tab / next_nb: the next item's
 * blocks from its own first one, to prefetch. */
#define DEFINE_ITEM(NAME, T, LOAD16, LOAD1, STORE1)                                             \
static inline __attribute__((always_inline)) void NAME(                                         \
    const int G, const int D, const T *q, const T *k, const T *v, T *out, const int32_t *tab,   \
    int first, int L, int H, int KVH, int bs, float scale, int i, int h, float *s,              \
    const int32_t *next_tab, int next_nb, int next_h)                                           \
{                                                                                               \
    const int nb = (L + bs - 1) / bs, b0 = first / bs, Lp = (nb - b0) * bs, nc = D / 16;        \
    const int lo = first - b0 * bs, hi = L - b0 * bs; /* the window in local slots */           \
    float qf[MAX_G][MAX_D];                                                                     \
    v16f acc[MAX_G][MAX_D / 16];                                                                \
    for (int g = 0; g < G; g++) {                                                               \
        const T *qp = q + ((size_t)i * H + (size_t)h * G + g) * D;                              \
        for (int d = 0; d < D; d++) qf[g][d] = LOAD1(qp[d]) * scale;                            \
        for (int c = 0; c < nc; c++) acc[g][c] = (v16f){0};                                     \
    }                                                                                           \
    for (int b = b0; b < nb; b++) {                                                             \
        const int lb = b - b0;                                                                  \
        const T *kb = k + ((size_t)tab[b] * KVH + h) * (size_t)D * bs;                          \
        if (b + 1 < nb)                                                                         \
            prefetch_block((const char *)k, (const char *)v, tab[b + 1], h, KVH, D, bs, sizeof(T), 0); \
        if (lb < next_nb)                                                                       \
            prefetch_block((const char *)k, (const char *)v, next_tab[lb], next_h, KVH, D, bs, sizeof(T), 1); \
        for (int j = 0; j < bs; j += 16) {                                                      \
            v16f s0[MAX_G], s1[MAX_G]; /* two chains per head: even / odd d */                  \
            for (int g = 0; g < G; g++) { s0[g] = (v16f){0}; s1[g] = (v16f){0}; }               \
            for (int d = 0; d < D; d += 2) {                                                    \
                const v16f k0 = LOAD16(kb + (size_t)d * bs + j);                                \
                const v16f k1 = LOAD16(kb + (size_t)(d + 1) * bs + j);                          \
                for (int g = 0; g < G; g++) {                                                   \
                    s0[g] += qf[g][d] * k0;                                                     \
                    s1[g] += qf[g][d + 1] * k1;                                                 \
                }                                                                               \
            }                                                                                   \
            for (int g = 0; g < G; g++) {                                                       \
                const v16f sum = s0[g] + s1[g];                                                 \
                memcpy(s + (size_t)g * Lp + (size_t)lb * bs + j, &sum, sizeof sum);             \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    float inv[MAX_G];                                                                           \
    for (int g = 0; g < G; g++) {                                                               \
        float *sg = s + (size_t)g * Lp;                                                         \
        /* Slots outside [lo, hi): before the window in its first block, unused in the last. */ \
        for (int t = 0; t < lo; t++) sg[t] = -INFINITY;                                         \
        for (int t = hi; t < Lp; t++) sg[t] = -INFINITY;                                        \
        v16f mv = (v16f){0} - INFINITY, zv = (v16f){0};                                         \
        for (int t = 0; t < Lp; t += 16) { v16f x; memcpy(&x, sg + t, 64); mv = vmax(mv, x); }  \
        float m = mv[0];                                                                        \
        for (int e = 1; e < 16; e++) m = mv[e] > m ? mv[e] : m;                                 \
        for (int t = 0; t < Lp; t += 16) {                                                      \
            v16f x;                                                                             \
            memcpy(&x, sg + t, 64);                                                             \
            x = exp16_nonpos(x - m);                                                            \
            memcpy(sg + t, &x, 64);                                                             \
            zv += x;                                                                            \
        }                                                                                       \
        float z = 0.f;                                                                          \
        for (int t = hi; t < Lp; t++) z -= sg[t]; /* drop the masked slots' ~1e-38 */           \
        for (int t = 0; t < lo; t++) z -= sg[t];                                                \
        for (int e = 0; e < 16; e++) z += zv[e];                                                \
        inv[g] = 1.f / z;                                                                       \
    }                                                                                           \
    for (int b = b0; b < nb; b++) {                                                             \
        const T *vb = v + ((size_t)tab[b] * bs * KVH + h) * D;                                  \
        const float *sb = s + (size_t)(b - b0) * bs;                                            \
        const int j0 = b == b0 ? lo : 0;                                                        \
        const int n = L - b * bs < bs ? L - b * bs : bs;                                        \
        for (int j = j0; j < n; j++) {                                                          \
            const T *vp = vb + (size_t)j * KVH * D;                                             \
            for (int c = 0; c < nc; c++) {                                                      \
                const v16f vr = LOAD16(vp + 16 * c);                                            \
                for (int g = 0; g < G; g++) acc[g][c] += sb[(size_t)g * Lp + j] * vr;          \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    for (int g = 0; g < G; g++) {                                                               \
        T *op = out + ((size_t)i * H + (size_t)h * G + g) * D;                                  \
        for (int c = 0; c < nc; c++)                                                            \
            for (int e = 0; e < 16; e++) op[16 * c + e] = STORE1(acc[g][c][e] * inv[g]);        \
    }                                                                                           \
}

#define CALL(G_, D_) ITEM(G_, D_, q, k, v, out, tab, first, lens[i], H, KVH, bs, scale, i, h, s, next_tab, next_nb, next_h)

/* The first position sequence i attends to: the last `window` of its L (window 0: all). */
static inline int window_start(int L, int window) { return window > 0 && L > window ? L - window : 0; }

#define DEFINE_KERNEL(NAME, ITEM, T)                                                            \
int NAME(const T *q, const T *k, const T *v, T *out, const int32_t *tables, int table_stride,  \
         const int32_t *lens, int window, int nd, int H, int KVH, int D, int bs, float scale,   \
         int nthreads)                                                                          \
{                                                                                               \
    if (D % 16 || D > MAX_D || bs % 16 || H % KVH || H / KVH > MAX_G || window < 0) return -1;  \
    const int G = H / KVH;                                                                      \
    int maxlen = 0;                                                                             \
    for (int i = 0; i < nd; i++) if (lens[i] > maxlen) maxlen = lens[i];                        \
    const size_t cap = (size_t)G * (size_t)(maxlen + bs);                                       \
    int failed = 0;                                                                             \
    _Pragma("omp parallel num_threads(nthreads)")                                               \
    {                                                                                           \
        float *s = malloc(sizeof(float) * cap);                                                 \
        if (!s) { _Pragma("omp atomic write") failed = 1; }                                     \
        const int stride = omp_get_num_threads(), n_items = nd * KVH;                          \
        _Pragma("omp for schedule(static, 1)")                                                  \
        for (int item = 0; item < n_items; item++) {                                            \
            if (!s) continue;                                                                   \
            const int i = item / KVH, h = item % KVH, next = item + stride;                     \
            const int32_t *tab = tables + (size_t)i * table_stride;                             \
            const int first = window_start(lens[i], window);                                    \
            const int32_t *next_tab = NULL;                                                     \
            int next_nb = 0;                                                                    \
            if (next < n_items) {                                                               \
                const int nl = lens[next / KVH], nb0 = window_start(nl, window) / bs;           \
                next_tab = tables + (size_t)(next / KVH) * table_stride + nb0;                  \
                next_nb = (nl + bs - 1) / bs - nb0;                                             \
            }                                                                                   \
            const int next_h = next % KVH;                                                      \
            if (G == 3 && D == 64) CALL(3, 64);                                                 \
            else if (G == 1 && D == 64) CALL(1, 64);                                            \
            else if (G == 4 && D == 64) CALL(4, 64);                                            \
            else if (G == 1 && D == 128) CALL(1, 128);                                          \
            else if (G == 2 && D == 128) CALL(2, 128);                                          \
            else if (G == 4 && D == 128) CALL(4, 128);                                          \
            else if (G == 8 && D == 128) CALL(8, 128);                                          \
            else if (G == 4 && D == 256) CALL(4, 256);                                          \
            else CALL(G, D);                                                                    \
        }                                                                                       \
        free(s);                                                                                \
    }                                                                                           \
    return failed ? -2 : 0;                                                                     \
}

DEFINE_ITEM(item_bf16, uint16_t, load16_bf16, bf16_to_f32, f32_to_bf16)
DEFINE_ITEM(item_f32, float, load16_f32, f32_to_f32, f32_to_f32)
#define ITEM item_bf16
DEFINE_KERNEL(paged_decode_bf16, item_bf16, uint16_t)
#undef ITEM
#define ITEM item_f32
DEFINE_KERNEL(paged_decode_f32, item_f32, float)
#undef ITEM
