// The design notes' 2×2, stride-2 max pool over one row of windows, branch-free (on real data
// whether a tap is larger is a coin flip, and a mispredicted branch per tap costs more than the
// whole window): forward and backward in AVX-512 at the avx512 tier (x86-64 with GCC or clang), 16
// windows a step; the forward at every other tier 8 windows a step (max_pool_2x2.cpp). Used by
// max_pool2d (csrc/cpu/max_pool2d.cpp) and, with the ReLU applied to each tap first, by
// conv2d_relu_max_pool2d (conv2d_relu.cpp).
//
// Window j of the row is r0[2j], r0[2j + 1], r1[2j], r1[2j + 1], scanned in that order by
// max_pool2d_window.h's rule: a tap replaces the running max if it is larger or NaN. The index
// written is the flat position in the plane, `first` (the row pair's first pixel) + 2j + the tap's
// offset (0, 1, W, W + 1).
#pragma once

#include <cstdint>

#include "simd.h"

namespace torchcnn::cpu {

// The first `count` windows (a multiple of 8) of rows r0 and r1, 8 at a time, compiled once per
// tier; with the ReLU, pass[j] says whether it passes its gradient at the argmax (the tap there
// ≥ 0, or NaN).
void max_pool_2x2_rows(const float* r0, const float* r1, int64_t count, int64_t first, int64_t width, float* out,
                       int64_t* idx);
void relu_max_pool_2x2_rows(const float* r0, const float* r1, int64_t count, int64_t first, int64_t width,
                            float* out, int64_t* idx, bool* pass);

}  // namespace torchcnn::cpu

#if TORCHCNN_X86_TIERS

namespace torchcnn::cpu {

namespace detail {

TORCHCNN_TARGET_AVX512 inline __m512 relu16_avx512(__m512 z) {
  // z < 0 → 0; −0 and NaN stay (relu.h).
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), z, _mm512_setzero_ps());
}

TORCHCNN_TARGET_AVX512 inline void take16_avx512(__m512 value, __m512 raw, __m512i offset, __m512& best,
                                                 __m512& best_raw, __m512i& best_offset) {
  const __mmask16 larger = _mm512_cmp_ps_mask(value, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(value, value,
                                                                                              _CMP_UNORD_Q);
  best = _mm512_mask_blend_ps(larger, best, value);
  best_raw = _mm512_mask_blend_ps(larger, best_raw, raw);
  best_offset = _mm512_mask_blend_epi32(larger, best_offset, offset);
}

}  // namespace detail

// Whether a row of this width takes the vector kernels, whose column arithmetic is in int32.
inline bool max_pool_2x2_vectorizes(int64_t width) {
  return avx512_tier() && width < (int64_t{1} << 29);
}

// `count` windows of rows r0 and r1 (each ≥ 2·count floats); with kRelu the max is over relu(tap)
// and pass[j] says whether the ReLU passes its gradient at the argmax (the tap there ≥ 0, or NaN).
template <bool kRelu>
TORCHCNN_TARGET_AVX512 inline void max_pool_2x2_row_avx512(const float* r0, const float* r1,
                                                                        int64_t count, int64_t first, int64_t width,
                                                                        float* out, int64_t* idx, bool* pass) {
  const __m512i lane_columns = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i right = _mm512_set1_epi32(1), below = _mm512_set1_epi32(static_cast<int>(width));
  const __m512i below_right = _mm512_set1_epi32(static_cast<int>(width) + 1);
  for (int64_t j = 0; j < count; j += 16) {
    const int64_t n = count - j < 16 ? count - j : 16;
    const __mmask16 lo = first_lanes(2 * n), hi = first_lanes(2 * n - 16), out_mask = first_lanes(n);
    const float* t = r0 + 2 * j;
    const float* b = r1 + 2 * j;
    const __m512 t0 = _mm512_maskz_loadu_ps(lo, t), t1 = _mm512_maskz_loadu_ps(hi, t + 16);
    const __m512 b0 = _mm512_maskz_loadu_ps(lo, b), b1 = _mm512_maskz_loadu_ps(hi, b + 16);
    const __m512 raw[4] = {even_entries_avx512(t0, t1), odd_entries_avx512(t0, t1), even_entries_avx512(b0, b1),
                           odd_entries_avx512(b0, b1)};
    const __m512i offsets[4] = {_mm512_setzero_si512(), right, below, below_right};
    __m512 best = kRelu ? detail::relu16_avx512(raw[0]) : raw[0];
    __m512 best_raw = raw[0];
    __m512i best_offset = offsets[0];
    for (int tap = 1; tap < 4; ++tap) {
      detail::take16_avx512(kRelu ? detail::relu16_avx512(raw[tap]) : raw[tap], raw[tap], offsets[tap], best,
                            best_raw, best_offset);
    }
    _mm512_mask_storeu_ps(out + j, out_mask, best);
    // Flat indices: first + 2·(j + lane) + offset, widened to int64 eight lanes at a time.
    const __m512i within = _mm512_add_epi32(_mm512_add_epi32(lane_columns, _mm512_set1_epi32(static_cast<int>(2 * j))),
                                            best_offset);
    const __m512i base = _mm512_set1_epi64(first);
    const __m512i low = _mm512_add_epi64(base, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(within)));
    const __m512i high = _mm512_add_epi64(base, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(within, 1)));
    _mm512_mask_storeu_epi64(idx + j, static_cast<__mmask8>(out_mask), low);
    _mm512_mask_storeu_epi64(idx + j + 8, static_cast<__mmask8>(out_mask >> 8), high);
    if (kRelu) {
      const __mmask16 passes = ~_mm512_cmp_ps_mask(best_raw, _mm512_setzero_ps(), _CMP_LT_OQ);
      _mm512_mask_cvtepi32_storeu_epi8(pass + j, out_mask, _mm512_maskz_set1_epi32(passes, 1));
    }
  }
}

