// The CPU convolution algorithms (csrc/cpu/algorithms/), and what they share with the fused ops;
// the rule that picks one for a shape is conv2d.cpp's.
//
// Every algorithm computes the same three results — Y = X ⋆ W + b, ∂L/∂X and ∂L/∂W — on
// contiguous NCHW float or double tensors, into outputs the caller allocates (uninitialised):
//   gemm        im2col + GEMMs (gemm.h), several images' columns side by side in one product where
//               the planes are small (conv2d_gemm.cpp);
//   winograd    F(2×2, 3×3) for 3×3, stride-1 convolutions: 16 GEMMs over transformed tiles
//               instead of 36 multiplications per output pair (conv2d_winograd.cpp);
//   depthwise   a direct, vectorised kernel for one input channel per group (conv2d_depthwise.cpp);
//   direct      stride 1, any filter, groups and dilation: register blocks of output channels over
//               the padded input, no columns (conv2d_direct.cpp).
#pragma once

#include <ATen/Parallel.h>
#include <torch/all.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../shapes.h"

namespace torchcnn::cpu {

// Output columns ow whose tap ow·stride + offset falls inside [0, width): [lo, hi).
inline std::pair<int64_t, int64_t> valid_range(int64_t offset, int64_t stride, int64_t width, int64_t out) {
  const int64_t lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  const int64_t hi = width - offset <= 0 ? 0 : (width - offset + stride - 1) / stride;
  const int64_t clamped_hi = std::min(hi, out);
  return {std::min(lo, clamped_hi), clamped_hi};
}

// Calls body(chunk, begin, end) for contiguous ranges of [0, count), at most one per thread, in
// parallel. The split depends only on the count and the thread count, so a reduction over chunks
// is reproducible. Bodies run ATen ops on worker threads, which do not inherit the caller's
// dispatch state: the guard keeps autograd out of them (this runs inside a kernel).
inline int64_t parallel_chunks(int64_t count) {
  return std::max<int64_t>(1, std::min<int64_t>(count, at::get_num_threads()));
}

template <typename F>
void for_each_chunk(int64_t count, F&& body) {
  const int64_t chunks = parallel_chunks(count);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t c = c0; c < c1; ++c) {
      body(c, count * c / chunks, count * (c + 1) / chunks);
    }
  });
}

// Working memory kept per thread between calls, by slot: a fresh multi-megabyte allocation is
// handed back to the system when freed and page-faults in again, page by page, on every call.
// Grows as needed, never shrinks; valid until this thread asks for the same slot again.
enum class Slot { kColumns, kProducts, kGrads, kScratch, kConvOutput, kCount };

template <typename T>
T* workspace(Slot slot, int64_t size) {
  thread_local std::vector<char> buffers[static_cast<int>(Slot::kCount)];
  auto& buffer = buffers[static_cast<int>(slot)];
  const auto bytes = static_cast<size_t>(size) * sizeof(T);
  if (buffer.size() < bytes) {
    buffer = std::vector<char>();  // free the old one first
    buffer.resize(bytes);
  }
  return reinterpret_cast<T*>(buffer.data());
}

// The same as a tensor (of `like`'s dtype) over that memory — or, above 64 MiB (the columns of a
// large image, say), a tensor of its own, not kept: a thread should not hold that much for good.
inline at::Tensor workspace_tensor(Slot slot, at::IntArrayRef sizes, const at::Tensor& like) {
  int64_t numel = 1;
  for (const auto size : sizes) {
    numel *= size;
  }
  if (numel * like.element_size() > (int64_t{64} << 20)) {
    return at::empty(sizes, like.options());
  }
  void* data = AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "torchcnn::workspace", [&]() -> void* {
    return workspace<scalar_t>(slot, numel);
  });
  return at::from_blob(data, sizes, like.options());
}

// Runs body(chunk, begin, end) over a batch in groups of `per_product` images: split between the
// threads, each group's products on one thread — or, when one group is the whole batch, once on
// this thread, where each product splits its rows or columns between the threads instead (gemm.h).
template <typename F>
void for_each_image_group(int64_t batch, int64_t per_product, F&& body) {
  if (per_product >= batch) {
    body(int64_t{0}, int64_t{0}, batch);
  } else {
    for_each_chunk(batch, body);
  }
}

// conv2d.cpp: Y = X ⋆ W + b by the algorithm the rule picks, on checked float or double arguments
// in any layout, into `output` (contiguous NCHW, of the inputs' dtype). For the ops that start
// with a convolution.
void conv2d_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    const Conv2dGeometry& g, at::Tensor& output);

// conv2d_gemm.cpp
void gemm_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                  const Conv2dGeometry& g, int64_t images_per_product, at::Tensor& output);
void gemm_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, const Conv2dGeometry& g,
                         int64_t images_per_product, at::Tensor& grad_input);
void gemm_backward_weight(const at::Tensor& grad_output, const at::Tensor& input, const Conv2dGeometry& g,
                          int64_t images_per_product, at::Tensor& grad_weight);

// conv2d_winograd.cpp (3×3, stride 1, dilation 1, groups 1, padding ≤ 2)
void winograd_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                      const Conv2dGeometry& g, at::Tensor& output);
void winograd_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, const Conv2dGeometry& g,
                             at::Tensor& grad_input);
void winograd_backward_weight(const at::Tensor& grad_output, const at::Tensor& input, const Conv2dGeometry& g,
                              at::Tensor& grad_weight);

// conv2d_depthwise.cpp (one input channel per group)
void depthwise_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       const Conv2dGeometry& g, at::Tensor& output);
void depthwise_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, const Conv2dGeometry& g,
                              at::Tensor& grad_input);
void depthwise_backward_weight(const at::Tensor& grad_output, const at::Tensor& input, const Conv2dGeometry& g,
                               at::Tensor& grad_weight);

// conv2d_direct.cpp (stride 1, padding ≤ dilation · (kernel − 1))
// How the direct kernel lays one image's outputs into vectors of `lanes` entries: along the padded
// grid or along each output row (along_rows), whichever takes fewer; count of them.
struct DirectVectors {
  bool along_rows;
  int64_t count;
};
DirectVectors direct_vectors(const Conv2dGeometry& g, int64_t lanes);
// The share of those vectors' lanes that hold an output pixel, the vectors taken `runs` at a time.
double direct_lanes_used(const Conv2dGeometry& g, int64_t lanes, int64_t runs);
void direct_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    const Conv2dGeometry& g, at::Tensor& output);
void direct_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, const Conv2dGeometry& g,
                           at::Tensor& grad_input);
void direct_backward_weight(const at::Tensor& grad_output, const at::Tensor& input, const Conv2dGeometry& g,
                            at::Tensor& grad_weight);

}  // namespace torchcnn::cpu
