// The matrix products of the CPU convolutions.
//
// BLAS (at::mm: MKL or OpenBLAS) is not equally fast everywhere: MKL runs its AVX2 code on AMD
// CPUs even where they have AVX-512, half the rate oneDNN's convolutions reach there. On a CPU
// with AVX-512, float32 products therefore go to torchcnn's own GEMM (gemm.cpp: packed panels,
// an 8 × 32 register-blocked AVX-512 kernel); everything else goes to at::mm. A product is always
// computed by one thread: the convolutions split their work between threads themselves.
#pragma once

#include <torch/all.h>

#include <string>

namespace torchcnn::cpu {

// c = a · b, or c += a · b when `accumulate`; 2-D tensors of one dtype, any strides.
void matmul(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate = false);

// An A operand packed once for many products c = A · b (a conv's weights for every image).
class PackedMatrix {
 public:
  explicit PackedMatrix(const at::Tensor& a);
  void multiply(at::Tensor& c, const at::Tensor& b, bool accumulate = false) const;

 private:
  at::Tensor a_;       // A itself, for BLAS
  at::Tensor packed_;  // its packed copy, when the AVX-512 GEMM will take the products
};

// Which GEMM float32 products take: "avx512" (where the CPU has it) or "blas". Returns the
// previous choice (a knob for the tests and benchmarks: torch.ops.torchcnn._cpu_set_gemm).
std::string set_gemm(const std::string& name);

}  // namespace torchcnn::cpu
