// What the CPU kernels' vector code shares: how it is compiled for more than one instruction set,
// how it asks the CPU what it has, and the AVX-512 pieces several kernels use.
//
// An extension is not compiled once per CPU capability as ATen is (at::vec::Vectorized would be
// fixed at the baseline, SSE2, here). Instead, loops the compiler vectorises are compiled twice by
// TORCHCNN_VECTOR_CLONES (AVX-512 and baseline x86-64; the loader picks one), and hand-written
// AVX-512 functions carry __attribute__((target("avx512f"))) and run only where cpu_has_avx512().
#pragma once

#include <immintrin.h>

#include <cstdint>

#define TORCHCNN_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))

namespace torchcnn::cpu {

inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// The mask of the first n of 16 lanes: all of them for n ≥ 16, none for n ≤ 0.
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// The even (odd) entries of the 32 floats a, b: a[0], a[2], …, b[14] (a[1], …, b[15]).
__attribute__((target("avx512f"))) inline __m512 even_entries(__m512 a, __m512 b) {
  return _mm512_permutex2var_ps(a, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), b);
}
__attribute__((target("avx512f"))) inline __m512 odd_entries(__m512 a, __m512 b) {
  return _mm512_permutex2var_ps(a, _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31), b);
}

}  // namespace torchcnn::cpu
