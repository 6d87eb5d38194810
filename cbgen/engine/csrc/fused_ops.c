/* Native bf16 ops. Residual add + RMSNorm of a llama layer, one pass over [T, n]
 * instead of 9 torch ops (each of which reads and writes the whole activation
 * and pays ~3-5 us of dispatch): 31 -> 11 us at 64 x 576 on 2 threads.
 *
 * Rounding follows transformers' bf16 modules step for step: the residual sum
 * is rounded to bf16; RMSNorm works in float32 (x * rsqrt(mean(x^2) + eps)),
 * rounds to bf16, then multiplies by the bf16 weight and rounds again. What
 * can differ from torch is the last float32 bit of the mean (summation order)
 * and of rsqrt, so now and then one bf16 ulp.
 *
 * Layout: row-major, contiguous rows of n elements.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "vexp.h"

/* For each of the T rows: if d, h += d (rounded to bf16, written back to h);
 * then out = w * bf16(h * rsqrt(mean(h^2) + eps)). */
void add_rmsnorm_bf16(uint16_t *h, const uint16_t *d, const uint16_t *w, uint16_t *out,
                      int T, int n, float eps, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (T >= 16)
    for (int t = 0; t < T; t++) {
        uint16_t *hr = h + (size_t)t * n;
        uint16_t *o = out + (size_t)t * n;
        float ss = 0.0f;
        if (d) {
            const uint16_t *dr = d + (size_t)t * n;
            #pragma omp simd reduction(+:ss)
            for (int i = 0; i < n; i++) {
                const uint16_t s = f32_to_bf16(bf16_to_f32(hr[i]) + bf16_to_f32(dr[i]));
                hr[i] = s;
                const float x = bf16_to_f32(s);
                ss += x * x;
            }
        } else {
            #pragma omp simd reduction(+:ss)
            for (int i = 0; i < n; i++) {
                const float x = bf16_to_f32(hr[i]);
                ss += x * x;
            }
        }
        const float r = 1.0f / sqrtf(ss / (float)n + eps);
        #pragma omp simd
        for (int i = 0; i < n; i++)
            o[i] = f32_to_bf16(bf16_to_f32(w[i]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(hr[i]) * r)));
    }
}

/* out[r] = argmax of row r of x [rows, cols] (bf16), as torch.argmax on the float32
 * values: the first maximal index, or the first NaN's index when the row has one.
 * It fuses the float32 copy the sampler made of [rows, 49152] logits (~1.5 ms at 64
 * rows) into the scan. */
void argmax_rows_bf16(const uint16_t *x, int rows, int cols, int64_t *out, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (rows >= 4)
    for (int r = 0; r < rows; r++) {
        const uint16_t *row = x + (size_t)r * cols;
        float m = -INFINITY;
        int nans = 0;
        #pragma omp simd reduction(max:m) reduction(+:nans)
        for (int i = 0; i < cols; i++) {
            const float v = bf16_to_f32(row[i]);
            nans += v != v;
            m = v > m ? v : m;
        }
        int64_t at = 0;
        for (int i = 0; i < cols; i++) {
            const float v = bf16_to_f32(row[i]);
            if (nans ? v != v : v == m) { at = i; break; }
        }
        out[r] = at;
    }
}

/* RoPE on the q and k parts of the fused q/k/v projection, as transformers computes
 * it in bf16: out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), where
 * rotate_half(x) = [-x[D/2:], x[:D/2]]. Each product of two bf16 values is exact in
 * float32, so the result is bit-identical to the torch ops (~10 per layer).
 * qkv rows hold H query heads then KVH key heads (then values, untouched), each of D;
 * cos/sin are [T, D]; q is written as [T, H, D], k as [T, KVH, D]. */
void rope_qk_bf16(const uint16_t *qkv, int64_t row_stride, const uint16_t *cos, const uint16_t *sin,
                  uint16_t *q, uint16_t *k, int T, int H, int KVH, int D, int nthreads) {
    const int half = D / 2;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (T >= 16)
    for (int t = 0; t < T; t++) {
        const uint16_t *row = qkv + (size_t)t * row_stride, *c = cos + (size_t)t * D, *s = sin + (size_t)t * D;
        for (int h = 0; h < H + KVH; h++) {
            const uint16_t *x = row + (size_t)h * D;
            uint16_t *o = h < H ? q + ((size_t)t * H + h) * D : k + ((size_t)t * KVH + (h - H)) * D;
            #pragma omp simd
            for (int d = 0; d < D; d++) {
                const float rot = d < half ? -bf16_to_f32(x[d + half]) : bf16_to_f32(x[d - half]);
                const float a = bf16_to_f32(f32_to_bf16(bf16_to_f32(x[d]) * bf16_to_f32(c[d])));
                const float b = bf16_to_f32(f32_to_bf16(rot * bf16_to_f32(s[d])));
                o[d] = f32_to_bf16(a + b);
            }
        }
    }
}

