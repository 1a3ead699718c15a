// conv2d on the CPU: the ops' kernels, and the rule that picks an algorithm for each shape.
//
// The algorithms (conv2d_algorithms.h) compute in float or double on contiguous NCHW tensors;
// here the arguments are checked (shapes.h), reduced-precision inputs are computed in float32 and
// rounded once at the end, and results go back in torch's memory format.
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <string>

#include "conv2d_algorithms.h"
#include "algorithms/gemm.h"

namespace torchcnn::cpu {
namespace {

// The rule, in one place. Thresholds measured on the development VM (docs/BENCHMARKS.md):
// - one input channel per group: the depthwise kernel — a GEMM would contract over KH·KW values
//   only — for depthwise convolutions, and for a one-channel image while its filters hold fewer
//   than kDirectMaxFilterValues values (K·KH·KW: 1→8 3×3 is 0.40× torch's time that way, 0.66× by
//   GEMM; from 1→32 3×3, or 5×5 filters, the GEMM's reuse wins: 1→16 5×5 0.35× against 0.72×);
// - stride 1 with padding ≤ dilation · (kernel − 1), several input channels per group, not
//   pointwise, a group's padded input and output planes within kDirectMaxPlanes entries, and
//   either grouped, or filters of more than 3×3 taps, or fewer than kDirectMaxChannels input
//   channels: the direct kernel (conv2d_direct.cpp), with no columns. Forward + backward against
//   torch's: RegNet-like 8 groups of 8 at 16×16 3.26× by GEMM, 1.18× direct; ResNeXt-like 32
//   groups of 4 1.63× → 0.38×; 7×7 16→32 at 14×14 2.84× → 1.58×; 5×5 64→64 at 16×16
//   2.45× → 1.34×; 3×3 8→16 at 28×28 1.80× by Winograd, 0.98× direct; from 24 channels on
//   Winograd wins (24→32 at 12×12: 1.03× against 1.16×), and so does the GEMM where fewer than
//   kDirectMinLanesUsed of the direct kernel's vector lanes would hold an output pixel (AlexNet's
//   5×5 64→192 at 7×7: 2.0× by GEMM, 2.8× direct with half its lanes idle);
// - 3×3, stride 1, undilated, ungrouped, with at least 8 channels in and out (24 in, but for
//   planes too large for the direct kernel) and 512 output pixels in the batch: Winograd
//   F(2×2, 3×3) (2.25× fewer multiplications; with fewer channels or pixels, transforming the
//   filters and tiles costs more than it saves);
// - a pointwise convolution (1×1, stride 1, unpadded) of planes of at least kPointwiseMinPlane
//   pixels: one product per image, on the input itself, without columns (SqueezeNet's 128→16 at
//   15×15: 0.98× against 1.93× with the images' columns copied together; only planes of a few
//   pixels make products too thin to beat that copy);
// - anything else: im2col + GEMM, with as many images' columns per product as give it about
//   kGemmColumns columns (planes at least that large get one product per image), within
//   kColumnBytes of column buffer.
constexpr int64_t kDirectMaxFilterValues = 256;
constexpr int64_t kPointwiseMinPlane = 64;
constexpr int64_t kDirectMaxChannels = 24;
constexpr int64_t kDirectMaxPlanes = int64_t{1} << 20;
constexpr double kDirectMinLanesUsed = 0.75;
constexpr int64_t kWinogradMinChannels = 8;
constexpr int64_t kWinogradMinPixels = 512;
constexpr int64_t kGemmColumns = 1024;
constexpr int64_t kColumnBytes = int64_t{32} << 20;

bool depthwise_applies(const Conv2dGeometry& g) {
  return g.in_channels_per_group() == 1;
}

bool direct_applies(const Conv2dGeometry& g) {
  return g.stride_h == 1 && g.stride_w == 1 && g.pad_h <= g.dilation_h * (g.kernel_h - 1) &&
      g.pad_w <= g.dilation_w * (g.kernel_w - 1);
}

bool winograd_applies(const Conv2dGeometry& g) {
  return g.kernel_h == 3 && g.kernel_w == 3 && g.stride_h == 1 && g.stride_w == 1 && g.dilation_h == 1 &&
      g.dilation_w == 1 && g.groups == 1 && g.pad_h <= 2 && g.pad_w <= 2;
}

int64_t gemm_images_per_product(const Conv2dGeometry& g, int64_t element_size, bool batched) {
  if (!batched) {
    return 1;
  }
  const int64_t plane = g.out_plane();
  const int64_t column_bytes = g.channels * g.kernel_h * g.kernel_w * plane * element_size;
  // A whole batch of at most 2·kGemmColumns columns is one product, which the threads share.
  const int64_t wanted = g.batch * plane <= 2 * kGemmColumns ? g.batch
                                                             : std::max<int64_t>(2, (kGemmColumns + plane - 1) / plane);
  const int64_t fit = std::max<int64_t>(1, kColumnBytes / std::max<int64_t>(column_bytes, 1));
  return std::max<int64_t>(1, std::min({wanted, fit, g.batch}));
}

// The strategies by name, as the private ops below report and accept them.
enum class Strategy { kGemmPerImage, kGemmBatched, kWinograd, kDepthwise, kDirect };
constexpr const char* kStrategyNames[] = {"gemm_per_image", "gemm_batched", "winograd", "depthwise", "direct"};

// A strategy the tests force where it applies (-1: none).
std::atomic<int> forced_strategy{-1};

bool applies(Strategy s, const Conv2dGeometry& g) {
  switch (s) {
    case Strategy::kWinograd:
      return winograd_applies(g);
    case Strategy::kDepthwise:
      return depthwise_applies(g);
    case Strategy::kDirect:
      return direct_applies(g);
    default:
      return true;
  }
}

Strategy choose(const Conv2dGeometry& g) {
  const int forced = forced_strategy.load();
  if (forced >= 0 && applies(static_cast<Strategy>(forced), g)) {
    return static_cast<Strategy>(forced);
  }
  if (depthwise_applies(g) &&
      (g.groups > 1 || g.out_channels * g.kernel_h * g.kernel_w < kDirectMaxFilterValues)) {
    return Strategy::kDepthwise;
  }
  const int64_t cg = g.in_channels_per_group();
  const int64_t padded_plane = (g.height + 2 * g.pad_h) * (g.width + 2 * g.pad_w);
  if (direct_applies(g) && !g.is_pointwise() && cg > 1 &&
      (cg + g.out_channels_per_group()) * padded_plane <= kDirectMaxPlanes &&
      (g.groups > 1 || g.kernel_h * g.kernel_w > 9 || cg < kDirectMaxChannels) &&
      // Lanes counted in 16 (the AVX-512 tier's floats; AVX2's 8 idle fewer), two vectors at a
      // time as the kernel takes them, at every tier: the rule is the same on every CPU.
      (cg < kDirectMaxChannels || direct_lanes_used(g, 16, 2) >= kDirectMinLanesUsed)) {
    return Strategy::kDirect;
  }
  if (winograd_applies(g) && g.channels >= kWinogradMinChannels && g.out_channels >= kWinogradMinChannels &&
      g.batch * g.out_plane() >= kWinogradMinPixels) {
    return Strategy::kWinograd;
  }
  if (g.is_pointwise() && g.out_plane() >= kPointwiseMinPlane) {
    return Strategy::kGemmPerImage;
  }
  return g.out_plane() >= kGemmColumns ? Strategy::kGemmPerImage : Strategy::kGemmBatched;
}

// The GEMM strategies' images per product.
int64_t images_per_product(Strategy s, const Conv2dGeometry& g, int64_t element_size) {
  return gemm_images_per_product(g, element_size, s == Strategy::kGemmBatched);
}

bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

at::Tensor to_float(const at::Tensor& t) {
  return t.defined() ? t.to(at::kFloat) : t;
}

at::Tensor backward_input(const at::Tensor& grad_output_, const at::Tensor& weight_, const Conv2dGeometry& g) {
  const auto grad_output = grad_output_.contiguous();
  const auto weight = weight_.contiguous();
  const auto s = choose(g);
  auto grad_input = at::empty({g.batch, g.channels, g.height, g.width}, grad_output.options());
  if (g.batch == 0) {
    return grad_input;
  }
  switch (s) {
    case Strategy::kDepthwise:
      depthwise_backward_input(grad_output, weight, g, grad_input);
      break;
    case Strategy::kWinograd:
      winograd_backward_input(grad_output, weight, g, grad_input);
      break;
    case Strategy::kDirect:
      direct_backward_input(grad_output, weight, g, grad_input);
      break;
    default:
      gemm_backward_input(grad_output, weight, g, images_per_product(s, g, grad_output.element_size()), grad_input);
  }
  return grad_input;
}

at::Tensor backward_weight(const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& weight,
                           const Conv2dGeometry& g) {
  const auto grad_output = grad_output_.contiguous();
  const auto input = input_.contiguous();
  auto grad_weight = at::empty(weight.sizes(), input.options());
  if (g.batch == 0) {
    return grad_weight.zero_();
  }
  const auto s = choose(g);
  if (s == Strategy::kDepthwise) {
    depthwise_backward_weight(grad_output, input, g, grad_weight);
  } else if (s == Strategy::kWinograd) {
    winograd_backward_weight(grad_output, input, g, grad_weight);
  } else if (s == Strategy::kDirect) {
    direct_backward_weight(grad_output, input, g, grad_weight);
  } else {
    gemm_backward_weight(grad_output, input, g, images_per_product(s, g, input.element_size()), grad_weight);
  }
  return grad_weight;
}

// The ops' CPU kernels.

at::Tensor conv2d_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias_,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto g = conv2d_geometry("conv2d", input, weight, bias_, stride, padding, dilation, groups);
  const auto bias = bias_.has_value() ? *bias_ : at::Tensor();
  const auto format = conv2d_memory_format(input, weight);
  if (is_reduced(input)) {
    auto output = at::empty(g.output_sizes(), input.options().dtype(at::kFloat));
    conv2d_forward(to_float(input), to_float(weight), to_float(bias), g, output);
    return output.to(input.scalar_type(), false, false, format);
  }
  auto output = at::empty(g.output_sizes(), input.options());
  conv2d_forward(input, weight, bias, g, output);
  return output.contiguous(format);
}

at::Tensor conv2d_backward_input_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto g = conv2d_backward_geometry("conv2d_backward_input", grad_output, input, weight, stride, padding,
                                          dilation, groups);
  const auto format = conv2d_memory_format(input, weight);
  if (is_reduced(input)) {
    return backward_input(to_float(grad_output), to_float(weight), g).to(input.scalar_type(), false, false, format);
  }
  return backward_input(grad_output, weight, g).contiguous(format);
}

