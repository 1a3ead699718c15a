// C = A · B (+ C) in float32 with AVX-512, in the manner of BLIS (Van Zee & van de Geijn, 2015).
//
// C is cut into 8 × 32 tiles, each computed by one kernel call that keeps the tile in 16 zmm
// registers and, for every p of the shared dimension, adds the outer product of A's column p (8
// values, broadcast one by one) and B's row p (two 16-float vectors): 16 FMAs per 2 loads and
// 8 broadcasts. The kernel reads A and B from packed copies laid out in exactly that order:
//   Ã[panel of 8 rows][p][r],   B̃[panel of 32 columns][p][j]   (zero-padded at the edges),
// for blocks of the shared dimension (KC = 256: one B̃ panel, 32 KiB, stays in L1 while the kernel
// sweeps the A panels of an MC = 128-row block, 128 KiB, from L2) and of C's columns (NC = 3072).
// Packing also absorbs any strides: transposed operands cost nothing extra. An A used for many
// products (a conv's weights, Winograd's transformed filters) is packed once (PackedMatrix).
#include "gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace torchcnn::cpu {
namespace {

constexpr int64_t kMR = 8, kNR = 32, kKC = 256, kMC = 128, kNC = 3072;

// A strided matrix: element (i, j) at data[i·rs + j·cs].
struct View {
  const float* data;
  int64_t rs, cs;

  float operator()(int64_t i, int64_t j) const { return data[i * rs + j * cs]; }
};

// dst[j·ds + i] = src[i·ss + j] for i, j < 8: an 8 × 8 block transposed in registers.
__attribute__((target("avx2"))) void transpose_8x8(const float* src, int64_t ss, float* dst, int64_t ds) {
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
        transpose_8x8(src + j * sj + p, sj, out + p * width + j, width);
      }
    }
  }
  for (; p < kc; ++p) {
    for (int64_t j = 0; j < width; ++j) {
      out[p * width + j] = j < cols ? src[p * sp + j * sj] : 0.0f;
    }
  }
}

// Ã for rows [i0, i0 + mc) and columns [p0, p0 + kc) of A: panel (8 rows) by panel.
void pack_a(const View& a, int64_t i0, int64_t mc, int64_t p0, int64_t kc, float* out) {
  for (int64_t ip = 0; ip < mc; ip += kMR) {
    pack_panel(a.data + (i0 + ip) * a.rs + p0 * a.cs, a.cs, a.rs, kc, std::min(kMR, mc - ip), kMR, out + ip * kc);
  }
}

// B̃ for rows [p0, p0 + kc) and columns [j0, j0 + nc) of B: panel (32 columns) by panel.
void pack_b(const View& b, int64_t p0, int64_t kc, int64_t j0, int64_t nc, float* out) {
  for (int64_t jp = 0; jp < nc; jp += kNR) {
    pack_panel(b.data + p0 * b.rs + (j0 + jp) * b.cs, b.rs, b.cs, kc, std::min(kNR, nc - jp), kNR, out + jp * kc);
  }
}

