/* y = x W^T (* scale) + b for a few rows of x: the projections of a decode step at
 * low batch, where every weight byte is read once per step and the GEMM is bound by
 * memory bandwidth, not arithmetic. Weights are bf16, or int8 with one float32 scale
 * per output channel (weight-only quantization, as torch's _weight_int8pack_mm).
 *
 * Why not torch: on CPUs without AVX-512 bf16 (e.g. AMD Zen 3) oneDNN's bf16 GEMM at
 * 1-4 rows reads ~11 GB/s, and _weight_int8pack_mm with float32 activations is slower
 * than the float32 GEMM it replaces (benchmarks/NOTES.md, change 15).
 *
 * Order of work, and why: threads split the output channels N in blocks of 4; a
 * block's weight rows (<= 4 x 1536 elements) stay in L1 while every activation row
 * passes, so the weights stream from memory once per call however many rows there
 * are. Each weight vector is converted to float32 once per 8 elements and multiplied
 * into several rows while in a register. Every output (m, n) is one sequential
 * fused-multiply-add chain over k in 8 lanes, then the lanes summed in a fixed order:
 * the same operations whatever M, the row's position, the tile it falls in and the
 * thread count, so the kernel is batch-invariant by construction. The software
 * prefetch may point past the end of w for the last blocks: a prefetch never faults.
 *
 * With bf16 activations on a CPU with AVX-512 BF16 (e.g. AMD Zen 4, Intel Sapphire Rapids)
 * the dot products are vdpbf16ps instead: 32 bf16 pairs per instruction, products exact in
 * float32 (int8 weights are exact in bf16 too), accumulated in float32, the K tail through
 * masked loads (zeros add nothing). Per call it runs 2-4x as fast as the AVX2 path, whose
 * conversions and 8-lane FMAs bound it by arithmetic from a few rows on (benchmarks/NOTES.md,
 * change 17). It is still
 * one fixed chain per output, so still batch-invariant; its results differ from the AVX2
 * path's in the last bits (fused pairs; denormals flushed), so a CPU gives its own bits.
 *
 * Layout: x [M, K] float32 or bf16 (row stride ldx elements), w [N, K] row-major,
 * scale [N] float32 (int8 only), bias [N] float32 or NULL, y [M, N] float32 or bf16
 * contiguous. K is any size (a scalar tail after the last multiple of 8).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { W_BF16 = 0, W_INT8 = 1 };

#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 8
#endif

#ifdef __AVX2__
static inline __m256 load_w8(const void *w, int wtype, int64_t i) {
    if (wtype == W_INT8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + i))));
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i))), 16));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline float load_w1(const void *w, int wtype, int64_t i) {
    return wtype == W_INT8 ? (float)((const int8_t *)w)[i] : bf16_to_f32(((const uint16_t *)w)[i]);
}

/* out[j][c] = dot(x row j, weight row n0 + c) for j < R rows, c < C channels: R * C
 * independent FMA chains (one chain alone waits on the FMA latency). Called with
 * constant R and C, so after inlining the accumulators live in registers. */
static inline __attribute__((always_inline)) void dot_tile(const float *x, int64_t ldx, const void *w, int wtype,
                                                          int64_t n0, int K, const int R, const int C,
                                                          float out[4][4]) {
    int k = 0;
    for (int j = 0; j < R; j++)
        for (int c = 0; c < C; c++) out[j][c] = 0.0f;
#ifdef __AVX2__
    __m256 acc[4][4];
    for (int j = 0; j < R; j++)
        for (int c = 0; c < C; c++) acc[j][c] = _mm256_setzero_ps();
    /* Software prefetch, one sequential stream: while this tile's C rows are read, the C rows
     * PREFETCH_ROWS further on are touched C * 8 elements per step, which covers them once. A
     * row at a time the hardware prefetchers saw C short streams and the int8 GEMM ran at 4.6
     * GB/s over the model's weights (NOTES change 15); with this, 15.9 GB/s. */
    const int64_t esize = wtype == W_INT8 ? 1 : 2;
    const char *pf = (const char *)w + (n0 + PREFETCH_ROWS) * K * esize;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[4];
        _mm_prefetch(pf + (int64_t)k * C * esize, _MM_HINT_T0);
        for (int c = 0; c < C; c++) wv[c] = load_w8(w, wtype, (n0 + c) * K + k);
        for (int j = 0; j < R; j++) {
            const __m256 xv = _mm256_loadu_ps(x + j * ldx + k);
            for (int c = 0; c < C; c++) acc[j][c] = _mm256_fmadd_ps(wv[c], xv, acc[j][c]);
        }
    }
    for (int j = 0; j < R; j++)
        for (int c = 0; c < C; c++) out[j][c] = hsum(acc[j][c]);