at::Tensor conv2d_backward_weight_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto g = conv2d_backward_geometry("conv2d_backward_weight", grad_output, input, weight, stride, padding,
                                          dilation, groups);
  const auto format = conv2d_memory_format(input, weight);
  if (is_reduced(input)) {
    return backward_weight(to_float(grad_output), to_float(input), weight, g)
        .to(input.scalar_type(), false, false, format);
  }
  return backward_weight(grad_output, input, weight, g).contiguous(format);
}

// Private ops for tests and benchmarks (outside the op contract, torchcnn/_ops/schemas.py).

// The strategy the CPU kernels take for a conv2d of these sizes (arguments checked as conv2d's).
std::string strategy_for(at::IntArrayRef input_size, at::IntArrayRef weight_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto options = at::TensorOptions().dtype(at::kFloat).device(at::kMeta);
  const auto g = conv2d_geometry("_cpu_conv2d_strategy", at::empty(input_size, options),
                                 at::empty(weight_size, options), std::nullopt, stride, padding, dilation, groups);
  return kStrategyNames[static_cast<int>(choose(g))];
}

// Makes the kernels take `name` wherever it applies ("" for the rule again); returns the previous.
std::string force_strategy(const std::string& name) {
  int wanted = -1;
  if (!name.empty()) {
    const auto* found = std::find(std::begin(kStrategyNames), std::end(kStrategyNames), name);
    TORCH_CHECK_VALUE(found != std::end(kStrategyNames), "_cpu_conv2d_force_strategy: expected name to be one of "
                      "gemm_per_image, gemm_batched, winograd, depthwise, direct or '' but got '", name, "'");
    wanted = static_cast<int>(found - std::begin(kStrategyNames));
  }
  const int previous = forced_strategy.exchange(wanted);
  return previous < 0 ? "" : kStrategyNames[previous];
}

