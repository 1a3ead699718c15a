// softmax + cross-entropy on the CPU, one op forward and one backward (the design notes' e and f):
// rows in parallel, each by cross_entropy_row.h (shared with CUDA), then the reduction. The
// forward keeps each row's log Σ exp, so the backward, ŷ − y scaled, is one more pass.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../cross_entropy_row.h"
#include "../shapes.h"
#include "simd.h"

namespace torchcnn::cpu {
namespace {

// Rows per parallel task: ~16k logits each.
int64_t row_grain(int64_t classes) {
  return std::max<int64_t>(1, 16384 / classes);
}

#if TORCHCNN_X86_TIERS
// float rows with AVX-512, at the AVX512 tier (simd.h): the same formulas as cross_entropy_row.h, 16
// classes at a time, with a vector exp; the rest of the row's arithmetic is that header's. The
// scalar std::exp was most of a training batch's loss and gradient.

// e^x for 16 floats: 2^n · e^r with n = round(x · log2 e) and r = x − n · ln 2 (|r| ≤ ln 2 / 2,
// ln 2 split in two so that r is exact to float), e^r by its Taylor polynomial to r^7 (relative
// error below 1e-8 there, under float's half ulp), 2^n applied by scalef, which gives 0 and inf
// beyond float's range. x is clamped to where that holds first; max/min keep a NaN (their second
// operand is returned when either is NaN).
TORCHCNN_TARGET_AVX512 inline __m512 exp16_avx512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(p, n);
}

// cross_entropy_row.h's log_sum_exp: the max (lanes past the row read as −inf), then Σ e^(z − max).
TORCHCNN_TARGET_AVX512 float log_sum_exp_avx512(const float* z, int64_t classes) {
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 top = minus_inf;
  for (int64_t c = 0; c < classes; c += 16) {
    top = _mm512_max_ps(top, _mm512_mask_loadu_ps(minus_inf, first_lanes(classes - c), z + c));
  }
  const float max = _mm512_reduce_max_ps(top);
  const float shift = std::isinf(max) ? 0.0f : max;  // NaN stays NaN, through the sum if not here
  __m512 sum = _mm512_setzero_ps();
  for (int64_t c = 0; c < classes; c += 16) {
    const __mmask16 lanes = first_lanes(classes - c);
    const __m512 e = exp16_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, z + c), _mm512_set1_ps(shift)));
    sum = _mm512_mask_add_ps(sum, lanes, sum, e);
  }
  return std::log(_mm512_reduce_add_ps(sum)) + shift;
}

// cross_entropy_backward_row's formula: scale · ((1 − ε) · w_t · (ŷ_c − [c = t]) + ε/C · (Σ w · ŷ_c − w_c)).
TORCHCNN_TARGET_AVX512 void cross_entropy_backward_row_avx512(
    const float* z, int64_t classes, int64_t target, const float* weight, int64_t ignore_index, float smoothing,
    float lse, float scale, float* grad) {
  if (target == ignore_index) {
    std::fill(grad, grad + classes, 0.0f);
    return;
  }
  const __m512 hard = _mm512_set1_ps((1.0f - smoothing) * class_weight<float>(weight, target));
  const __m512 soft = _mm512_set1_ps(smoothing / static_cast<float>(classes));
  float weight_sum = 0;  // Σ_c w_c, needed only with smoothing
  for (int64_t c = 0; smoothing > 0 && c < classes; ++c) {
    weight_sum += class_weight<float>(weight, c);
  }
  const __m512 ones = _mm512_set1_ps(1.0f);
  for (int64_t c = 0; c < classes; c += 16) {
    const __mmask16 lanes = first_lanes(classes - c);
    const __m512 p = exp16_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, z + c), _mm512_set1_ps(lse)));
    const __mmask16 at_target = target >= c && target < c + 16 ? __mmask16(1u << (target - c)) : __mmask16(0);
    __m512 d = _mm512_mul_ps(hard, _mm512_mask_sub_ps(p, at_target, p, ones));
    if (smoothing > 0) {
      const __m512 w = weight == nullptr ? ones : _mm512_maskz_loadu_ps(lanes, weight + c);
      d = _mm512_fmadd_ps(soft, _mm512_fmsub_ps(_mm512_set1_ps(weight_sum), p, w), d);
    }
    _mm512_mask_storeu_ps(grad + c, lanes, _mm512_mul_ps(_mm512_set1_ps(scale), d));
  }
}

#endif

// The rows as the kernels below take them: cross_entropy_row.h's, or for float on an AVX-512 CPU
// the ones above.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t row_log_sum_exp(const scalar_t* z, int64_t classes) {
  return log_sum_exp(z, classes);
}

