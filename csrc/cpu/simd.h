// What the CPU kernels' vector code shares: which instruction-set tier the kernels run at, the
// functions compiled once per tier, and the AVX-512 pieces several kernels use.
//
// The tier is torch's CPU capability (at::get_cpu_capability(): AVX512, AVX2 or DEFAULT on x86-64),
// so ATEN_CPU_CAPABILITY=avx2|default caps torch's kernels and torchcnn's together. On x86-64 with
// GCC or clang, a loop the compiler vectorises is compiled three times by TORCHCNN_TIERED (AVX-512,
// AVX2 + FMA, baseline x86-64) and the tier picks one; hand-written AVX-512 functions carry
// TORCHCNN_TARGET_AVX512 and run only at the AVX512 tier. Every other CPU (aarch64, where NEON is
// the baseline the compiler vectorises for) compiles the baseline alone. Some kernels are written
// with GCC/clang vector extensions (vector_size), which MSVC lacks: GCC 11+ or clang.
#pragma once

#include <cstdint>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define TORCHCNN_X86_TIERS 1
#include <immintrin.h>
#else
#define TORCHCNN_X86_TIERS 0
#endif

namespace torchcnn::cpu {

enum class Tier { kDefault, kAvx2, kAvx512 };

// The tier the kernels run at: torch's CPU capability, read once (torch reads it once too).
Tier cpu_tier();

// "avx512", "avx2" or "default": what torchcnn.testing.cpu_capability() reports.
const char* tier_name(Tier tier);

inline bool avx512_tier() {
  return cpu_tier() == Tier::kAvx512;
}

}  // namespace torchcnn::cpu

#if TORCHCNN_X86_TIERS

// The instruction sets of torch's AVX512 and AVX2 capabilities (a CPU torch puts at a tier has all
// of them).
#define TORCHCNN_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define TORCHCNN_TARGET_AVX2 __attribute__((target("avx2,fma")))

// `void name params` calling `body args`, compiled once per tier and dispatched on cpu_tier(). The
// body is an always-inline template, so each copy is vectorised for its own instruction set.
#define TORCHCNN_TIERED(name, body, params, args)   \
  TORCHCNN_TARGET_AVX512 void name##_avx512 params { \
    body args;                                       \
  }                                                  \
  TORCHCNN_TARGET_AVX2 void name##_avx2 params {     \
    body args;                                       \
  }                                                  \
  void name##_default params {                       \
    body args;                                       \
  }                                                  \
  void name params {                                 \
    switch (::torchcnn::cpu::cpu_tier()) {           \
      case ::torchcnn::cpu::Tier::kAvx512:           \
        return name##_avx512 args;                   \
      case ::torchcnn::cpu::Tier::kAvx2:             \
        return name##_avx2 args;                     \
      default:                                       \
        return name##_default args;                  \
    }                                                \
  }

namespace torchcnn::cpu {

// The mask of the first n of 16 lanes: all of them for n ≥ 16, none for n ≤ 0.
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// The even (odd) entries of the 32 floats a, b: a[0], a[2], …, b[14] (a[1], …, b[15]).
TORCHCNN_TARGET_AVX512 inline __m512 even_entries_avx512(__m512 a, __m512 b) {
  return _mm512_permutex2var_ps(a, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), b);
}
TORCHCNN_TARGET_AVX512 inline __m512 odd_entries_avx512(__m512 a, __m512 b) {
  return _mm512_permutex2var_ps(a, _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31), b);
}

}  // namespace torchcnn::cpu

#else  // one baseline copy

#define TORCHCNN_TIERED(name, body, params, args) \
  void name params {                              \
    body args;                                    \
  }

#endif
