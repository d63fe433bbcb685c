// The `linear` family's CPU kernel (linear.cpp): y = x weight^T (+ bias) for the few rows of x of a decode step.
#pragma once

#include <cstdint>

#include "tensor_arg.h"

namespace fastmm {

// The kernel, for callers that checked their buffers (decode_layer.cpp). x [rows, in_features] and weight
// [out_features, in_features] are row-major with unit stride along in_features and the given row strides (in
// elements); bias [out_features] is contiguous or null; y [rows, out_features] is contiguous. All share the
// fastmm::DType `dtype`.
void skinny_linear(const void* x, int64_t x_row_stride, const void* weight, int64_t weight_row_stride,
                   const void* bias, void* y, int64_t rows, int64_t in_features, int64_t out_features, int dtype,
                   int num_threads);

namespace entry {
// fastmm._C.skinny_linear: x [M, K] (rows: unit stride along K) in a float dtype, weight [N, K] (rows) in x's
// dtype, bias [N] or None, y [M, N] written.
void skinny_linear(const TensorArg& x, const TensorArg& weight, const TensorArg& bias, const TensorArg& y,
                   int num_threads);
}  // namespace entry

}  // namespace fastmm
