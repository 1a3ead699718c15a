// C = A · B (+ C) in float32 with AVX-512 (x86-64, at the avx512 tier: simd.h), in the manner of BLIS (Van Zee & van de Geijn, 2015).
//
// C is cut into 8 × 32 tiles, each computed by one kernel call that keeps the tile in 16 zmm
// registers and, for every p of the shared dimension, adds the outer product of A's column p (8
// values, broadcast one by one) and B's row p (two 16-float vectors): 16 FMAs per 2 loads and
// 8 broadcasts. B is read from a packed copy laid out in exactly that order,
//   B̃[panel of 32 columns][p][j]   (zero-padded at the edge),
// made for blocks of the shared dimension (KC = 256: one B̃ panel, 32 KiB, stays in L1 while the
// kernel sweeps MC = 128 rows of A from L2) and of C's columns (NC = 3072); packing absorbs B's
// strides, so a transposed B costs nothing extra. A is read in place, row- or column-major (a
// conv's weights are large and often used for few columns: packing them would cost more than it
// saves).
#include "gemm.h"
#include "../simd.h"

#include <algorithm>
#include <type_traits>
#include <atomic>
#include <vector>

namespace torchcnn::cpu {
namespace {

#if TORCHCNN_X86_TIERS

constexpr int64_t kMR = 8, kNR = 32, kKC = 256, kMC = 128, kNC = 3072;

// A strided matrix: element (i, j) at data[i·rs + j·cs].
struct View {
  const float* data;
  int64_t rs, cs;

  float operator()(int64_t i, int64_t j) const { return data[i * rs + j * cs]; }
};

// dst[j·ds + i] = src[i·ss + j] for i, j < 8: an 8 × 8 block transposed in registers.
TORCHCNN_TARGET_AVX2 void transpose_8x8_avx2(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm256_loadu_ps(src + i * ss);
  }
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    r[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(dst + j * ds, _mm256_permute2f128_ps(r[j], r[4 + j], 0x20));
    _mm256_storeu_ps(dst + (4 + j) * ds, _mm256_permute2f128_ps(r[j], r[4 + j], 0x31));
  }
}

// out[p·width + j] = M(p, j) for p < kc, j < width, M(p, j) = src[p·sp + j·sj], zero for j ≥ cols:
// one packed panel. Unit-stride runs are copied or transposed 8 × 8 at a time.
void pack_panel(const float* src, int64_t sp, int64_t sj, int64_t kc, int64_t cols, int64_t width, float* out) {
  int64_t p = 0;
  if (sj == 1) {  // rows of the panel are contiguous
    for (; p < kc; ++p) {
      std::copy(src + p * sp, src + p * sp + cols, out + p * width);
      std::fill(out + p * width + cols, out + (p + 1) * width, 0.0f);
    }
    return;
  }
  if (sp == 1 && cols == width) {  // columns are contiguous: transpose blocks of 8 × 8
    for (; p + 8 <= kc; p += 8) {
      for (int64_t j = 0; j < width; j += 8) {
        transpose_8x8_avx2(src + j * sj + p, sj, out + p * width + j, width);
      }
    }
  }
  for (; p < kc; ++p) {
    for (int64_t j = 0; j < width; ++j) {
      out[p * width + j] = j < cols ? src[p * sp + j * sj] : 0.0f;
    }
  }
}

// B̃ for rows [p0, p0 + kc) and columns [j0, j0 + nc) of B: panel (32 columns) by panel.
void pack_b(const View& b, int64_t p0, int64_t kc, int64_t j0, int64_t nc, float* out) {
  for (int64_t jp = 0; jp < nc; jp += kNR) {
    pack_panel(b.data + p0 * b.rs + (j0 + jp) * b.cs, b.rs, b.cs, kc, std::min(kNR, nc - jp), kNR, out + jp * kc);
  }
}

// C tile (rows × cols ≤ 8 × 32, rows ldc apart) = [C +] Σ_p A[·][p] ⊗ B̃[p][·], A read in place:
// row-major (A[r][p] at a[r·lda + p]) or column-major (at a[p·lda + r]). Rows past `rows` read
// the last row again (their results are not stored).
template <bool kRowMajor>
TORCHCNN_TARGET_AVX512 void kernel_8x32_avx512(int64_t kc, const float* __restrict a, int64_t lda,
                                                     const float* __restrict b, float* c, int64_t ldc, int64_t rows,
                                                     int64_t cols, bool add) {
  __m512 acc[kMR][2];
  int64_t offset[kMR];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) {
    acc[r][0] = _mm512_setzero_ps();
    acc[r][1] = _mm512_setzero_ps();
    offset[r] = std::min<int64_t>(r, rows - 1) * (kRowMajor ? lda : 1);
  }
  const int64_t step = kRowMajor ? 1 : lda;
  for (int64_t p = 0; p < kc; ++p) {
    const __m512 b0 = _mm512_loadu_ps(b + p * kNR);
    const __m512 b1 = _mm512_loadu_ps(b + p * kNR + 16);
    const float* ap = a + p * step;
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const __m512 ar = _mm512_set1_ps(ap[offset[r]]);
      acc[r][0] = _mm512_fmadd_ps(ar, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(ar, b1, acc[r][1]);
    }
  }
  const __mmask16 m0 = first_lanes(cols), m1 = first_lanes(cols - 16);
  for (int r = 0; r < rows; ++r) {
    float* row = c + r * ldc;
    if (add) {
      acc[r][0] = _mm512_add_ps(acc[r][0], _mm512_maskz_loadu_ps(m0, row));
      acc[r][1] = _mm512_add_ps(acc[r][1], _mm512_maskz_loadu_ps(m1, row + 16));
    }
    _mm512_mask_storeu_ps(row, m0, acc[r][0]);
    _mm512_mask_storeu_ps(row + 16, m1, acc[r][1]);
  }
}

