// norm family: modality-adaptive RMSNorm and LayerNorm (mPLUG-Owl2), forward and backward.
//
// Row t of x is normalized with the parameters of its modality m_t. RMSNorm is LayerNorm without the mean:
// one row kernel serves both, templated on kCenter (subtract the mean or not), so the two cannot drift apart.
// All math in fp32 on 16-lane blocks (common.h), one rounding on store. A row (16 KiB at D = 4096 fp32) stays
// in L1/L2 between the statistics pass and the output pass, so memory sees one read of each input and one
// write of each output per row.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "module.h"
#include "norm.h"

namespace fastmm {
namespace {

// ---- one row ----------------------------------------------------------------------------------------------

template <typename T>
float row_sum(const T* x, int64_t dim) {
  return sum_blocks(dim, [=](int64_t j, auto n) { return load_block(x + j, n); });
}

// sum_j (x_j - mean)^2; mean = 0 gives RMSNorm's sum of squares.
template <typename T>
float centered_sum_squares(const T* x, float mean, int64_t dim) {
  return sum_blocks(dim, [=](int64_t j, auto n) {
    const f32x16 c = load_block(x + j, n) - mean;
    return c * c;
  });
}

// s = x + residual, rounded to T: the residual stream an unfused pipeline would hand the norm.
template <typename T>
void add_rows(const T* x, const T* residual, T* s, int64_t dim) {
  for_each_block(dim, [=](int64_t j, auto n) {
    store_block(s + j, load_block(x + j, n) + load_block(residual + j, n), n);
  });
}

// y = (x - mean) * rstd * w (+ b), in the reference's order of operations.
template <typename T>
void normalize_row(const T* x, const T* w, const T* b, float mean, float rstd, T* y, int64_t dim) {
  for_each_block(dim, [=](int64_t j, auto n) {
    f32x16 v = (load_block(x + j, n) - mean) * rstd * load_block(w + j, n);
    if (b) v += load_block(b + j, n);
    store_block(y + j, v, n);
  });
}

// sum_j g_j and sum_j g_j * xhat_j with g = dy * w, xhat = (x - mean) * rstd: the two means in dx.
template <typename T>
float sum_g(const T* dy, const T* w, int64_t dim) {
  return sum_blocks(dim, [=](int64_t j, auto n) { return load_block(dy + j, n) * load_block(w + j, n); });
}

template <typename T>
float sum_g_xhat(const T* dy, const T* x, const T* w, float mean, float rstd, int64_t dim) {
  return sum_blocks(dim, [=](int64_t j, auto n) {
    return load_block(dy + j, n) * load_block(w + j, n) * ((load_block(x + j, n) - mean) * rstd);
  });
}

// dx = rstd * (g - mean_g - xhat * mean_g_xhat) (+ dres, the gradient of residual_out), one rounding;
// dweight += dy * xhat and dbias += dy into this thread's fp32 partials.
template <typename T>
void backward_row(const T* dy, const T* dres, const T* x, const T* w, float mean, float rstd, float mean_g,
                  float mean_g_xhat, T* dx, float* dweight, float* dbias, int64_t dim) {
  for_each_block(dim, [=](int64_t j, auto n) {
    const f32x16 dyv = load_block(dy + j, n);
    const f32x16 xhat = (load_block(x + j, n) - mean) * rstd;
    f32x16 v = rstd * (dyv * load_block(w + j, n) - mean_g - xhat * mean_g_xhat);
    if (dres) v += load_block(dres + j, n);
    store_block(dx + j, v, n);
    store_block(dweight + j, load_block(dweight + j, n) + dyv * xhat, n);
    if (dbias) store_block(dbias + j, load_block(dbias + j, n) + dyv, n);
  });
}

// out[i] = sum over threads of partials[thread * n + i]: the per-thread dweight / dbias buffers.
void reduce_partials(const std::vector<float>& partials, int threads, int64_t n, float* out,
                     int num_threads) {
  parallel_for(n, num_threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t i = begin; i < end; ++i) {
      float acc = 0.f;
      for (int t = 0; t < threads; ++t) acc += partials[t * n + i];
      out[i] = acc;
    }
  });
}

// ---- whole tensors ----------------------------------------------------------------------------------------