inline __mmask16 first(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// C tile (rows × cols ≤ 8 × 32, rows ldc apart) = [C +] Σ_p Ã[p][·] ⊗ B̃[p][·].
__attribute__((target("avx512f"))) void kernel_8x32(int64_t kc, const float* __restrict a,
                                                     const float* __restrict b, float* c, int64_t ldc,
                                                     int64_t rows, int64_t cols, bool add) {
  __m512 acc[kMR][2];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) {
    acc[r][0] = _mm512_setzero_ps();
    acc[r][1] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < kc; ++p) {
    const __m512 b0 = _mm512_loadu_ps(b + p * kNR);
    const __m512 b1 = _mm512_loadu_ps(b + p * kNR + 16);
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const __m512 ar = _mm512_set1_ps(a[p * kMR + r]);
      acc[r][0] = _mm512_fmadd_ps(ar, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(ar, b1, acc[r][1]);
    }
  }
  const __mmask16 m0 = first(cols), m1 = first(cols - 16);
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

// Rows of A rounded up to whole panels.
int64_t padded_rows(int64_t m) {
  return (m + kMR - 1) / kMR * kMR;
}

// All of A packed, block of the shared dimension after block: the block of columns [pc, pc + kc)
// starts at pc · padded_rows(m), and within it the panel of rows [ir, ir + 8) at ir · kc.
void pack_all_a(const View& a, int64_t m, int64_t k, float* out) {
  for (int64_t pc = 0; pc < k; pc += kKC) {
    pack_a(a, 0, m, pc, std::min(kKC, k - pc), out + pc * padded_rows(m));
  }
}

// C (m × n, rows ldc apart, contiguous columns) = A · B [+ C], A packed by pack_all_a.
void sgemm_packed(int64_t m, int64_t n, int64_t k, const float* a_packed, const View& b, float* c, int64_t ldc,
                  bool accumulate) {
  if (k == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) {
        std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
      }
    }
    return;
  }
  thread_local std::vector<float> b_packed;  // kept per thread between calls
  b_packed.resize(kKC * ((std::min(n, kNC) + kNR - 1) / kNR * kNR));
  for (int64_t jc = 0; jc < n; jc += kNC) {
    const int64_t nc = std::min(kNC, n - jc);
    for (int64_t pc = 0; pc < k; pc += kKC) {
      const int64_t kc = std::min(kKC, k - pc);
      pack_b(b, pc, kc, jc, nc, b_packed.data());
      const float* a_block = a_packed + pc * padded_rows(m);
      // The B̃ panel stays in L1 while the kernel sweeps MC rows of Ã from L2.
      for (int64_t ic = 0; ic < m; ic += kMC) {
        const int64_t mc = std::min(kMC, m - ic);
        for (int64_t jr = 0; jr < nc; jr += kNR) {
          for (int64_t ir = ic; ir < ic + mc; ir += kMR) {
            kernel_8x32(kc, a_block + ir * kc, b_packed.data() + jr * kc, c + ir * ldc + jc + jr, ldc,
                        std::min(kMR, m - ir), std::min(kNR, nc - jr), accumulate || pc > 0);
          }
        }
      }
    }
  }
}

const bool cpu_has_avx512 = __builtin_cpu_supports("avx512f");
std::atomic<bool> use_avx512{cpu_has_avx512};

bool avx512_for(const at::Tensor& c) {
  return c.scalar_type() == at::kFloat && use_avx512.load(std::memory_order_relaxed) && c.stride(1) == 1;
}

void check_product(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.size(1) == b.size(0) &&
                        c.size(0) == a.size(0) && c.size(1) == b.size(1));
}

void blas(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

View view(const at::Tensor& t) {
  return View{t.const_data_ptr<float>(), t.stride(0), t.stride(1)};
}

}  // namespace

void matmul(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  check_product(c, a, b);
  if (!avx512_for(c)) {
    blas(c, a, b, accumulate);
    return;
  }
  thread_local std::vector<float> a_packed;  // kept per thread between calls
  a_packed.resize(padded_rows(a.size(0)) * a.size(1));
  pack_all_a(view(a), a.size(0), a.size(1), a_packed.data());
  sgemm_packed(c.size(0), c.size(1), a.size(1), a_packed.data(), view(b), c.mutable_data_ptr<float>(), c.stride(0),
               accumulate);
}

PackedMatrix::PackedMatrix(const at::Tensor& a) : a_(a) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2);
  if (a.scalar_type() == at::kFloat && use_avx512.load(std::memory_order_relaxed)) {
    packed_ = at::empty({padded_rows(a.size(0)) * a.size(1)}, a.options());
    pack_all_a(view(a), a.size(0), a.size(1), packed_.mutable_data_ptr<float>());
  }
}

void PackedMatrix::multiply(at::Tensor& c, const at::Tensor& b, bool accumulate) const {
  check_product(c, a_, b);
  if (!packed_.defined() || c.stride(1) != 1) {
    blas(c, a_, b, accumulate);
    return;
  }
  sgemm_packed(c.size(0), c.size(1), a_.size(1), packed_.const_data_ptr<float>(), view(b),
               c.mutable_data_ptr<float>(), c.stride(0), accumulate);
}

std::string set_gemm(const std::string& name) {
  TORCH_CHECK_VALUE(name == "avx512" || name == "blas", "_cpu_set_gemm: expected name to be 'avx512' or 'blas' "
                    "but got '", name, "'");
  TORCH_CHECK_VALUE(name == "blas" || cpu_has_avx512, "_cpu_set_gemm: this CPU has no AVX-512");
  return use_avx512.exchange(name == "avx512") ? "avx512" : "blas";
}

}  // namespace torchcnn::cpu