float row_log_sum_exp(const float* z, int64_t classes) {
#if TORCHCNN_X86_TIERS
  if (avx512_tier()) {
    return log_sum_exp_avx512(z, classes);
  }
#endif
  return log_sum_exp(z, classes);
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void row_backward(const scalar_t* z, int64_t classes, int64_t target, const scalar_t* weight, int64_t ignore_index,
                  acc_t smoothing, acc_t lse, acc_t scale, scalar_t* grad) {
  cross_entropy_backward_row(z, classes, target, weight, ignore_index, smoothing, lse, scale, grad);
}

void row_backward(const float* z, int64_t classes, int64_t target, const float* weight, int64_t ignore_index,
                  float smoothing, float lse, float scale, float* grad) {
#if TORCHCNN_X86_TIERS
  if (avx512_tier()) {
    cross_entropy_backward_row_avx512(z, classes, target, weight, ignore_index, smoothing, lse, scale, grad);
    return;
  }
#endif
  cross_entropy_backward_row(z, classes, target, weight, ignore_index, smoothing, lse, scale, grad);
}

// The first invalid target, named (cross_entropy_row.h leaves the check to its callers).
void check_targets(const int64_t* target, const CrossEntropyGeometry& g, int64_t ignore_index) {
  for (int64_t i = 0; i < g.rows; ++i) {
    TORCH_CHECK_INDEX(is_valid_target(target[i], g.classes, ignore_index), "cross_entropy: target ", target[i],
                      " is out of bounds for ", g.classes, " classes (expected 0 ≤ target < ", g.classes,
                      ", or ignore_index=", ignore_index, ")");
  }
}

// The forward's reduction is the rows' sum in row order (deterministic), accumulated in double on
// the host: at a training batch the rows take microseconds, and the ATen reductions the CUDA
// kernel uses (cross_entropy_row.h) would take as long again.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_cpu(
    const at::Tensor& input_, const at::Tensor& target_, const std::optional<at::Tensor>& weight_,
    c10::string_view reduction, int64_t ignore_index, double label_smoothing) {
  const auto g = cross_entropy_geometry("cross_entropy", input_, target_, weight_, reduction, label_smoothing);
  const auto operands = cross_entropy_operands(input_, target_, weight_);
  const at::Tensor &input = operands.input, &target = operands.target, &weight = operands.weight;
  check_targets(target.const_data_ptr<int64_t>(), g, ignore_index);
  const bool per_row_loss = g.reduction == CrossEntropyReduction::kNone;
  auto loss = per_row_loss ? at::empty({g.rows}, input.options()) : at::empty({}, input.options());
  auto lse = per_row(input, g.rows);
  auto total_weight = at::empty({}, lse.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "torchcnn::cross_entropy", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = input.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    acc_t* l = lse.mutable_data_ptr<acc_t>();
    std::vector<acc_t> losses(g.rows), weights(g.rows);
    const auto smoothing = static_cast<acc_t>(label_smoothing);
    at::parallel_for(0, g.rows, row_grain(g.classes), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* row = z + i * g.classes;
        l[i] = row_log_sum_exp(row, g.classes);
        cross_entropy_row_loss(row, g.classes, t[i], w, ignore_index, smoothing, l[i], losses[i], weights[i]);
      }
    });
    double loss_sum = 0, weight_sum = 0;
    for (int64_t i = 0; i < g.rows; ++i) {
      loss_sum += losses[i];
      weight_sum += weights[i];
    }
    const auto total = static_cast<acc_t>(weight_sum);
    *total_weight.mutable_data_ptr<acc_t>() = total;
    scalar_t* out = loss.mutable_data_ptr<scalar_t>();
    if (per_row_loss) {
      for (int64_t i = 0; i < g.rows; ++i) {
        out[i] = static_cast<scalar_t>(losses[i]);
      }
    } else {
      const auto sum = static_cast<acc_t>(loss_sum);
      *out = static_cast<scalar_t>(g.reduction == CrossEntropyReduction::kMean ? sum / total : sum);
    }
  });
  return {loss, lse, total_weight};
}

// Each row's factor ∂L/∂loss_i is read on the host: grad_loss (any stride: a summed 'none' loss
// hands back an expanded one), divided by Σ w_t for 'mean'.
at::Tensor cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& input_, const at::Tensor& target_,
    const std::optional<at::Tensor>& weight_, const at::Tensor& log_sum_exp, const at::Tensor& total_weight,
    c10::string_view reduction, int64_t ignore_index, double label_smoothing) {
  const auto g = cross_entropy_backward_geometry("cross_entropy_backward", grad_loss, input_, target_, weight_,
                                                 log_sum_exp, total_weight, reduction, label_smoothing);
  const auto operands = cross_entropy_operands(input_, target_, weight_);
  const at::Tensor &input = operands.input, &target = operands.target, &weight = operands.weight;
  const auto lse = log_sum_exp.contiguous();
  auto grad_input = at::empty(input.sizes(), input.options());
  check_targets(target.const_data_ptr<int64_t>(), g, ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "torchcnn::cross_entropy_backward",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = input.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* l = lse.const_data_ptr<acc_t>();
    const scalar_t* grad_loss_data = grad_loss.const_data_ptr<scalar_t>();
    const int64_t grad_loss_stride = g.reduction == CrossEntropyReduction::kNone ? grad_loss.stride(0) : 0;
    const acc_t divisor = g.reduction == CrossEntropyReduction::kMean ? *total_weight.const_data_ptr<acc_t>()
                                                                      : acc_t(1);
    scalar_t* grad = grad_input.mutable_data_ptr<scalar_t>();
    const auto smoothing = static_cast<acc_t>(label_smoothing);
    at::parallel_for(0, g.rows, row_grain(g.classes), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t scale = static_cast<acc_t>(grad_loss_data[i * grad_loss_stride]) / divisor;
        row_backward(z + i * g.classes, g.classes, t[i], w, ignore_index, smoothing, l[i], scale,
                                   grad + i * g.classes);
      }
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchcnn, CPU, m) {
  m.impl("cross_entropy", &cross_entropy_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
}

}  // namespace torchcnn::cpu