// C (m × n, rows ldc apart, contiguous columns) = A · B [+ C], A row- or column-major (a.cs == 1
// or a.rs == 1), B any. B is packed block by block; A is read where it lies, eight rows at a time.
void sgemm(int64_t m, int64_t n, int64_t k, const View& a, const View& b, float* c, int64_t ldc, bool accumulate) {
  if (k == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) {
        std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
      }
    }
    return;
  }
  const bool row_major = a.cs == 1;
  const int64_t lda = row_major ? a.rs : a.cs;
  thread_local std::vector<float> b_packed;  // kept per thread between calls
  b_packed.resize(kKC * ((std::min(n, kNC) + kNR - 1) / kNR * kNR));
  for (int64_t jc = 0; jc < n; jc += kNC) {
    const int64_t nc = std::min(kNC, n - jc);
    for (int64_t pc = 0; pc < k; pc += kKC) {
      const int64_t kc = std::min(kKC, k - pc);
      pack_b(b, pc, kc, jc, nc, b_packed.data());
      // The B̃ panel stays in L1 while the kernel sweeps MC rows of A from L2.
      for (int64_t ic = 0; ic < m; ic += kMC) {
        const int64_t mc = std::min(kMC, m - ic);
        for (int64_t jr = 0; jr < nc; jr += kNR) {
          for (int64_t ir = ic; ir < ic + mc; ir += kMR) {
            const float* a_tile = a.data + ir * a.rs + pc * a.cs;
            float* c_tile = c + ir * ldc + jc + jr;
            const int64_t rows = std::min(kMR, m - ir), cols = std::min(kNR, nc - jr);
            const float* b_panel = b_packed.data() + jr * kc;
            if (row_major) {
              kernel_8x32_avx512<true>(kc, a_tile, lda, b_panel, c_tile, ldc, rows, cols, accumulate || pc > 0);
            } else {
              kernel_8x32_avx512<false>(kc, a_tile, lda, b_panel, c_tile, ldc, rows, cols, accumulate || pc > 0);
            }
          }
        }
      }
    }
  }
}

// Threads a product is worth splitting between: at least 2 MFLOP each (1: run it here).
int64_t split_threads(int64_t m, int64_t n, int64_t k) {
  if (at::in_parallel_region() || at::get_num_threads() < 2) {
    return 1;
  }
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), 2 * m * n * k / (int64_t{2} << 20)));
}

// A share of [0, size) for each of `threads`, in whole multiples of `unit`.
int64_t share(int64_t size, int64_t threads, int64_t unit) {
  return ((size + threads - 1) / threads + unit - 1) / unit * unit;
}

#endif  // TORCHCNN_X86_TIERS

// Whether float32 products take the GEMM above: by default wherever it can.
std::atomic<bool> use_avx512{avx512_tier()};

}  // namespace