// The backward of `count` windows: ∂L/∂X of the two rows under them, written whole (0 but at each
// window's argmax, which gets its ∂L/∂P: the windows do not overlap), so the plane needs no zero fill
// and no scatter. An index that is not one of its window's four pixels passes nothing; the
// returned mask is nonzero if there was one, for the caller to raise.
TORCHCNN_TARGET_AVX512 inline uint32_t max_pool_2x2_backward_row_avx512(
    const float* grad_out, const int64_t* idx, int64_t count, int64_t first, int64_t width, float* g0, float* g1) {
  const __m512i lane_columns = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i interleave_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i interleave_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i offsets[4] = {_mm512_setzero_si512(), _mm512_set1_epi64(1), _mm512_set1_epi64(width),
                              _mm512_set1_epi64(width + 1)};
  uint32_t invalid = 0;
  for (int64_t j = 0; j < count; j += 16) {
    const int64_t n = count - j < 16 ? count - j : 16;
    const __mmask16 lo = first_lanes(2 * n), hi = first_lanes(2 * n - 16), in = first_lanes(n);
    const __m512 g = _mm512_maskz_loadu_ps(in, grad_out + j);
    // Each index's offset from its window's first pixel, in int64 (a wild index must not wrap).
    __mmask16 at[4];
    for (int half = 0; half < 2; ++half) {
      const __mmask8 lanes = static_cast<__mmask8>(in >> (8 * half));
      const __m512i start = _mm512_add_epi64(_mm512_set1_epi64(first + 2 * (j + 8 * half)), lane_columns);
      const __m512i k = _mm512_sub_epi64(_mm512_maskz_loadu_epi64(lanes, idx + j + 8 * half), start);
      for (int tap = 0; tap < 4; ++tap) {
        const __mmask16 hit = _mm512_mask_cmpeq_epi64_mask(lanes, k, offsets[tap]);
        at[tap] = half == 0 ? hit : static_cast<__mmask16>(at[tap] | (hit << 8));
      }
    }
    invalid |= static_cast<uint32_t>(in & ~(at[0] | at[1] | at[2] | at[3]));
    const __m512 top_even = _mm512_maskz_mov_ps(at[0], g), top_odd = _mm512_maskz_mov_ps(at[1], g);
    const __m512 bottom_even = _mm512_maskz_mov_ps(at[2], g), bottom_odd = _mm512_maskz_mov_ps(at[3], g);
    _mm512_mask_storeu_ps(g0 + 2 * j, lo, _mm512_permutex2var_ps(top_even, interleave_lo, top_odd));
    _mm512_mask_storeu_ps(g0 + 2 * j + 16, hi, _mm512_permutex2var_ps(top_even, interleave_hi, top_odd));
    _mm512_mask_storeu_ps(g1 + 2 * j, lo, _mm512_permutex2var_ps(bottom_even, interleave_lo, bottom_odd));
    _mm512_mask_storeu_ps(g1 + 2 * j + 16, hi, _mm512_permutex2var_ps(bottom_even, interleave_hi, bottom_odd));
  }
  return invalid;
}

}  // namespace torchcnn::cpu

#endif  // TORCHCNN_X86_TIERS
