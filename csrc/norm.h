// The `norm` family's CPU kernels (norm.cpp): modality-adaptive RMSNorm / LayerNorm, forward and backward.
// Tensors are raw, contiguous, row-major buffers of `rows` x `dim` elements in the fastmm::DType `dtype`
// (statistics and weight gradients in fp32); absent optional tensors are null. Callers validate shapes,
// dtypes and modality ids in [0, num_modalities) before the call (fastmm/native/norm.py).
#pragma once

#include <cstdint>

namespace fastmm {
void rms_norm_fwd(const void* x, const int64_t* modality, const void* weight, const void* residual, void* y,
                  void* residual_out, float* rstd, int64_t rows, int64_t dim, double eps, int dtype,
                  int num_threads);
void layer_norm_fwd(const void* x, const int64_t* modality, const void* weight, const void* bias,
                    const void* residual, void* y, void* residual_out, float* mean, float* rstd, int64_t rows,
                    int64_t dim, double eps, int dtype, int num_threads);
void rms_norm_bwd(const void* dy, const void* dresidual_out, const void* x, const int64_t* modality,
                  const void* weight, const float* rstd, void* dx, float* dweight, int64_t rows, int64_t dim,
                  int64_t num_modalities, int dtype, int num_threads);
void layer_norm_bwd(const void* dy, const void* dresidual_out, const void* x, const int64_t* modality,
                    const void* weight, const float* mean, const float* rstd, void* dx, float* dweight,
                    float* dbias, int64_t rows, int64_t dim, int64_t num_modalities, int dtype,
                    int num_threads);
}  // namespace fastmm
