// Shape arithmetic and argument checks shared by every backend (csrc/cpu, csrc/cuda).
// Each op validates its arguments here once and gets back a geometry struct that the kernels
// read; nothing in a kernel file re-derives an output size or re-checks an argument. (What only
// the data can tell — an index out of range — is checked where a kernel reads it.)
#pragma once

#include <ATen/OpMathType.h>
#include <torch/all.h>

#include <string>

namespace torchcnn {

// A kernel of k taps spaced d apart spans (k − 1)·d + 1 input pixels.
C10_HOST_DEVICE inline int64_t dilated_extent(int64_t kernel, int64_t dilation) {
  return (kernel - 1) * dilation + 1;
}

// a / b rounded towards −∞ (b > 0), as torch's div_rtn.
inline int64_t floor_div(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// Output length of a sliding window, torch's pooling_output_shape: window i starts at i·s − pad,
// and the last one must keep the dilated kernel inside the padded input, hence
// floor((in + 2p − extent) / s) + 1. ceil_mode rounds up instead (so the kernel may even be longer
// than the padded input), but, as in torch, the last window may not start inside the right
// padding. The result may be ≤ 0: the callers reject that.
inline int64_t window_output_size(
    int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation,
    bool ceil_mode = false) {
  const int64_t span = in + 2 * pad - dilated_extent(kernel, dilation) + (ceil_mode ? stride - 1 : 0);
  int64_t out = floor_div(span, stride) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) {
    --out;
  }
  return out;
}

// The spatial sizes and parameters of one 2-D sliding-window op (conv or pool), in one place.
struct Window2d {
  int64_t batch, channels, height, width;    // input (N, C, H, W)
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dilation_h, dilation_w;
  int64_t out_height, out_width;

  C10_HOST_DEVICE int64_t out_plane() const { return out_height * out_width; }
  C10_HOST_DEVICE int64_t in_plane() const { return height * width; }
};

struct Conv2dGeometry : Window2d {
  int64_t out_channels;
  int64_t groups;

  int64_t in_channels_per_group() const { return channels / groups; }
  int64_t out_channels_per_group() const { return out_channels / groups; }
  // Rows of one group's im2col matrix: C/g · KH · KW.
  int64_t group_kernel_size() const { return in_channels_per_group() * kernel_h * kernel_w; }
  // A 1×1, stride-1, unpadded conv reads the input as it is: no im2col needed.
  bool is_pointwise() const {
    return kernel_h == 1 && kernel_w == 1 && stride_h == 1 && stride_w == 1 && pad_h == 0 &&
        pad_w == 0;
  }
  std::vector<int64_t> output_sizes() const { return {batch, out_channels, out_height, out_width}; }
};

// torch's memory-format rule for a convolution's output and its gradients: channels_last if the
// input or the weight is — except float64 on CUDA, which cuDNN computes contiguous. The kernels
// compute in NCHW; the ops hand their results back in this format.
inline at::MemoryFormat conv2d_memory_format(const at::Tensor& input, const at::Tensor& weight) {
  const auto channels_last = at::MemoryFormat::ChannelsLast;
  if (input.is_cuda() && input.scalar_type() == at::kDouble) {
    return at::MemoryFormat::Contiguous;
  }
  return input.suggest_memory_format() == channels_last || weight.suggest_memory_format() == channels_last
      ? channels_last
      : at::MemoryFormat::Contiguous;
}

namespace detail {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

inline void check_pair(const char* op, const char* name, at::IntArrayRef v) {
  TORCH_CHECK_VALUE(v.size() == 2, op, ": expected ", name, " to have 2 elements (height, width) but got ",
                    v.size());
}

inline void check_positive(const char* op, const char* name, at::IntArrayRef v) {
  check_pair(op, name, v);
  TORCH_CHECK_VALUE(v[0] > 0 && v[1] > 0, op, ": expected ", name, " to be positive but got ", v);
}

inline void check_non_negative(const char* op, const char* name, at::IntArrayRef v) {
  check_pair(op, name, v);
  TORCH_CHECK_VALUE(v[0] >= 0 && v[1] >= 0, op, ": expected ", name, " to be non-negative but got ", v);
}

// The kernels' dtypes (float8 types are floating too, but no kernel takes them).
inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
                   op, ": expected ", name, " to have a floating-point dtype (float16, bfloat16, float32 or "
                   "float64) but got ", dtype);
}