// a · b by the CPU convolutions' GEMM (gemm.h), for the tests.
at::Tensor matmul_op(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "_cpu_matmul";
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), op,
                    ": expected matrices a (m × k) and b (k × n) but got shapes ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(a.is_cpu() && b.is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type() && at::isFloatingType(a.scalar_type()), op,
                   ": expected a and b of one floating-point dtype but got ", a.scalar_type(), " and ", b.scalar_type());
  auto c = at::empty({a.size(0), b.size(1)}, a.options());
  matmul(c, a, b);
  return c;
}

}  // namespace

// The forward, for every op that starts with a convolution (conv2d_algorithms.h).
void conv2d_forward(const at::Tensor& input_, const at::Tensor& weight_, const at::Tensor& bias_,
                    const Conv2dGeometry& g, at::Tensor& output) {
  TORCH_INTERNAL_ASSERT(output.is_contiguous() && output.scalar_type() == input_.scalar_type() &&
                        output.sizes() == at::IntArrayRef(g.output_sizes()));
  if (g.batch == 0) {
    return;
  }
  const auto input = input_.contiguous();
  const auto weight = weight_.contiguous();
  const auto bias = bias_.defined() ? bias_.contiguous() : bias_;
  const auto s = choose(g);
  switch (s) {
    case Strategy::kDepthwise:
      depthwise_forward(input, weight, bias, g, output);
      break;
    case Strategy::kWinograd:
      winograd_forward(input, weight, bias, g, output);
      break;
    case Strategy::kDirect:
      direct_forward(input, weight, bias, g, output);
      break;
    default:
      gemm_forward(input, weight, bias, g, images_per_product(s, g, input.element_size()), output);
  }
}

TORCH_LIBRARY_IMPL(torchcnn, CPU, m) {
  m.impl("conv2d", &conv2d_cpu);
  m.impl("conv2d_backward_input", &conv2d_backward_input_cpu);
  m.impl("conv2d_backward_weight", &conv2d_backward_weight_cpu);
}

TORCH_LIBRARY_FRAGMENT(torchcnn, m) {
  m.def("_cpu_conv2d_strategy(int[] input_size, int[] weight_size, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> str", &strategy_for);
  m.def("_cpu_conv2d_force_strategy(str name) -> str", &force_strategy);
  m.def("_cpu_set_gemm(str name) -> str", &set_gemm);
  m.def("_cpu_matmul(Tensor a, Tensor b) -> Tensor", &matmul_op);
}

}  // namespace torchcnn::cpu
