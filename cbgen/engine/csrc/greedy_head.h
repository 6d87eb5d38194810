/* greedy_head.c's struct and prototype, the one statement of its C interface: greedy_head.py's
 * ctypes Structure mirrors it field for field, and tests/test_greedy_head.py checks the size
 * (greedy_head_size). */
#ifndef CBGEN_GREEDY_HEAD_H
#define CBGEN_GREEDY_HEAD_H
#include <stdint.h>

typedef struct {
    const uint16_t *w;      /* [N, K] bf16: the LM head whose argmax is wanted */
    const int8_t *q;        /* [N, K] int8, per-row scale: the proxy */
    const float *scale;     /* [N] float32 */
    const float *slack;     /* [N] float32: |x . w_n - proxy_n| <= ||x||_2 * slack[n] (greedy_head.py) */
    int64_t N, K;
    int64_t max_candidates; /* more candidates in a row: that row takes the whole head */
    int64_t rows_exact;     /* counters, added to by each call: rows resolved from candidates, */
    int64_t rows_full;      /* and rows that took the whole head */
    void *scratch;          /* greedy_head_scratch_bytes(g, T) bytes serve calls of up to T rows */
    int64_t scratch_bytes;
} greedy_head;

int64_t greedy_head_size(void);
int64_t greedy_head_scratch_bytes(const greedy_head *g, int64_t T);

/* out[t] = argmax over n of bf16(x[t] . w[n]) for T rows of x (bf16, row stride ldx), with
 * argmax_rows_bf16's rule (the first maximal index; the first NaN if any), reading the int8
 * proxy and a few bf16 rows instead of the whole bf16 head. Returns 0, or -2 when memory runs out. */
int greedy_head_argmax(greedy_head *g, const uint16_t *x, int64_t ldx, int T, int64_t *out, int nthreads);
#endif