inline void check_batched_image(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": expected ", name,
                    " to be a 4-D (N, C, H, W) tensor but got a ", t.dim(), "-D tensor of shape ",
                    shape_str(t));
  TORCH_CHECK_VALUE(t.size(1) > 0 && t.size(2) > 0 && t.size(3) > 0, op, ": expected ", name,
                    " to have non-zero channels, height and width but got shape ", shape_str(t));
}

inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK_VALUE(t.device() == input.device(), op, ": expected ", name,
                    " to be on the same device as input (", input.device(), ") but got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), op, ": expected ", name,
                   " to have the same dtype as input (", input.scalar_type(), ") but got ",
                   t.scalar_type());
}

inline void check_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                              at::IntArrayRef expected) {
  check_like(op, "grad_output", grad_output, input);
  TORCH_CHECK_VALUE(grad_output.sizes() == expected, op, ": expected grad_output of shape ", expected,
                    " but got ", shape_str(grad_output));
}

// Input sizes and window parameters (already checked to be pairs) into a geometry.
inline void set_window(Window2d& g, const at::Tensor& input, at::IntArrayRef kernel, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation) {
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.kernel_h = kernel[0];
  g.kernel_w = kernel[1];
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
}

}  // namespace detail

// Checks conv2d's arguments (torch.nn.functional.conv2d's rules) and returns its geometry.
inline Conv2dGeometry conv2d_geometry(
    const char* op, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  using namespace detail;
  check_batched_image(op, "input", input);
  check_floating(op, "input", input);
  TORCH_CHECK_VALUE(weight.dim() == 4, op, ": expected weight to be a 4-D (out_channels, in_channels/groups, kH, kW) "
                    "tensor but got a ", weight.dim(), "-D tensor of shape ", shape_str(weight));
  check_like(op, "weight", weight, input);
  check_positive(op, "stride", stride);
  check_non_negative(op, "padding", padding);
  check_positive(op, "dilation", dilation);
  TORCH_CHECK_VALUE(groups > 0, op, ": expected groups to be positive but got ", groups);

  Conv2dGeometry g;
  detail::set_window(g, input, {weight.size(2), weight.size(3)}, stride, padding, dilation);
  g.out_channels = weight.size(0);
  g.groups = groups;

  TORCH_CHECK_VALUE(g.out_channels > 0 && g.kernel_h > 0 && g.kernel_w > 0 && weight.size(1) > 0, op,
                    ": expected weight to have non-zero sizes but got shape ", shape_str(weight));
  TORCH_CHECK_VALUE(g.out_channels % groups == 0, op, ": expected out_channels (weight.size(0) = ",
                    g.out_channels, ") to be divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(weight.size(1) * groups == g.channels, op, ": expected input to have ",
                    weight.size(1) * groups, " channels (weight.size(1) = ", weight.size(1), " × groups = ",
                    groups, ") but got ", g.channels, " channels (input of shape ", shape_str(input), ")");
  if (bias.has_value() && bias->defined()) {
    check_like(op, "bias", *bias, input);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.out_channels, op,
                      ": expected bias to be a 1-D tensor of ", g.out_channels, " elements but got shape ",
                      shape_str(*bias));
  }
  const int64_t eff_kh = dilated_extent(g.kernel_h, g.dilation_h);
  const int64_t eff_kw = dilated_extent(g.kernel_w, g.dilation_w);
  TORCH_CHECK_VALUE(eff_kh <= g.height + 2 * g.pad_h && eff_kw <= g.width + 2 * g.pad_w, op,
                    ": kernel size (", eff_kh, ", ", eff_kw, ") after dilation is larger than the padded input (",
                    g.height + 2 * g.pad_h, ", ", g.width + 2 * g.pad_w, ")");
  g.out_height = window_output_size(g.height, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h);
  g.out_width = window_output_size(g.width, g.kernel_w, g.stride_w, g.pad_w, g.dilation_w);
  return g;
}