#endif
    for (; k < K; k++)
        for (int c = 0; c < C; c++) {
            const float wk = load_w1(w, wtype, (n0 + c) * K + k);
            for (int j = 0; j < R; j++) out[j][c] += wk * x[j * ldx + k];
        }
}

/* y[m0 + j, n0 + c] = d[j][c] (* scale) + bias for j < R, c < C. */
static inline __attribute__((always_inline)) void store_tile(float d[4][4], int m0, int n0, const float *scale,
                                                            const float *bias, int wtype, void *y, int y_bf16,
                                                            int N, const int R, const int C) {
    for (int c = 0; c < C; c++) {
        const float s = wtype == W_INT8 ? scale[n0 + c] : 1.0f;
        const float b = bias ? bias[n0 + c] : 0.0f;
        for (int j = 0; j < R; j++) {
            const float v = d[j][c] * s + b;
            const size_t at = (size_t)(m0 + j) * N + n0 + c;
            if (y_bf16) ((uint16_t *)y)[at] = f32_to_bf16(v);
            else ((float *)y)[at] = v;
        }
    }
}

/* Rows [m0, m0 + R) x channels [n0, n0 + C) of y. */
static inline __attribute__((always_inline)) void y_tile(const float *x, int64_t ldx, int m0, int n0, int K,
                                                        const void *w, int wtype, const float *scale,
                                                        const float *bias, void *y, int y_bf16, int N,
                                                        const int R, const int C) {
    float d[4][4];
    dot_tile(x + (int64_t)m0 * ldx, ldx, w, wtype, n0, K, R, C, d);
    store_tile(d, m0, n0, scale, bias, wtype, y, y_bf16, N, R, C);
}

#define TILE(R, C) y_tile(xf, ldx, m0, n0, K, w, wtype, scale, bias, y, y_bf16, N, R, C)

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* 32 weights from element i on (n < 32: the first n, the rest zero) as bf16 pairs. */
static inline __m512bh load_w32(const void *w, int wtype, int64_t i, int n) {
    const __mmask32 m = n >= 32 ? 0xffffffffu : (1u << n) - 1u;
    if (wtype == W_INT8) {
        const __m256i b = _mm256_maskz_loadu_epi8(m, (const int8_t *)w + i);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
        return _mm512_cvtne2ps_pbh(hi, lo);   /* |q| <= 127: exact in bf16 */
    }
    return (__m512bh)_mm512_maskz_loadu_epi16(m, (const uint16_t *)w + i);
}