struct FwdArgs {
  const void* x;            // [rows, dim]
  const int64_t* modality;  // [rows], values in [0, M)
  const void* weight;       // [M, dim]
  const void* bias;         // [M, dim] or null
  const void* residual;     // [rows, dim] or null
  void* y;                  // [rows, dim]
  void* residual_out;       // [rows, dim], null iff residual is null
  float* mean;              // [rows] or null (RMSNorm)
  float* rstd;              // [rows]
  int64_t rows, dim;
  float eps;
};

template <typename T, bool kCenter>
void norm_fwd(const FwdArgs& a, int num_threads) {
  const T* x = static_cast<const T*>(a.x);
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  const T* residual = static_cast<const T*>(a.residual);
  T* y = static_cast<T*>(a.y);
  T* residual_out = static_cast<T*>(a.residual_out);
  const int64_t dim = a.dim;
  const float inv_dim = 1.f / static_cast<float>(dim);

  parallel_for(a.rows, num_threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t off = t * dim;
      const T* src = x + off;
      if (residual) {
        add_rows(src, residual + off, residual_out + off, dim);
        src = residual_out + off;  // normalize the rounded sum, still in L1
      }
      const float mean = kCenter ? row_sum(src, dim) * inv_dim : 0.f;
      const float rstd = 1.f / std::sqrt(centered_sum_squares(src, mean, dim) * inv_dim + a.eps);
      const int64_t m = a.modality[t];
      normalize_row(src, weight + m * dim, bias ? bias + m * dim : nullptr, mean, rstd, y + off, dim);
      if (kCenter) a.mean[t] = mean;
      a.rstd[t] = rstd;
    }
  });
}

struct BwdArgs {
  const void* dy;           // [rows, dim]
  const void* dres;         // [rows, dim] or null: gradient of residual_out, added to dx
  const void* x;            // [rows, dim]: the tensor that was normalized
  const int64_t* modality;  // [rows]
  const void* weight;       // [M, dim]
  const float* mean;        // [rows] or null (RMSNorm)
  const float* rstd;        // [rows]
  void* dx;                 // [rows, dim]
  float* dweight;           // [M, dim]
  float* dbias;             // [M, dim] or null
  int64_t rows, dim, num_modalities;
};

template <typename T, bool kCenter>
void norm_bwd(const BwdArgs& a, int num_threads) {
  const T* dy = static_cast<const T*>(a.dy);
  const T* dres = static_cast<const T*>(a.dres);
  const T* x = static_cast<const T*>(a.x);
  const T* weight = static_cast<const T*>(a.weight);
  T* dx = static_cast<T*>(a.dx);
  const int64_t dim = a.dim;
  const float inv_dim = 1.f / static_cast<float>(dim);

  // Each thread sums its rows' dweight (and dbias) into its own [M, dim] buffer: no atomics, no sharing.
  const int64_t param_size = a.num_modalities * dim;
  const int threads = team_size(a.rows, num_threads);
  std::vector<float> dweight_parts(threads * param_size, 0.f);
  std::vector<float> dbias_parts(a.dbias ? threads * param_size : 0, 0.f);

  parallel_for(a.rows, num_threads, [&](int64_t begin, int64_t end, int thread) {
    float* dweight_part = dweight_parts.data() + thread * param_size;
    float* dbias_part = a.dbias ? dbias_parts.data() + thread * param_size : nullptr;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t off = t * dim;
      const int64_t m = a.modality[t];
      const T* w = weight + m * dim;
      const float mean = kCenter ? a.mean[t] : 0.f;
      const float rstd = a.rstd[t];
      const float mean_g = kCenter ? sum_g(dy + off, w, dim) * inv_dim : 0.f;
      const float mean_g_xhat = sum_g_xhat(dy + off, x + off, w, mean, rstd, dim) * inv_dim;
      backward_row(dy + off, dres ? dres + off : nullptr, x + off, w, mean, rstd, mean_g, mean_g_xhat,
                   dx + off, dweight_part + m * dim, dbias_part ? dbias_part + m * dim : nullptr, dim);
    }
  });
  reduce_partials(dweight_parts, threads, param_size, a.dweight, num_threads);
  if (a.dbias) reduce_partials(dbias_parts, threads, param_size, a.dbias, num_threads);
}

void check_sizes(const char* op, int64_t rows, int64_t dim, int num_threads) {
  FASTMM_CHECK(rows >= 0 && dim >= 0, op,
               "rows and dim must be >= 0, got " + std::to_string(rows) + " and " + std::to_string(dim));
  FASTMM_CHECK(num_threads >= 1, op, "num_threads must be >= 1, got " + std::to_string(num_threads));
}