// Checks the arguments of conv2d's gradient ops: the forward's (without bias), then grad_output
// against the forward's output. Returns the forward's geometry.
inline Conv2dGeometry conv2d_backward_geometry(
    const char* op, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto g = conv2d_geometry(op, input, weight, std::nullopt, stride, padding, dilation, groups);
  detail::check_grad_output(op, grad_output, input, g.output_sizes());
  return g;
}

// Checks max_pool2d's arguments (torch.nn.functional.max_pool2d's rules) and returns its geometry.
inline Window2d max_pool2d_geometry(
    const char* op, const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode) {
  using namespace detail;
  check_batched_image(op, "input", input);
  check_floating(op, "input", input);
  check_positive(op, "kernel_size", kernel_size);
  check_positive(op, "stride", stride);
  check_non_negative(op, "padding", padding);
  check_positive(op, "dilation", dilation);

  Window2d g;
  detail::set_window(g, input, kernel_size, stride, padding, dilation);
  // torch's rule, on the undilated kernel. It does not make every window reach a real pixel: with
  // dilation > 1 the taps of a window that starts in the padding can step over the whole input
  // (H = 1, kernel 2, dilation 2, padding 1). Such a window's output is −inf, and it passes no
  // gradient (max_pool2d_window.h).
  TORCH_CHECK_VALUE(2 * g.pad_h <= g.kernel_h && 2 * g.pad_w <= g.kernel_w, op,
                    ": expected padding to be at most half of kernel_size, but got padding=", padding,
                    " and kernel_size=", kernel_size);
  g.out_height = window_output_size(g.height, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h, ceil_mode);
  g.out_width = window_output_size(g.width, g.kernel_w, g.stride_w, g.pad_w, g.dilation_w, ceil_mode);
  TORCH_CHECK_VALUE(g.out_height > 0 && g.out_width > 0, op, ": the (dilated) kernel (",
                    dilated_extent(g.kernel_h, g.dilation_h), ", ", dilated_extent(g.kernel_w, g.dilation_w),
                    ") is larger than the padded input (", g.height + 2 * g.pad_h, ", ", g.width + 2 * g.pad_w,
                    "); the output would be empty");
  return g;
}

// The 2×2, stride-2, unpadded, undilated pool of the design notes, which has a dedicated kernel.
inline bool is_pool_2x2_stride_2(const Window2d& g) {
  return g.kernel_h == 2 && g.kernel_w == 2 && g.stride_h == 2 && g.stride_w == 2 && g.pad_h == 0 &&
      g.pad_w == 0 && g.dilation_h == 1 && g.dilation_w == 1 && 2 * g.out_height <= g.height &&
      2 * g.out_width <= g.width;
}

// conv2d_relu_max_pool2d: the convolution's geometry, and that of the design notes' 2×2, stride-2
// max pool over its output (N, K, OH, OW), which needs at least one window (with ceil_mode a
// 1-pixel output has one).
struct Conv2dPoolGeometry {
  Conv2dGeometry conv;
  Window2d pool;
};

inline Conv2dPoolGeometry conv2d_relu_max_pool2d_geometry(
    const char* op, const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool ceil_mode) {
  Conv2dPoolGeometry g;
  g.conv = conv2d_geometry(op, input, weight, bias, stride, padding, dilation, groups);
  Window2d& p = g.pool;
  p.batch = g.conv.batch;
  p.channels = g.conv.out_channels;
  p.height = g.conv.out_height;
  p.width = g.conv.out_width;
  p.kernel_h = p.kernel_w = p.stride_h = p.stride_w = 2;
  p.pad_h = p.pad_w = 0;
  p.dilation_h = p.dilation_w = 1;
  p.out_height = window_output_size(p.height, 2, 2, 0, 1, ceil_mode);
  p.out_width = window_output_size(p.width, 2, 2, 0, 1, ceil_mode);
  TORCH_CHECK_VALUE(p.out_height > 0 && p.out_width > 0, op, ": the 2×2 max pool needs a convolution output of at "
                    "least 2×2 (1×1 with ceil_mode) but the convolution gives ", p.height, "×", p.width);
  return g;
}

