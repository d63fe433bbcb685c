// The `sampling` family's CPU kernel (sampling.cpp): fused classifier-free-guidance sampling. Semantics, RNG
// included: fastmm/reference/sampling.py.
#pragma once

#include <cstdint>
#include <vector>

#include "tensor_arg.h"

namespace fastmm::entry {
// fastmm._C.cfg_sample: one id per row of B into out [B] int64, from logits [G*B, V] in a float dtype with unit
// stride along V (rows at least V apart), G = len(scales) + 1 groups of B rows. offset: None (step 0) or [1]
// int64, the RNG offset. 0 <= lo < hi <= V; temperature >= 0 (0: greedy); top_k >= 0 (0: off); top_p in (0, 1].
void cfg_sample(const TensorArg& logits, const TensorArg& offset, const TensorArg& out,
                const std::vector<double>& scales, double temperature, int64_t top_k, double top_p, int64_t lo,
                int64_t hi, bool log_softmax, uint32_t seed, int num_threads);
}  // namespace fastmm::entry
