// norm family: modality-adaptive RMSNorm and LayerNorm (mPLUG-Owl2), forward and backward.
//
// Row t of x is normalized with the parameters of its modality m_t. RMSNorm is LayerNorm without the mean:
// one row kernel serves both, templated on kCenter (subtract the mean or not), so the two cannot drift apart.
// All math in fp32 on 16-lane blocks (common.h), one rounding on store. A row (16 KiB at D = 4096 fp32) stays
// in L1/L2 between the statistics pass and the output pass, so memory sees one read of each input and one
// write of each output per row.
#include <cmath>
#include <vector>

#include "common.h"
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

}  // namespace

// ---- entry points (bound in bindings.cpp) ---------------------------------------------------------------

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

void layer_norm_fwd(const void* x, const int64_t* modality, const void* weight, const void* bias,
                    const void* residual, void* y, void* residual_out, float* mean, float* rstd, int64_t rows,
                    int64_t dim, double eps, int dtype, int num_threads) {
  check_sizes(__func__, rows, dim, num_threads);
  FASTMM_CHECK((residual == nullptr) == (residual_out == nullptr), __func__,
               "residual and residual_out must both be given or both be null");
  const FwdArgs args{x, modality, weight, bias, residual, y, residual_out, mean, rstd, rows, dim,
                     static_cast<float>(eps)};
  dispatch_dtype(dtype, [&](auto tag) { norm_fwd<decltype(tag), true>(args, num_threads); });
}

void rms_norm_bwd(const void* dy, const void* dresidual_out, const void* x, const int64_t* modality,
                  const void* weight, const float* rstd, void* dx, float* dweight, int64_t rows, int64_t dim,
                  int64_t num_modalities, int dtype, int num_threads) {
  check_sizes(__func__, rows, dim, num_threads);
  const BwdArgs args{dy, dresidual_out, x, modality, weight, nullptr, rstd, dx, dweight, nullptr,
                     rows, dim, num_modalities};
  dispatch_dtype(dtype, [&](auto tag) { norm_bwd<decltype(tag), false>(args, num_threads); });
}

void layer_norm_bwd(const void* dy, const void* dresidual_out, const void* x, const int64_t* modality,
                    const void* weight, const float* mean, const float* rstd, void* dx, float* dweight,
                    float* dbias, int64_t rows, int64_t dim, int64_t num_modalities, int dtype,
                    int num_threads) {
  check_sizes(__func__, rows, dim, num_threads);
  const BwdArgs args{dy, dresidual_out, x, modality, weight, mean, rstd, dx, dweight, dbias,
                     rows, dim, num_modalities};
  dispatch_dtype(dtype, [&](auto tag) { norm_bwd<decltype(tag), true>(args, num_threads); });
}

}  // namespace fastmm