// cross_entropy over rows of logits (rows, classes) with class-index targets.
enum class CrossEntropyReduction { kNone, kMean, kSum };

struct CrossEntropyGeometry {
  int64_t rows, classes;
  CrossEntropyReduction reduction;
};

inline CrossEntropyGeometry cross_entropy_geometry(
    const char* op, const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    c10::string_view reduction, double label_smoothing) {
  using namespace detail;
  TORCH_CHECK_VALUE(input.dim() == 2 && input.size(1) > 0, op, ": expected input to be a 2-D (rows, classes) "
                    "tensor with at least one class but got shape ", shape_str(input));
  check_floating(op, "input", input);
  TORCH_CHECK_VALUE(target.device() == input.device(), op, ": expected target to be on the same device as input (",
                    input.device(), ") but got ", target.device());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": expected target to hold class indices as int64 but got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == input.size(0), op, ": expected target of shape [",
                    input.size(0), "] but got ", shape_str(target));
  if (weight.has_value() && weight->defined()) {
    check_like(op, "weight", *weight, input);
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == input.size(1), op, ": expected weight to be a 1-D "
                      "tensor of ", input.size(1), " elements but got shape ", shape_str(*weight));
  }
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": expected label_smoothing to be in "
                    "[0, 1] but got ", label_smoothing);
  CrossEntropyGeometry g{input.size(0), input.size(1), CrossEntropyReduction::kMean};
  if (reduction == "none") {
    g.reduction = CrossEntropyReduction::kNone;
  } else if (reduction == "sum") {
    g.reduction = CrossEntropyReduction::kSum;
  } else {
    TORCH_CHECK_VALUE(reduction == "mean", op, ": expected reduction to be 'none', 'mean' or 'sum' but got '",
                      reduction, "'");
  }
  return g;
}

// Checks cross_entropy_backward's arguments: the forward's, then grad_loss (the loss's shape) and
// what the forward kept (per-row log Σ exp and the total weight, in the op-math type).
inline CrossEntropyGeometry cross_entropy_backward_geometry(
    const char* op, const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& log_sum_exp, const at::Tensor& total_weight,
    c10::string_view reduction, double label_smoothing) {
  const auto g = cross_entropy_geometry(op, input, target, weight, reduction, label_smoothing);
  const auto acc = at::toOpMathType(input.scalar_type());
  detail::check_like(op, "grad_loss", grad_loss, input);
  const bool per_row = g.reduction == CrossEntropyReduction::kNone;
  TORCH_CHECK_VALUE(per_row ? grad_loss.dim() == 1 && grad_loss.size(0) == g.rows : grad_loss.dim() == 0, op,
                    ": expected grad_loss of the loss's shape (", per_row ? "[rows]" : "a scalar", ") but got ",
                    detail::shape_str(grad_loss));
  TORCH_CHECK_VALUE(log_sum_exp.device() == input.device() && log_sum_exp.scalar_type() == acc &&
                    log_sum_exp.dim() == 1 && log_sum_exp.size(0) == g.rows, op,
                    ": expected log_sum_exp as the forward returned it (", g.rows, " values of ", acc, ") but got ",
                    log_sum_exp.scalar_type(), " of shape ", detail::shape_str(log_sum_exp));
  TORCH_CHECK_VALUE(total_weight.device() == input.device() && total_weight.scalar_type() == acc &&
                    total_weight.dim() == 0, op, ": expected total_weight as the forward returned it (a scalar of ",
                    acc, ") but got ", total_weight.scalar_type(), " of shape ", detail::shape_str(total_weight));
  return g;
}

