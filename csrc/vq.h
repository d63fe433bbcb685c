// The `vq` family's CPU kernel (vq.cpp): nearest-code search, argmin_k (codebook_sq[k] - 2 z.codebook[k]),
// without the N x K score matrix. z is read through its strides (channels-first maps arrive as a transposed
// view); codebook is a contiguous [num_codes, dim] buffer in the fastmm::DType `dtype`, codebook_sq fp32.
// Callers validate shapes, dtypes and that every strided access stays in bounds (fastmm/native/vq.py).
#pragma once

#include <cstdint>

namespace fastmm {
void nearest_code(const void* z, int64_t batch, int64_t seq, int64_t dim, int64_t stride_batch,
                  int64_t stride_seq, int64_t stride_dim, const void* codebook, const float* codebook_sq,
                  int64_t num_codes, int64_t* indices, int dtype, int num_threads);
}  // namespace fastmm