// ---- checked arguments of the entry points ---------------------------------------------------------------

constexpr const char* kKernel = "norm";

// Every modality id in [0, num_modalities): the kernels index the weight rows (and the gradient partials) with
// them. fastmm.ops checks this too, but not while torch.compile traces, and the compiled graph calls the kernels.
void check_ids(const TensorArg& modality, int64_t num_modalities) {
  const int64_t* ids = modality.ptr<const int64_t>();
  const int64_t rows = modality.sizes[0];
  if (rows == 0) return;
  const auto [lo, hi] = std::minmax_element(ids, ids + rows);
  if (*lo < 0 || *hi >= num_modalities) {
    refuse(kKernel, "modality ids must be in [0, " + std::to_string(num_modalities) + "), got values in [" +
                        std::to_string(*lo) + ", " + std::to_string(*hi) + "]");
  }
}

// A forward call's tensors, checked, as the kernel's arguments. bias and mean are None for RMSNorm.
FwdArgs checked_fwd(const TensorArg& x, const TensorArg& modality, const TensorArg& weight, const TensorArg& bias,
                    const TensorArg& residual, const TensorArg& y, const TensorArg& residual_out,
                    const TensorArg& mean, const TensorArg& rstd, bool centered, double eps, int num_threads) {
  check(x, kKernel, "x", contiguous(kFloats, {kAny, kAny}));
  const int64_t rows = x.sizes[0], dim = x.sizes[1];
  check(modality, kKernel, "modality", contiguous(DType::kInt64, {rows}));
  check(weight, kKernel, "weight", contiguous(x.dtype, {kAny, dim}));
  const int64_t num_modalities = weight.sizes[0];
  check(bias, kKernel, "bias", contiguous(x.dtype, {num_modalities, dim}).or_none());
  check(residual, kKernel, "residual", contiguous(x.dtype, {rows, dim}).or_none());
  check(y, kKernel, "y", contiguous(x.dtype, {rows, dim}));
  check(residual_out, kKernel, "residual_out", contiguous(x.dtype, {rows, dim}).or_none());
  if (residual_out.present != residual.present) {
    fail(residual_out, kKernel, "residual_out", "given exactly when residual is");
  }
  const TensorSpec stats = contiguous(DType::kFloat32, {rows});
  check(mean, kKernel, "mean", centered ? stats : stats.or_none());
  check(rstd, kKernel, "rstd", stats);
  check_ids(modality, num_modalities);
  FASTMM_CHECK(num_threads >= 1, kKernel, "num_threads must be >= 1, got " + std::to_string(num_threads));
  return {x.data, modality.ptr<const int64_t>(), weight.data, bias.data, residual.data, y.data, residual_out.data,
          mean.ptr<float>(), rstd.ptr<float>(), rows, dim, static_cast<float>(eps)};
}

// A backward call's tensors, checked, as the kernel's arguments. mean and dbias are None for RMSNorm.
BwdArgs checked_bwd(const TensorArg& dy, const TensorArg& dresidual_out, const TensorArg& x_in,
                    const TensorArg& modality, const TensorArg& weight, const TensorArg& mean, const TensorArg& rstd,
                    const TensorArg& dx, const TensorArg& dweight, const TensorArg& dbias, bool centered,
                    int num_threads) {
  check(x_in, kKernel, "x_in", contiguous(kFloats, {kAny, kAny}));
  const int64_t rows = x_in.sizes[0], dim = x_in.sizes[1];
  check(dy, kKernel, "dy", contiguous(x_in.dtype, {rows, dim}));
  check(dresidual_out, kKernel, "dresidual_out", contiguous(x_in.dtype, {rows, dim}).or_none());
  check(modality, kKernel, "modality", contiguous(DType::kInt64, {rows}));
  check(weight, kKernel, "weight", contiguous(x_in.dtype, {kAny, dim}));
  const int64_t num_modalities = weight.sizes[0];
  const TensorSpec stats = contiguous(DType::kFloat32, {rows});
  check(mean, kKernel, "mean", centered ? stats : stats.or_none());
  check(rstd, kKernel, "rstd", stats);
  check(dx, kKernel, "dx", contiguous(x_in.dtype, {rows, dim}));
  check(dweight, kKernel, "dweight", contiguous(DType::kFloat32, {num_modalities, dim}));
  check(dbias, kKernel, "dbias", contiguous(DType::kFloat32, {num_modalities, dim}).or_none());
  check_ids(modality, num_modalities);
  FASTMM_CHECK(num_threads >= 1, kKernel, "num_threads must be >= 1, got " + std::to_string(num_threads));
  return {dy.data, dresidual_out.data, x_in.data, modality.ptr<const int64_t>(), weight.data, mean.ptr<const float>(),
          rstd.ptr<const float>(), dx.data, dweight.ptr<float>(), dbias.ptr<float>(), rows, dim, num_modalities};
}

}  // namespace

