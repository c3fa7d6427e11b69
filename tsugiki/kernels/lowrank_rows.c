/*
 * LoRA's low-rank update on a few bf16 rows, added in place, for CPUs with AVX-512.
 *
 *     y[i, :] += (x[i, :] A^T) (s B)^T        for i < n
 *
 * x: n rows of K bf16 values (row stride x_stride elements), y: n rows of O bf16
 * values (row stride y_stride), At: A^T as K x rp bf16, Ut: (s B)^T as rp x O
 * bf16, both row-major, with the rank r padded to rp (a multiple of 16, at most
 * MAX_RANK) by zero columns of At and zero rows of Ut.
 *
 * The products and the sum with y run in fp32 (z = x A^T stays fp32); each
 * output is rounded to bf16 once, to nearest-even, as torch's bf16 add_ of an
 * fp32 update rounds. Rows go in blocks of ROW_BLOCK: z for a block keeps
 * ROW_BLOCK accumulators of 16 ranks in registers, and each 16-column slice of
 * y takes its 16 x 16 slice of Ut into registers once for the whole block.
 * NaN and infinity propagate as in a plain product.
 *
 * Built by tsugiki/kernels/native.py with -mavx512f -mavx512bw -mavx512vl.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__)
#error "lowrank_rows.c needs AVX-512 F, BW and VL"
#endif

#define ROW_BLOCK 8
#define MAX_RANK 64

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline __m512 load_bf16(const uint16_t *p, __mmask16 mask) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* fp32 -> bf16, round to nearest-even; a NaN stays a (quiet) NaN. */
static inline __m256i round_to_bf16(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i high = _mm512_srli_epi32(bits, 16);
    __m512i odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(rounded);
}

int lowrank_rows_max_rank(void) { return MAX_RANK; }

void lowrank_rows_bf16(int64_t n, int64_t K, int64_t O, int64_t rp,
                       const uint16_t *x, int64_t x_stride, const uint16_t *At, const uint16_t *Ut,
                       uint16_t *y, int64_t y_stride) {
    float z[ROW_BLOCK][MAX_RANK];
    for (int64_t first = 0; first < n; first += ROW_BLOCK) {
        int64_t rows = n - first < ROW_BLOCK ? n - first : ROW_BLOCK;
        const uint16_t *xrow[ROW_BLOCK];
        for (int i = 0; i < ROW_BLOCK; i++)  /* a short block repeats its first row: no branch in the loop */
            xrow[i] = x + (first + (i < rows ? i : 0)) * x_stride;

        /* z = x A^T, 16 ranks at a time */
        for (int64_t c = 0; c < rp; c += 16) {
            __m512 acc[ROW_BLOCK];
            for (int i = 0; i < ROW_BLOCK; i++) acc[i] = _mm512_setzero_ps();
            for (int64_t j = 0; j < K; j++) {
                __m512 a = load_bf16(At + j * rp + c, 0xffff);
                for (int i = 0; i < ROW_BLOCK; i++)
                    acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(bf16_to_float(xrow[i][j])), a, acc[i]);
            }
            for (int i = 0; i < ROW_BLOCK; i++) _mm512_storeu_ps(&z[i][c], acc[i]);
        }

        /* y += z Ut, 16 columns at a time */
        for (int64_t o = 0; o < O; o += 16) {
            __mmask16 mask = O - o >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (O - o)) - 1);
            __m512 acc[ROW_BLOCK];
            for (int i = 0; i < ROW_BLOCK; i++)
                acc[i] = i < rows ? load_bf16(y + (first + i) * y_stride + o, mask) : _mm512_setzero_ps();
            for (int64_t c = 0; c < rp; c += 16) {
                __m512 u[16];
                for (int k = 0; k < 16; k++) u[k] = load_bf16(Ut + (c + k) * O + o, mask);
                for (int i = 0; i < ROW_BLOCK; i++)
                    for (int k = 0; k < 16; k++) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(z[i][c + k]), u[k], acc[i]);
            }
            for (int i = 0; i < rows; i++)
                _mm256_mask_storeu_epi16(y + (first + i) * y_stride + o, mask, round_to_bf16(acc[i]));
        }
    }
}
