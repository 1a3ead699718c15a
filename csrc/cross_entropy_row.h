// The design notes' softmax + cross-entropy for one row of logits z (C classes) with a class-index
// target, written once for the CPU and the CUDA kernels (C10_HOST_DEVICE), in the op-math type:
//
//   ŷ_c = exp(z_c − lse),  lse = log Σ_c exp(z_c)                          (softmax, computed stably)
//   loss = (1 − ε) · w_t · (lse − z_t) + ε/C · Σ_c w_c · (lse − z_c)        (L = −Σ_j y_j ln ŷ_j with y
//                                                                         smoothed to (1 − ε)·onehot + ε/C)
//   ∂loss/∂z_c = (1 − ε) · w_t · (ŷ_c − [c = t]) + ε/C · (Σ_c' w_c' · ŷ_c − w_c)
//
// with class weights w (all 1 without `weight`); a row whose target is ignore_index has loss 0,
// weight 0 and gradient 0. torch's nll_loss/cross_entropy, term for term.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>

#include "shapes.h"

namespace torchcnn {

template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline acc_t class_weight(const scalar_t* weight, int64_t c) {
  return weight == nullptr ? acc_t(1) : static_cast<acc_t>(weight[c]);
}

// log Σ_c exp(z_c), shifted by the row's max as torch's logsumexp (by 0 when the max is ±inf).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
C10_HOST_DEVICE inline acc_t log_sum_exp(const scalar_t* z, int64_t classes) {
  acc_t top = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < classes; ++c) {
    const acc_t v = static_cast<acc_t>(z[c]);
    top = ((v > top) | (v != v)) ? v : top;
  }
  const acc_t shift = top == std::numeric_limits<acc_t>::infinity() || top == -std::numeric_limits<acc_t>::infinity()
      ? acc_t(0)
      : top;
  acc_t sum = 0;
  for (int64_t c = 0; c < classes; ++c) {
    sum += std::exp(static_cast<acc_t>(z[c]) - shift);
  }
  return std::log(sum) + shift;
}

// Whether a row's target is a class or ignore_index: anything else is the caller's error to raise.
C10_HOST_DEVICE inline bool is_valid_target(int64_t target, int64_t classes, int64_t ignore_index) {
  return target == ignore_index || (target >= 0 && target < classes);
}

// One row's loss and weight w_t (the mean's divisor), given its lse. The target must be valid
// (is_valid_target).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
C10_HOST_DEVICE inline void cross_entropy_row_loss(const scalar_t* z, int64_t classes, int64_t target,
                                                   const scalar_t* weight, int64_t ignore_index, acc_t smoothing,
                                                   acc_t lse, acc_t& loss, acc_t& target_weight) {
  if (target == ignore_index) {
    loss = 0;
    target_weight = 0;
    return;
  }
  target_weight = class_weight<acc_t>(weight, target);
  loss = (acc_t(1) - smoothing) * target_weight * (lse - static_cast<acc_t>(z[target]));
  if (smoothing > 0) {
    acc_t smooth = 0;
    for (int64_t c = 0; c < classes; ++c) {
      smooth += class_weight<acc_t>(weight, c) * (lse - static_cast<acc_t>(z[c]));
    }
    loss += smoothing / static_cast<acc_t>(classes) * smooth;
  }
}

// One row's forward: its loss, lse (kept for the backward) and weight w_t.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
C10_HOST_DEVICE inline void cross_entropy_row(const scalar_t* z, int64_t classes, int64_t target,
                                              const scalar_t* weight, int64_t ignore_index, acc_t smoothing,
                                              acc_t& loss, acc_t& lse, acc_t& target_weight) {
  lse = log_sum_exp(z, classes);
  cross_entropy_row_loss(z, classes, target, weight, ignore_index, smoothing, lse, loss, target_weight);
}

// One row's gradient ∂L/∂z = scale · ∂loss/∂z, from the forward's lse.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
C10_HOST_DEVICE inline void cross_entropy_backward_row(const scalar_t* z, int64_t classes, int64_t target,
                                                       const scalar_t* weight, int64_t ignore_index, acc_t smoothing,
                                                       acc_t lse, acc_t scale, scalar_t* grad) {
  if (target == ignore_index) {
    for (int64_t c = 0; c < classes; ++c) {
      grad[c] = scalar_t(0);
    }
    return;
  }
  const acc_t hard = (acc_t(1) - smoothing) * class_weight<acc_t>(weight, target);
  const acc_t soft = smoothing / static_cast<acc_t>(classes);
  acc_t weight_sum = 0;  // Σ_c w_c, needed only with smoothing
  for (int64_t c = 0; smoothing > 0 && c < classes; ++c) {
    weight_sum += class_weight<acc_t>(weight, c);
  }
  for (int64_t c = 0; c < classes; ++c) {
    const acc_t p = std::exp(static_cast<acc_t>(z[c]) - lse);
    acc_t d = hard * (p - (c == target ? acc_t(1) : acc_t(0)));
    if (smoothing > 0) {
      d += soft * (weight_sum * p - class_weight<acc_t>(weight, c));
    }
    grad[c] = static_cast<scalar_t>(scale * d);
  }
}

// Host side, shared by the CPU and CUDA ops: the operands as the kernels read them, and the
// reductions, as ATen ops on the device (no host synchronisation).

// input, target and weight contiguous (weight undefined when not given).
struct CrossEntropyOperands {
  at::Tensor input, target, weight;
};

inline CrossEntropyOperands cross_entropy_operands(const at::Tensor& input, const at::Tensor& target,
                                                   const std::optional<at::Tensor>& weight) {
  return {input.contiguous(), target.contiguous(),
          weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor()};
}

// One value per row in the op-math type (the rows' losses, log Σ exp and weights w_t).
inline at::Tensor per_row(const at::Tensor& input, int64_t rows) {
  return at::empty({rows}, input.options().dtype(at::toOpMathType(input.scalar_type())));
}

// `losses` and `weights` are the rows' loss and w_t in the op-math type.

// The loss in the input's dtype: per row (reduction 'none'), their sum, or Σ loss / Σ w_t ('mean').
inline at::Tensor reduce_cross_entropy(const at::Tensor& losses, const at::Tensor& total_weight,
                                       CrossEntropyReduction reduction, at::ScalarType dtype) {
  switch (reduction) {
    case CrossEntropyReduction::kNone:
      return losses.to(dtype);
    case CrossEntropyReduction::kSum:
      return losses.sum().to(dtype);
    default:
      return (losses.sum() / total_weight).to(dtype);
  }
}

// Each row's factor ∂L/∂loss_i in the op-math type, (rows,): grad_loss itself ('none'), or the one
// value of grad_loss, divided by Σ w_t for 'mean'.
inline at::Tensor cross_entropy_scales(const at::Tensor& grad_loss, const at::Tensor& total_weight,
                                       CrossEntropyReduction reduction, int64_t rows, at::ScalarType acc) {
  auto scale = grad_loss.to(acc);
  if (reduction == CrossEntropyReduction::kMean) {
    scale = scale / total_weight;
  }
  return reduction == CrossEntropyReduction::kNone ? scale.contiguous() : scale.expand({rows}).contiguous();
}

}  // namespace torchcnn
