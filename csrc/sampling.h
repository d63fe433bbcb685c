// The `sampling` family's CPU kernel (sampling.cpp): fused classifier-free-guidance sampling. logits is
// [groups * batch, vocab] in the fastmm::DType `dtype`, rows `row_stride` elements apart, unit stride along the
// vocabulary; offset is null (step 0) or one int64; out receives batch int64 ids. Semantics, RNG included:
// fastmm/reference/sampling.py. Callers validate shapes, dtypes and buffer bounds (fastmm/native/sampling.py).
#pragma once

#include <cstdint>

namespace fastmm {
void cfg_sample(const void* logits, int64_t batch, int64_t groups, int64_t vocab, int64_t row_stride, double scale0,
                double scale1, double temperature, int64_t top_k, double top_p, int64_t lo, int64_t hi,
                bool log_softmax, uint32_t seed, const int64_t* offset, int64_t* out, int dtype, int num_threads);
}  // namespace fastmm