namespace {

template <typename T>
at::Tensor wrap(const Matrix<T>& m) {
  return at::from_blob(const_cast<std::remove_const_t<T>*>(m.data), {m.rows, m.cols}, {m.rs, m.cs},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<std::remove_const_t<T>>::value));
}

template <typename T>
void blas(const Matrix<T>& c_, const Matrix<const T>& a, const Matrix<const T>& b, bool accumulate) {
  auto c = wrap(c_);
  if (accumulate) {
    c.addmm_(wrap(a), wrap(b));
  } else {
    at::mm_out(c, wrap(a), wrap(b));
  }
}

}  // namespace

template <>
void matmul(const Matrix<double>& c, const Matrix<const double>& a, const Matrix<const double>& b, bool accumulate) {
  blas(c, a, b, accumulate);
}

template <>
void matmul(const Matrix<float>& c, const Matrix<const float>& a, const Matrix<const float>& b, bool accumulate) {
  TORCH_INTERNAL_ASSERT(a.cols == b.rows && c.rows == a.rows && c.cols == b.cols);
#if TORCHCNN_X86_TIERS
  if (!use_avx512.load(std::memory_order_relaxed) || c.cs != 1 || (a.cs != 1 && a.rs != 1)) {
    blas(c, a, b, accumulate);
    return;
  }
  const int64_t m = c.rows, n = c.cols, k = a.cols;
  const int64_t threads = split_threads(m, n, k);
  if (threads == 1) {
    sgemm(m, n, k, View{a.data, a.rs, a.cs}, View{b.data, b.rs, b.cs}, c.data, c.rs, accumulate);
  } else if (n >= m) {
    // Columns between the threads: each packs only its own part of B.
    const int64_t part = share(n, threads, kNR);
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t j0 = t0 * part; j0 < std::min(n, t1 * part); j0 += part) {
        const int64_t j1 = std::min(n, j0 + part);
        sgemm(m, j1 - j0, k, View{a.data, a.rs, a.cs}, View{b.data + j0 * b.cs, b.rs, b.cs}, c.data + j0, c.rs,
              accumulate);
      }
    });
  } else {
    // Rows between the threads: each reads only its own rows of A.
    const int64_t part = share(m, threads, kMR);
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t i0 = t0 * part; i0 < std::min(m, t1 * part); i0 += part) {
        const int64_t i1 = std::min(m, i0 + part);
        sgemm(i1 - i0, n, k, View{a.data + i0 * a.rs, a.rs, a.cs}, View{b.data, b.rs, b.cs}, c.data + i0 * c.rs,
              c.rs, accumulate);
      }
    });
  }
#else
  blas(c, a, b, accumulate);
#endif
}

void matmul(at::Tensor& c, const at::Tensor& a_, const at::Tensor& b, bool accumulate) {
  TORCH_INTERNAL_ASSERT(a_.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a_.size(1) == b.size(0) &&
                        c.size(0) == a_.size(0) && c.size(1) == b.size(1));
  // The AVX-512 kernel reads A in place: row- or column-major.
  const auto a = a_.stride(0) == 1 || a_.stride(1) == 1 ? a_ : a_.contiguous();
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "torchcnn::matmul", [&] {
    auto matrix = [](auto* data, const at::Tensor& t) {
      return Matrix<std::remove_pointer_t<decltype(data)>>{data, t.size(0), t.size(1), t.stride(0), t.stride(1)};
    };
    matmul<scalar_t>(matrix(c.mutable_data_ptr<scalar_t>(), c), matrix(a.const_data_ptr<scalar_t>(), a),
                     matrix(b.const_data_ptr<scalar_t>(), b), accumulate);
  });
}

std::string set_gemm(const std::string& name) {
  TORCH_CHECK_VALUE(name == "avx512" || name == "blas", "_cpu_set_gemm: expected name to be 'avx512' or 'blas' "
                    "but got '", name, "'");
  TORCH_CHECK_VALUE(name == "blas" || avx512_tier(), "_cpu_set_gemm: the AVX-512 GEMM needs the avx512 tier, and the "
                    "kernels run at '", tier_name(cpu_tier()), "' (torchcnn.testing.cpu_capability())");
  return use_avx512.exchange(name == "avx512") ? "avx512" : "blas";
}

}  // namespace torchcnn::cpu
