// The tier the CPU kernels run at (simd.h), and the op that reports it.
#include "simd.h"

#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

namespace torchcnn::cpu {

Tier cpu_tier() {
  // torch's capability already accounts for ATEN_CPU_CAPABILITY and for what the CPU has; a build
  // without the x86 tiers (another CPU, another compiler) has only the baseline to run.
  static const Tier tier = [] {
#if TORCHCNN_X86_TIERS
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") {
      return Tier::kAvx512;
    }
    if (capability == "AVX2") {
      return Tier::kAvx2;
    }
#endif
    return Tier::kDefault;
  }();
  return tier;
}

const char* tier_name(Tier tier) {
  switch (tier) {
    case Tier::kAvx512:
      return "avx512";
    case Tier::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

namespace {

std::string cpu_capability() {
  return tier_name(cpu_tier());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchcnn, m) {
  m.def("_cpu_capability() -> str", &cpu_capability);
}

}  // namespace torchcnn::cpu