// ---- the RMSNorm kernel for decode_layer.cpp ------------------------------------------------------------

void rms_norm_fwd(const void* x, const int64_t* modality, const void* weight, const void* residual, void* y,
                  void* residual_out, float* rstd, int64_t rows, int64_t dim, double eps, int dtype,
                  int num_threads) {
  check_sizes(__func__, rows, dim, num_threads);
  FASTMM_CHECK((residual == nullptr) == (residual_out == nullptr), __func__,
               "residual and residual_out must both be given or both be null");
  const FwdArgs args{x,       modality, weight, nullptr, residual, y, residual_out,
                     nullptr, rstd,     rows,   dim,     static_cast<float>(eps)};
  dispatch_dtype(dtype, [&](auto tag) { norm_fwd<decltype(tag), false>(args, num_threads); });
}

// ---- entry points (registered at the bottom of this file) -----------------------------------------------------------

namespace entry {

void rms_norm_fwd(const TensorArg& x, const TensorArg& modality, const TensorArg& weight, const TensorArg& residual,
                  const TensorArg& y, const TensorArg& residual_out, const TensorArg& rstd, double eps,
                  int num_threads) {
  const FwdArgs args =
      checked_fwd(x, modality, weight, {}, residual, y, residual_out, {}, rstd, false, eps, num_threads);
  dispatch_dtype(static_cast<int>(x.dtype), [&](auto tag) { norm_fwd<decltype(tag), false>(args, num_threads); });
}

void layer_norm_fwd(const TensorArg& x, const TensorArg& modality, const TensorArg& weight, const TensorArg& bias,
                    const TensorArg& residual, const TensorArg& y, const TensorArg& residual_out,
                    const TensorArg& mean, const TensorArg& rstd, double eps, int num_threads) {
  const FwdArgs args =
      checked_fwd(x, modality, weight, bias, residual, y, residual_out, mean, rstd, true, eps, num_threads);
  dispatch_dtype(static_cast<int>(x.dtype), [&](auto tag) { norm_fwd<decltype(tag), true>(args, num_threads); });
}

void rms_norm_bwd(const TensorArg& dy, const TensorArg& dresidual_out, const TensorArg& x_in,
                  const TensorArg& modality, const TensorArg& weight, const TensorArg& rstd, const TensorArg& dx,
                  const TensorArg& dweight, int num_threads) {
  const BwdArgs args =
      checked_bwd(dy, dresidual_out, x_in, modality, weight, {}, rstd, dx, dweight, {}, false, num_threads);
  dispatch_dtype(static_cast<int>(x_in.dtype), [&](auto tag) { norm_bwd<decltype(tag), false>(args, num_threads); });
}

void layer_norm_bwd(const TensorArg& dy, const TensorArg& dresidual_out, const TensorArg& x_in,
                    const TensorArg& modality, const TensorArg& weight, const TensorArg& mean,
                    const TensorArg& rstd, const TensorArg& dx, const TensorArg& dweight, const TensorArg& dbias,
                    int num_threads) {
  const BwdArgs args =
      checked_bwd(dy, dresidual_out, x_in, modality, weight, mean, rstd, dx, dweight, dbias, true, num_threads);
  dispatch_dtype(static_cast<int>(x_in.dtype), [&](auto tag) { norm_bwd<decltype(tag), true>(args, num_threads); });
}

}  // namespace entry
}  // namespace fastmm

FASTMM_ENTRY_POINTS(m) {
  m.def("rms_norm_fwd", &fastmm::entry::rms_norm_fwd, fastmm::release());
  m.def("layer_norm_fwd", &fastmm::entry::layer_norm_fwd, fastmm::release());
  m.def("rms_norm_bwd", &fastmm::entry::rms_norm_bwd, fastmm::release());
  m.def("layer_norm_bwd", &fastmm::entry::layer_norm_bwd, fastmm::release());
}
