// The tier the CPU kernels run at (simd.h), and the op that reports it.
#include "simd.h"

#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

namespace torchcnn::cpu {

Tier cpu_tier() {
  // torch's capability accounts for ATEN_CPU_CAPABILITY, but takes a forced avx512 or avx2 on trust:
  // the CPU is asked as well, so that a wrong setting costs speed, not an illegal instruction. A
  // build without the x86 tiers (another CPU, another compiler) has only the baseline to run.
  static const Tier tier = [] {
#if TORCHCNN_X86_TIERS
    const std::string capability = at::get_cpu_capability();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (capability == "AVX512" && avx512) {
      return Tier::kAvx512;
    }
    if ((capability == "AVX512" || capability == "AVX2") && avx2) {
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
