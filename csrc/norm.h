// The `norm` family's CPU kernels (norm.cpp): modality-adaptive RMSNorm / LayerNorm, forward and backward.
#pragma once

#include <cstdint>

#include "tensor_arg.h"

namespace fastmm {

// The RMSNorm forward kernel, for callers that checked their buffers (decode_layer.cpp): raw, contiguous,
// row-major buffers of `rows` x `dim` elements in the fastmm::DType `dtype`, rstd in fp32, modality ids in
// [0, M) for a weight of M rows; residual and residual_out both null or both given.
void rms_norm_fwd(const void* x, const int64_t* modality, const void* weight, const void* residual, void* y,
                  void* residual_out, float* rstd, int64_t rows, int64_t dim, double eps, int dtype,
                  int num_threads);

// The entry points, fastmm._C.<name>. Every tensor is contiguous. x (x_in: the tensor that was normalized)
// [T, D] in a float dtype; modality [T] int64 with ids in [0, M); weight, bias [M, D] in x's dtype; residual
// and the gradients of activations [T, D] in x's dtype; mean, rstd [T] float32; dweight, dbias [M, D] float32.
// Optional tensors may be None (residual_out exactly when residual is). Outputs are written, gradients of the
// parameters overwritten.
namespace entry {
void rms_norm_fwd(const TensorArg& x, const TensorArg& modality, const TensorArg& weight, const TensorArg& residual,
                  const TensorArg& y, const TensorArg& residual_out, const TensorArg& rstd, double eps,
                  int num_threads);
void layer_norm_fwd(const TensorArg& x, const TensorArg& modality, const TensorArg& weight, const TensorArg& bias,
                    const TensorArg& residual, const TensorArg& y, const TensorArg& residual_out,
                    const TensorArg& mean, const TensorArg& rstd, double eps, int num_threads);
void rms_norm_bwd(const TensorArg& dy, const TensorArg& dresidual_out, const TensorArg& x_in,
                  const TensorArg& modality, const TensorArg& weight, const TensorArg& rstd, const TensorArg& dx,
                  const TensorArg& dweight, int num_threads);
void layer_norm_bwd(const TensorArg& dy, const TensorArg& dresidual_out, const TensorArg& x_in,
                    const TensorArg& modality, const TensorArg& weight, const TensorArg& mean,
                    const TensorArg& rstd, const TensorArg& dx, const TensorArg& dweight, const TensorArg& dbias,
                    int num_threads);
}  // namespace entry

}  // namespace fastmm