/* The K/V write of a step into one layer's paged pool (attention.py's layout): token t's
 * keys k[t] [KVH, D] go to k_cache[write_blocks[t], :, :, write_offsets[t]] (token-minor:
 * element (g, e) at ((blk * KVH + g) * D + e) * bs + off) and its values v[t] [KVH, D] to
 * row blk * bs + off of v_cache [num_blocks * bs, KVH, D]. k and v rows are KVH * D
 * contiguous elements, k_stride / v_stride apart (v is a view into the q/k/v projection).
 * Slots are distinct per token, so rows are written in parallel. Replaces torch's
 * single-threaded index_put_ and index_copy_ (~0.17 ms a layer at 128 rows). */
void kv_write_bf16(const uint16_t *k, int64_t k_stride, const uint16_t *v, int64_t v_stride,
                   uint16_t *k_cache, uint16_t *v_cache, const int64_t *write_blocks,
                   const int64_t *write_offsets, int T, int KVH, int D, int bs, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (T >= 32)
    for (int t = 0; t < T; t++) {
        const int64_t blk = write_blocks[t], off = write_offsets[t];
        const uint16_t *ks = k + (size_t)t * k_stride;
        for (int g = 0; g < KVH; g++) {
            uint16_t *kd = k_cache + ((blk * KVH + g) * D) * bs + off;
            for (int e = 0; e < D; e++) kd[(int64_t)e * bs] = ks[(size_t)g * D + e];
        }
        memcpy(v_cache + (blk * bs + off) * KVH * D, v + (size_t)t * v_stride, sizeof(uint16_t) * KVH * D);
    }
}

/* 16 elements of out = bf16(bf16(silu(g)) * u), silu(g) = g * sigmoid(g) with
 * sigmoid(g) = 1 / (1 + e) for g >= 0 and e / (1 + e) below, e = exp(-|g|) (never overflows):
 * one division of the chosen numerator (a division per lane is the loop's costliest op). */
static inline void silu_mul16(const uint16_t *g, const uint16_t *u, uint16_t *out) {
    v16f x, y;
    for (int j = 0; j < 16; j++) { x[j] = bf16_to_f32(g[j]); y[j] = bf16_to_f32(u[j]); }
    const v16i neg = x < 0.0f;
    const v16f e = exp16_nonpos((v16f)((v16i)x | ((v16i){0} + INT32_MIN)));   /* -|x|: the sign bit set */
    const v16f num = (v16f)((neg & (v16i)e) | (~neg & (v16i)((v16f){0} + 1.0f)));
    const v16f sig = num / (1.0f + e);
    const v16f s = x * sig;
    for (int j = 0; j < 16; j++) out[j] = f32_to_bf16(bf16_to_f32(f32_to_bf16(s[j])) * y[j]);
}

/* The llama MLP's activation: gu [T, 2I] bf16 rows (gate in the first I columns, up in the
 * next I; row stride 2I), out [T, I] = bf16(bf16(silu(gate)) * up), rounded as torch's
 * F.silu(gate) * up in bf16. Every element goes through the same 16-lane code (a tail is
 * padded), so a value does not depend on its position, the row count or the thread count. */
void silu_mul_bf16(const uint16_t *gu, int T, int I, uint16_t *out, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if ((int64_t)T * I >= 65536)
    for (int t = 0; t < T; t++) {
        const uint16_t *g = gu + (size_t)t * 2 * I, *u = g + I;
        uint16_t *o = out + (size_t)t * I;
        int i = 0;
        for (; i + 16 <= I; i += 16) silu_mul16(g + i, u + i, o + i);
        if (i < I) {
            uint16_t gt[16] = {0}, ut[16] = {0}, ot[16];
            memcpy(gt, g + i, (size_t)(I - i) * 2);
            memcpy(ut, u + i, (size_t)(I - i) * 2);
            silu_mul16(gt, ut, ot);
            memcpy(o + i, ot, (size_t)(I - i) * 2);
        }
    }
}
