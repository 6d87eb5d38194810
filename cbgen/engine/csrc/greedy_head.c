/* The exact greedy token of a bf16 LM head from half its bytes: an int8 proxy of the head
 * bounds every logit, and only the rows the bounds cannot rule out are computed in bf16.
 *
 * Why: at a few sequences a decode step streams every weight once, and SmolLM2-135M's tied
 * head is 57 MB of its 269 (21%). A greedy step needs only the argmax. The int8 proxy (one
 * scale per row, greedy_head.py) is half the bytes; with a bound on its error the argmax is
 * still exact: the same token as the full bf16 head and argmax_rows_bf16, bit for bit.
 *
 * The bound, per row x (bf16, K values) and head row n (w_n bf16, proxy q_n * scale_n):
 *   r_n = linear_rows' float32 dot of x and w_n (what the full head computes, then rounds to
 *         bf16: the logit t_n = bf16(r_n));
 *   p_n = linear_rows' float32 dot of x and q_n, times scale_n (the proxy).
 * |r_n - p_n| <= ||x||_2 * slack_n, where slack_n (greedy_head.py, inflated for its own rounding)
 * is ||w_n - q_n scale_n||_2 (Cauchy-Schwarz on the quantization error) plus the float32
 * rounding of both dot products, 4 (K + 1) 2^-24 (||w_n||_2 + ||q_n scale_n||_2) (the
 * standard bound for a chain of K float32 multiply-adds of exact products, Higham, Accuracy
 * and Stability of Numerical Algorithms, 2nd ed., section 3.1, doubled). ||x||_2 is summed
 * in double. The float32 arithmetic below adds relative slack 2^-20, far above its rounding.
 * Rounding to bf16 is monotone, so bf16(r_n) lies in [bf16(p_n - e_n), bf16(p_n + e_n)]. With
 * B the largest lower end, a row whose upper end is below B is smaller than some other row's
 * logit, so it is neither the maximum nor tied with it: it is dropped. The others (the
 * candidates) are computed by linear_rows from their bf16 rows, which gives each output the
 * same bits as the whole head (linear_rows.c: one fixed chain per output, whatever its
 * tile), and the first maximal one in index order is the token.
 *
 * A row with a non-finite ||x||_2 or proxy value, a NaN logit among the candidates, or more
 * than max_candidates candidates takes the whole bf16 head and argmax_rows_bf16 instead.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "greedy_head.h"

/* linear_rows.c and fused_ops.c, linked into the same library (native_build.py DEPS). */
int linear_rows(const void *x, int x_bf16, int64_t ldx, int M, int K, const void *w, int wtype,
                const float *scale, const float *bias, void *y, int y_bf16, int N, int nthreads);
void argmax_rows_bf16(const uint16_t *x, int rows, int cols, int64_t *out, int nthreads);

int64_t greedy_head_size(void) { return sizeof(greedy_head); }

int64_t greedy_head_scratch_bytes(const greedy_head *g, int64_t T) {
    const int64_t rows_cap = (g->max_candidates + 4) & ~(int64_t)3;
    return (int64_t)(sizeof(float) * T * g->N + sizeof(int64_t) * (g->max_candidates + 1)
                     + sizeof(uint16_t) * (rows_cap * g->K + rows_cap + g->N + g->K));
}

/* The largest float32 f such that every float below f rounds (to nearest even) to a bf16 below
 * b, for a finite bf16 value b: the midpoint between b and the bf16 value next below it (exact
 * in float32). A float at the midpoint itself may round to b; one below it cannot. */
static float below_bf16(float b) {
    uint32_t u;
    memcpy(&u, &b, 4);
    const uint16_t h = (uint16_t)(u >> 16);
    const uint16_t prev = (h & 0x7fffu) == 0 ? 0x8001u          /* +-0: the smallest negative */
                        : (h & 0x8000u) ? (uint16_t)(h + 1)     /* negative: larger magnitude */
                        : (uint16_t)(h - 1);
    return (bf16_to_f32(prev) + b) * 0.5f;
}

/* The whole head at row x, as decode_forward's head projection and the sampler's argmax. */
static int full_row(const greedy_head *g, const uint16_t *x, uint16_t *logits, int64_t *out, int nthreads) {
    if (linear_rows(x, 1, g->K, 1, (int)g->K, g->w, 0, NULL, NULL, logits, 1, (int)g->N, nthreads)) return -2;
    argmax_rows_bf16(logits, 1, (int)g->N, out, 1);
    return 0;
}

