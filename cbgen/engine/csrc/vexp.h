/* exp(x) for x <= 0 in 16 float32 lanes, shared by paged_decode.c (softmax) and fused_ops.c (SiLU).
 * Cephes expf: n = round(x / ln 2), a degree-5 polynomial on the remainder, ~1 ulp; below -87
 * it returns ~1e-38, not 0 (and a NaN lane is taken as -87). Hand-vectorised: libm's scalar
 * expf was a third of the attention kernel's time. */
#ifndef CBGEN_VEXP_H
#define CBGEN_VEXP_H
#include <stdint.h>

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16f exp16_nonpos(v16f x) {
    const v16f lo = (v16f){0} - 87.0f, magic = (v16f){0} + 12582912.0f; /* 1.5 * 2^23 */
    const v16i keep = x > lo;
    x = (v16f)((keep & (v16i)x) | (~keep & (v16i)lo));
    const v16f n = (x * 1.44269504088896341f + magic) - magic;          /* round to nearest */
    const v16f r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v16f p = (v16f){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v16i e = (__builtin_convertvector(n, v16i) + 127) << 23;
    return p * (v16f)e;
}
#endif
