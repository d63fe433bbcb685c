// The `linear` family's CPU kernel (linear.cpp): y = x weight^T (+ bias) for the few rows of x of a decode step.
// x [rows, in_features] and weight [out_features, in_features] are row-major with unit stride along
// in_features and the given row strides (in elements); bias [out_features] is contiguous or null; y
// [rows, out_features] is contiguous. All share the fastmm::DType `dtype`. Callers validate shapes, dtypes and
// that every row stays inside its buffer (fastmm/native/linear.py).
#pragma once

#include <cstdint>

namespace fastmm {
void skinny_linear(const void* x, int64_t x_row_stride, const void* weight, int64_t weight_row_stride,
                   const void* bias, void* y, int64_t rows, int64_t in_features, int64_t out_features, int dtype,
                   int num_threads);
}  // namespace fastmm