/* The candidates of row x given its proxy logits p (overwritten with their upper ends), into
 * cand (at most max_candidates + 1 written); returns their count, or -1 when some value is not
 * finite. Both passes are plain float loops (vectorised): the lower ends' maximum, rounded to
 * bf16, is B = max_n bf16(lo_n) (rounding is monotone); a row with bf16(hi_n) < B is one with
 * hi_n below below_bf16(B). */
static int64_t candidates(const greedy_head *g, float *p, float nx, int64_t *cand) {
    const int64_t N = g->N, cap = g->max_candidates;
    const float rel = 0x1p-20f, a = nx * (1.f + rel);
    const float *slack = g->slack;
    float maxlo = -INFINITY, nonfinite = 0.f;
    for (int64_t n = 0; n < N; n++) {
        const float e = a * slack[n] + fabsf(p[n]) * rel + 1e-30f;
        const float lo = p[n] - e;
        maxlo = lo > maxlo ? lo : maxlo;
        nonfinite += p[n] - p[n];              /* 0, or NaN for an infinite or NaN value */
        p[n] += e;
    }
    if (nonfinite != 0.f || !isfinite(maxlo)) return -1;
    const float thr = below_bf16(bf16_to_f32(f32_to_bf16(maxlo)));
    int64_t c = 0;
    for (int64_t n0 = 0; n0 < N && c <= cap; n0 += 64) {
        const int64_t n1 = n0 + 64 < N ? n0 + 64 : N;
        int any = 0;
        for (int64_t n = n0; n < n1; n++) any |= p[n] >= thr;
        if (!any) continue;
        for (int64_t n = n0; n < n1 && c <= cap; n++)
            if (p[n] >= thr) cand[c++] = n;
    }
    return c;
}

int greedy_head_argmax(greedy_head *g, const uint16_t *x, int64_t ldx, int T, int64_t *out, int nthreads) {
    const int64_t N = g->N, K = g->K, cap = g->max_candidates;
    const int64_t rows_cap = (cap + 4) & ~(int64_t)3;   /* candidates padded to whole blocks of 4 */
    /* g->scratch when it is large enough (its pages stay mapped between calls: a fresh
     * allocation this size is a new mapping, and its first touches cost ~0.1 ms a call). */
    const size_t need = greedy_head_scratch_bytes(g, T);
    char *mem = need <= (size_t)g->scratch_bytes ? g->scratch : malloc(need);
    int rc = -2;
    if (!mem) return rc;
    float *p = (float *)mem;
    int64_t *cand = (int64_t *)(p + (size_t)T * N);
    uint16_t *rows = (uint16_t *)(cand + cap + 1);
    uint16_t *y = rows + rows_cap * K, *logits = y + rows_cap, *xr = logits + N;
    if (linear_rows(x, 1, ldx, T, (int)K, g->q, 1, g->scale, NULL, p, 0, (int)N, nthreads)) goto done;
    rc = 0;
    for (int t = 0; t < T && !rc; t++) {
        memcpy(xr, x + t * ldx, sizeof(uint16_t) * (size_t)K);
        double ss = 0.0;
        for (int64_t k = 0; k < K; k++) { const double v = bf16_to_f32(xr[k]); ss += v * v; }
        const float nx = (float)(sqrt(ss) * (1.0 + 1e-6));
        const int64_t c = isfinite(nx) ? candidates(g, p + (size_t)t * N, nx, cand) : -1;
        int exact = c >= 1 && c <= cap;
        if (exact) {
            const int64_t c4 = (c + 3) & ~(int64_t)3;
            for (int64_t i = 0; i < c4; i++)
                memcpy(rows + i * K, g->w + cand[i < c ? i : c - 1] * K, sizeof(uint16_t) * (size_t)K);
            if (linear_rows(xr, 1, K, 1, (int)K, rows, 0, NULL, NULL, y, 1, (int)c4, 1)) { rc = -2; break; }
            int64_t best = 0;
            float m = bf16_to_f32(y[0]);
            for (int64_t i = 0; i < c && exact; i++) {
                const float v = bf16_to_f32(y[i]);
                if (v != v) exact = 0;                 /* a NaN: argmax_rows_bf16's rule, on the whole row */
                else if (v > m) { m = v; best = i; }
            }
            if (exact) { out[t] = cand[best]; g->rows_exact++; }
        }
        if (!exact) {
            rc = full_row(g, xr, logits, out + t, nthreads);
            g->rows_full++;
        }
    }
done:
    if (mem != g->scratch) free(mem);
    return rc;
}
