/* Prototypes of paged_decode.c, the one statement of its C signatures: paged_kernel.py's
 * ctypes argtypes mirror them, and tests/test_sliding_window.py checks the two agree.
 * Shapes and the meaning of each argument: paged_decode.c's header comment.
 * Returns 0, -1 for an unsupported shape, -2 when scratch memory could not be allocated. */
#ifndef CBGEN_PAGED_DECODE_H
#define CBGEN_PAGED_DECODE_H
#include <stdint.h>

int paged_decode_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out,
                      const int32_t *tables, int table_stride, const int32_t *lens, int window, int nd,
                      int H, int KVH, int D, int bs, float scale, int nthreads);

int paged_decode_f32(const float *q, const float *k, const float *v, float *out,
                     const int32_t *tables, int table_stride, const int32_t *lens, int window, int nd,
                     int H, int KVH, int D, int bs, float scale, int nthreads);
#endif