// relu_backward's arguments: a floating gradient and a bool mask of its shape on its device, both
// returned laid out alike — as the mask is when it is dense (as relu and the fused ops make it; the
// gradient copied into its layout if need be), else contiguous.
inline std::pair<at::Tensor, at::Tensor> relu_backward_layout(const char* op, const at::Tensor& grad_output,
                                                              const at::Tensor& passes) {
  detail::check_floating(op, "grad_output", grad_output);
  TORCH_CHECK_TYPE(passes.scalar_type() == at::kBool, op, ": expected passes to be a bool tensor but got ",
                   passes.scalar_type());
  TORCH_CHECK_VALUE(passes.device() == grad_output.device(), op, ": expected passes to be on the same device as "
                    "grad_output (", grad_output.device(), ") but got ", passes.device());
  TORCH_CHECK_VALUE(passes.sizes() == grad_output.sizes(), op, ": expected passes of grad_output's shape ",
                    grad_output.sizes(), " but got ", detail::shape_str(passes));
  if (!passes.is_non_overlapping_and_dense()) {
    return {grad_output.contiguous(), passes.contiguous()};
  }
  if (grad_output.strides() == passes.strides()) {
    return {grad_output, passes};
  }
  return {at::empty_like(passes, grad_output.options()).copy_(grad_output), passes};
}

// Checks the arguments of conv2d_relu_max_pool2d's sparse backward (the CPU's): the forward's, then
// grad_output, indices and passes against the pooled output. Returns the forward's geometry.
inline Conv2dPoolGeometry conv2d_relu_max_pool2d_backward_geometry(
    const char* op, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& indices, const at::Tensor& passes, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, bool ceil_mode) {
  const auto geometry = conv2d_relu_max_pool2d_geometry(op, input, weight, std::nullopt, stride, padding, dilation,
                                                         groups, ceil_mode);
  const std::vector<int64_t> pooled = {geometry.conv.batch, geometry.conv.out_channels, geometry.pool.out_height,
                                       geometry.pool.out_width};
  detail::check_grad_output(op, grad_output, input, pooled);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong && indices.device() == input.device() &&
                   indices.sizes() == at::IntArrayRef(pooled), op, ": expected indices to be an int64 tensor "
                   "of shape ", at::IntArrayRef(pooled), " on ", input.device(), " but got ",
                   indices.scalar_type(), " of shape ", detail::shape_str(indices), " on ", indices.device());
  TORCH_CHECK_TYPE(passes.scalar_type() == at::kBool && passes.device() == input.device() &&
                   passes.sizes() == at::IntArrayRef(pooled), op, ": expected passes to be a bool tensor "
                   "of shape ", at::IntArrayRef(pooled), " on ", input.device(), " but got ",
                   passes.scalar_type(), " of shape ", detail::shape_str(passes), " on ", passes.device());
  return geometry;
}

// Checks max_pool2d_backward's arguments: the forward's, then grad_output and indices against the
// forward's output. Returns the forward's geometry.
inline Window2d max_pool2d_backward_geometry(
    const char* op, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    bool ceil_mode) {
  const auto g = max_pool2d_geometry(op, input, kernel_size, stride, padding, dilation, ceil_mode);
  const std::vector<int64_t> out_sizes = {g.batch, g.channels, g.out_height, g.out_width};
  detail::check_grad_output(op, grad_output, input, out_sizes);
  TORCH_CHECK_VALUE(indices.device() == input.device(), op,
                    ": expected indices to be on the same device as input (", input.device(), ") but got ",
                    indices.device());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op, ": expected indices to be int64 but got ",
                   indices.scalar_type());
  TORCH_CHECK_VALUE(indices.sizes() == at::IntArrayRef(out_sizes), op, ": expected indices of shape ",
                    at::IntArrayRef(out_sizes), " but got ", detail::shape_str(indices));
  return g;
}

}  // namespace torchcnn