/* dot_tile's vdpbf16ps form: x is bf16 [R rows, stride ldx]. */
static inline __attribute__((always_inline)) void dot_tile_bf16(const uint16_t *x, int64_t ldx, const void *w,
                                                               int wtype, int64_t n0, int K, const int R,
                                                               const int C, float out[4][4]) {
    __m512 acc[4][4];
    for (int j = 0; j < R; j++)
        for (int c = 0; c < C; c++) acc[j][c] = _mm512_setzero_ps();
    const int64_t esize = wtype == W_INT8 ? 1 : 2;
    const char *pf = (const char *)w + (n0 + PREFETCH_ROWS) * K * esize;
    for (int k = 0; k < K; k += 32) {
        const int n = K - k < 32 ? K - k : 32;
        const __mmask32 m = n >= 32 ? 0xffffffffu : (1u << n) - 1u;
        __m512bh wv[4];
        /* As dot_tile's prefetch: this step reads C * 32 * esize bytes, so as many bytes of the
         * stream PREFETCH_ROWS rows on are touched, a cache line at a time. */
        for (int64_t b = 0; b < C * 32 * esize; b += 64) _mm_prefetch(pf + (int64_t)k * C * esize + b, _MM_HINT_T0);
        for (int c = 0; c < C; c++) wv[c] = load_w32(w, wtype, (n0 + c) * K + k, n);
        for (int j = 0; j < R; j++) {
            const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + j * ldx + k);
            for (int c = 0; c < C; c++) acc[j][c] = _mm512_dpbf16_ps(acc[j][c], wv[c], xv);
        }
    }
    for (int j = 0; j < R; j++)
        for (int c = 0; c < C; c++) out[j][c] = _mm512_reduce_add_ps(acc[j][c]);
}

#define TILE_BF16(R, C) do { float d_[4][4]; \
    dot_tile_bf16(xb + (int64_t)m0 * ldx, ldx, w, wtype, n0, K, R, C, d_); \
    store_tile(d_, m0, n0, scale, bias, wtype, y, y_bf16, N, R, C); } while (0)

#define DP 1
#else
#define DP 0
#define TILE_BF16(R, C) do { (void)n0; } while (0)   /* never run: dp is 0 */
#endif

/* One tile through the path this call takes (dp: vdpbf16ps on bf16 x). */
#define ANY_TILE(R, C) do { if (dp) TILE_BF16(R, C); else TILE(R, C); } while (0)

/* y = x W^T (* scale per channel for int8) + bias. x_bf16/y_bf16 select the activation
 * and output dtypes (else float32). Returns 0, or -1 if the float32 copy of a bf16 x
 * could not be allocated. */
int linear_rows(const void *x, int x_bf16, int64_t ldx, int M, int K, const void *w, int wtype,
                const float *scale, const float *bias, void *y, int y_bf16, int N, int nthreads) {
    const int dp = DP && x_bf16;
    const uint16_t *xb = (const uint16_t *)x;
    const float *xf = (const float *)x;
    float *tmp = NULL;
    if (x_bf16 && !dp) {
        tmp = (float *)malloc(sizeof(float) * (size_t)M * K);
        if (!tmp) return -1;
        for (int m = 0; m < M; m++)
            for (int k = 0; k < K; k++) tmp[(size_t)m * K + k] = bf16_to_f32(xb[m * ldx + k]);
        xf = tmp;
        ldx = K;
    }
    /* Blocks of 4 channels (a last block of 1-3 runs one channel at a time); within a
     * block, while >= 4 rows are left 4 rows x 2 channels (AVX2: 8 accumulators of 16
     * registers) or 4 x 4 (vdpbf16ps: 16 of 32), then 1-3 rows x 4 channels. */
    const int blocks = (N + 3) / 4;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int blk = 0; blk < blocks; blk++) {
        const int nb = blk * 4;
        if (nb + 4 > N) {
            for (int n0 = nb; n0 < N; n0++)
                for (int m0 = 0; m0 < M; m0++) ANY_TILE(1, 1);
            continue;
        }
        int m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) {
            if (dp) {
                const int n0 = nb;
                TILE_BF16(4, 4);
            } else {
                for (int n0 = nb; n0 < nb + 4; n0 += 2) TILE(4, 2);
            }
        }
        const int n0 = nb;
        switch (M - m0) {
            case 3: ANY_TILE(3, 4); break;
            case 2: ANY_TILE(2, 4); break;
            case 1: ANY_TILE(1, 4); break;
            default: break;
        }
    }
    free(tmp);
    return 0;
}
