// max_pool_2x2.h's rows at every tier, 8 windows a step, written with GCC/clang vectors of 8
// floats, which each tier's copy maps to its registers (one AVX register; two SSE or NEON ones).
// The same scan as the AVX-512 rows and as max_pool2d_window.h: taps in the order r0[2j],
// r0[2j + 1], r1[2j], r1[2j + 1], each replacing the running max if larger or NaN.
#include "max_pool_2x2.h"

#include <cstring>

namespace torchcnn::cpu {
namespace {

typedef float Floats8 __attribute__((vector_size(32)));
typedef int32_t Ints8 __attribute__((vector_size(32)));

// The even (kOdd = 0) or odd (1) entries of the 16 floats a, b. clang and GCC 12+ have
// __builtin_shufflevector; GCC 11 has only its own __builtin_shuffle.
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define TORCHCNN_HAS_SHUFFLEVECTOR 1
#endif
#endif
#ifdef TORCHCNN_HAS_SHUFFLEVECTOR
#define TORCHCNN_ENTRIES(a, b, k) __builtin_shufflevector(a, b, k, k + 2, k + 4, k + 6, k + 8, k + 10, k + 12, k + 14)
#else
#define TORCHCNN_ENTRIES(a, b, k) __builtin_shuffle(a, b, Ints8{k, k + 2, k + 4, k + 6, k + 8, k + 10, k + 12, k + 14})
#endif

template <bool kRelu>
[[gnu::always_inline]] inline void rows8(const float* r0, const float* r1, int64_t count, int64_t first,
                                         int64_t width, float* out, int64_t* idx, bool* pass) {
  for (int64_t j = 0; j < count; j += 8) {
    Floats8 t0, t1, b0, b1;  // no function takes or returns a vector: the baseline's ABI has none this wide
    std::memcpy(&t0, r0 + 2 * j, sizeof t0);
    std::memcpy(&t1, r0 + 2 * j + 8, sizeof t1);
    std::memcpy(&b0, r1 + 2 * j, sizeof b0);
    std::memcpy(&b1, r1 + 2 * j + 8, sizeof b1);
    const Floats8 raw[4] = {TORCHCNN_ENTRIES(t0, t1, 0), TORCHCNN_ENTRIES(t0, t1, 1), TORCHCNN_ENTRIES(b0, b1, 0),
                            TORCHCNN_ENTRIES(b0, b1, 1)};
    // relu.h's rule lane by lane: z < 0 → 0; −0 and NaN stay.
    const Floats8 zero = {};
    Floats8 best = kRelu ? (raw[0] < zero ? zero : raw[0]) : raw[0];
    Floats8 best_raw = raw[0];
    Ints8 tap = {};  // which of the four taps holds the max: offset (tap & 1) + (tap >> 1)·W
    for (int k = 1; k < 4; ++k) {
      const Floats8 value = kRelu ? (raw[k] < zero ? zero : raw[k]) : raw[k];
      const Ints8 larger = (value > best) | (value != value);
      best = larger ? value : best;
      best_raw = larger ? raw[k] : best_raw;
      tap = larger ? Ints8{} + k : tap;
    }
    std::memcpy(out + j, &best, sizeof best);
    for (int l = 0; l < 8; ++l) {
      idx[j + l] = first + 2 * (j + l) + (tap[l] & 1) + (tap[l] >> 1) * width;
      if (kRelu) {
        pass[j + l] = !(best_raw[l] < 0.0f);
      }
    }
  }
}

[[gnu::always_inline]] inline void plain_rows(const float* r0, const float* r1, int64_t count, int64_t first,
                                              int64_t width, float* out, int64_t* idx) {
  rows8<false>(r0, r1, count, first, width, out, idx, nullptr);
}

}  // namespace

TORCHCNN_TIERED(max_pool_2x2_rows, plain_rows,
                (const float* r0, const float* r1, int64_t count, int64_t first, int64_t width, float* out,
                 int64_t* idx),
                (r0, r1, count, first, width, out, idx))
TORCHCNN_TIERED(relu_max_pool_2x2_rows, rows8<true>,
                (const float* r0, const float* r1, int64_t count, int64_t first, int64_t width, float* out,
                 int64_t* idx, bool* pass),
                (r0, r1, count, first, width, out, idx, pass))

}  // namespace torchcnn::cpu
