// The `vq` family's CPU kernel (vq.cpp): nearest-code search, argmin_k (codebook_sq[k] - 2 z.codebook[k]),
// without the N x K score matrix.
#pragma once

#include "tensor_arg.h"

namespace fastmm::entry {
// fastmm._C.nearest_code: z [B, S, D] in a float dtype, read through any non-negative strides (channels-first
// maps arrive as a transposed view); codebook [K, D] contiguous in z's dtype, K >= 1; codebook_sq [K] float32;
// indices [B, S] int64 written.
void nearest_code(const TensorArg& z, const TensorArg& codebook, const TensorArg& codebook_sq,
                  const TensorArg& indices, int num_threads);
}  // namespace fastmm::entry
