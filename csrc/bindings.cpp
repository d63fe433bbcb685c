// fastmm._C: the C++ kernels as Python functions. Pointers arrive as Python ints (tensor.data_ptr(), 0 for
// None), sizes as ints, dtypes as fastmm::DType codes. Every call releases the GIL for the kernel.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "attention.h"
#include "decode_layer.h"
#include "linear.h"
#include "norm.h"
#include "sampling.h"
#include "vq.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmm C++ CPU kernels (raw-pointer interface; call through fastmm.native)";
  using Release = py::call_guard<py::gil_scoped_release>;

  m.def(
      "rms_norm_fwd",
      [](uintptr_t x, uintptr_t modality, uintptr_t weight, uintptr_t residual, uintptr_t y,
         uintptr_t residual_out, uintptr_t rstd, int64_t rows, int64_t dim, double eps, int dtype,
         int num_threads) {
        fastmm::rms_norm_fwd(ptr<const void>(x), ptr<const int64_t>(modality), ptr<const void>(weight),
                             ptr<const void>(residual), ptr<void>(y), ptr<void>(residual_out),
                             ptr<float>(rstd), rows, dim, eps, dtype, num_threads);
      },
      py::arg("x"), py::arg("modality"), py::arg("weight"), py::arg("residual"), py::arg("y"),
      py::arg("residual_out"), py::arg("rstd"), py::arg("rows"), py::arg("dim"), py::arg("eps"),
      py::arg("dtype"), py::arg("num_threads"), Release());

  m.def(
      "layer_norm_fwd",
      [](uintptr_t x, uintptr_t modality, uintptr_t weight, uintptr_t bias, uintptr_t residual, uintptr_t y,
         uintptr_t residual_out, uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t dim, double eps,
         int dtype, int num_threads) {
        fastmm::layer_norm_fwd(ptr<const void>(x), ptr<const int64_t>(modality), ptr<const void>(weight),
                               ptr<const void>(bias), ptr<const void>(residual), ptr<void>(y),
                               ptr<void>(residual_out), ptr<float>(mean), ptr<float>(rstd), rows, dim, eps,
                               dtype, num_threads);
      },
      py::arg("x"), py::arg("modality"), py::arg("weight"), py::arg("bias"), py::arg("residual"),
      py::arg("y"), py::arg("residual_out"), py::arg("mean"), py::arg("rstd"), py::arg("rows"),
      py::arg("dim"), py::arg("eps"), py::arg("dtype"), py::arg("num_threads"), Release());

  m.def(
      "rms_norm_bwd",
      [](uintptr_t dy, uintptr_t dresidual_out, uintptr_t x, uintptr_t modality, uintptr_t weight,
         uintptr_t rstd, uintptr_t dx, uintptr_t dweight, int64_t rows, int64_t dim, int64_t num_modalities,
         int dtype, int num_threads) {
        fastmm::rms_norm_bwd(ptr<const void>(dy), ptr<const void>(dresidual_out), ptr<const void>(x),
                             ptr<const int64_t>(modality), ptr<const void>(weight), ptr<const float>(rstd),
                             ptr<void>(dx), ptr<float>(dweight), rows, dim, num_modalities, dtype,
                             num_threads);
      },
      py::arg("dy"), py::arg("dresidual_out"), py::arg("x"), py::arg("modality"), py::arg("weight"),
      py::arg("rstd"), py::arg("dx"), py::arg("dweight"), py::arg("rows"), py::arg("dim"),
      py::arg("num_modalities"), py::arg("dtype"), py::arg("num_threads"), Release());

  m.def(
      "layer_norm_bwd",
      [](uintptr_t dy, uintptr_t dresidual_out, uintptr_t x, uintptr_t modality, uintptr_t weight,
         uintptr_t mean, uintptr_t rstd, uintptr_t dx, uintptr_t dweight, uintptr_t dbias, int64_t rows,
         int64_t dim, int64_t num_modalities, int dtype, int num_threads) {
        fastmm::layer_norm_bwd(ptr<const void>(dy), ptr<const void>(dresidual_out), ptr<const void>(x),
                               ptr<const int64_t>(modality), ptr<const void>(weight), ptr<const float>(mean),
                               ptr<const float>(rstd), ptr<void>(dx), ptr<float>(dweight), ptr<float>(dbias),
                               rows, dim, num_modalities, dtype, num_threads);
      },
      py::arg("dy"), py::arg("dresidual_out"), py::arg("x"), py::arg("modality"), py::arg("weight"),
      py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("dweight"), py::arg("dbias"), py::arg("rows"),
      py::arg("dim"), py::arg("num_modalities"), py::arg("dtype"), py::arg("num_threads"), Release());

  m.def(
      "nearest_code",
      [](uintptr_t z, int64_t batch, int64_t seq, int64_t dim, int64_t stride_batch, int64_t stride_seq,
         int64_t stride_dim, uintptr_t codebook, uintptr_t codebook_sq, int64_t num_codes, uintptr_t indices,
         int dtype, int num_threads) {
        fastmm::nearest_code(ptr<const void>(z), batch, seq, dim, stride_batch, stride_seq, stride_dim,
                             ptr<const void>(codebook), ptr<const float>(codebook_sq), num_codes,
                             ptr<int64_t>(indices), dtype, num_threads);
      },
      py::arg("z"), py::arg("batch"), py::arg("seq"), py::arg("dim"), py::arg("stride_batch"),
      py::arg("stride_seq"), py::arg("stride_dim"), py::arg("codebook"), py::arg("codebook_sq"),
      py::arg("num_codes"), py::arg("indices"), py::arg("dtype"), py::arg("num_threads"), Release());

  m.def(
      "skinny_linear",
      [](uintptr_t x, int64_t x_row_stride, uintptr_t weight, int64_t weight_row_stride, uintptr_t bias,
         uintptr_t y, int64_t rows, int64_t in_features, int64_t out_features, int dtype, int num_threads) {
        fastmm::skinny_linear(ptr<const void>(x), x_row_stride, ptr<const void>(weight), weight_row_stride,
                              ptr<const void>(bias), ptr<void>(y), rows, in_features, out_features, dtype,
                              num_threads);
      },
      py::arg("x"), py::arg("x_row_stride"), py::arg("weight"), py::arg("weight_row_stride"), py::arg("bias"),
      py::arg("y"), py::arg("rows"), py::arg("in_features"), py::arg("out_features"), py::arg("dtype"),
      py::arg("num_threads"), Release());

  m.def(
      "span_attention_fwd",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t kv_start, uintptr_t kv_end, uintptr_t o, uintptr_t lse,
         int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t num_queries, int64_t num_keys, int64_t head_dim,
         double scale, int dtype, int num_threads, uintptr_t key_keep, uintptr_t allowed, uintptr_t bias,
         double softcap) {
        const fastmm::Masking masking{ptr<const uint8_t>(key_keep), ptr<const uint8_t>(allowed),
                                      ptr<const float>(bias), static_cast<float>(softcap)};
        fastmm::span_attention_fwd(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v),
                                   ptr<const int32_t>(kv_start), ptr<const int32_t>(kv_end), ptr<void>(o),
                                   ptr<float>(lse), batch, q_heads, kv_heads, num_queries, num_keys, head_dim, scale,
                                   dtype, num_threads, masking);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("kv_start"), py::arg("kv_end"), py::arg("o"),
      py::arg("lse"), py::arg("batch"), py::arg("q_heads"), py::arg("kv_heads"), py::arg("num_queries"),
      py::arg("num_keys"), py::arg("head_dim"), py::arg("scale"), py::arg("dtype"), py::arg("num_threads"),
      py::arg("key_keep"), py::arg("allowed"), py::arg("bias"), py::arg("softcap"), Release());

  m.def(
      "decode_attention_fwd",
      [](uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t cache_len, uintptr_t o, uintptr_t lse,
         int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t num_queries, int64_t cache_size, int64_t head_dim,
         double scale, int dtype, int num_threads, uintptr_t allowed, uintptr_t bias, double softcap) {
        const fastmm::Masking masking{nullptr, ptr<const uint8_t>(allowed), ptr<const float>(bias),
                                      static_cast<float>(softcap)};
        fastmm::decode_attention_fwd(ptr<const void>(q), ptr<const void>(k_cache), ptr<const void>(v_cache),
                                     ptr<const int32_t>(cache_len), ptr<void>(o), batch, q_heads, kv_heads,
                                     num_queries, cache_size, head_dim, scale, dtype, num_threads, masking,
                                     ptr<float>(lse));
      },
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_len"), py::arg("o"), py::arg("lse"),
      py::arg("batch"), py::arg("q_heads"), py::arg("kv_heads"), py::arg("num_queries"), py::arg("cache_size"),
      py::arg("head_dim"), py::arg("scale"), py::arg("dtype"), py::arg("num_threads"), py::arg("allowed"),
      py::arg("bias"), py::arg("softcap"), Release());

  m.def(
      "cfg_sample",
      [](uintptr_t logits, int64_t batch, int64_t groups, int64_t vocab, int64_t row_stride, double scale0,
         double scale1, double temperature, int64_t top_k, double top_p, int64_t lo, int64_t hi, bool log_softmax,
         uint32_t seed, uintptr_t offset, uintptr_t out, int dtype, int num_threads) {
        fastmm::cfg_sample(ptr<const void>(logits), batch, groups, vocab, row_stride, scale0, scale1, temperature,
                           top_k, top_p, lo, hi, log_softmax, seed, ptr<const int64_t>(offset), ptr<int64_t>(out),
                           dtype, num_threads);
      },
      py::arg("logits"), py::arg("batch"), py::arg("groups"), py::arg("vocab"), py::arg("row_stride"),
      py::arg("scale0"), py::arg("scale1"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
      py::arg("lo"), py::arg("hi"), py::arg("log_softmax"), py::arg("seed"), py::arg("offset"), py::arg("out"),
      py::arg("dtype"), py::arg("num_threads"), Release());

  m.def(
      "decode_layer_scratch_size",
      [](int64_t batch, int64_t hidden, int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate,
         int64_t cache_size, int dtype) {
        const fastmm::DecodeLayerShape shape{batch, hidden, q_heads, kv_heads, head_dim, intermediate, cache_size};
        return fastmm::decode_layer_scratch_size(shape, dtype);
      },
      py::arg("batch"), py::arg("hidden"), py::arg("q_heads"), py::arg("kv_heads"), py::arg("head_dim"),
      py::arg("intermediate"), py::arg("cache_size"), py::arg("dtype"));

  // Per-call buffers first, then the layer's constants, so that a caller can keep the latter in one tuple.
  m.def(
      "decode_layer",
      [](uintptr_t x, uintptr_t residual, uintptr_t modality, uintptr_t positions, uintptr_t x_out,
         uintptr_t residual_out, uintptr_t k_cache, uintptr_t v_cache, uintptr_t rope_cos, uintptr_t rope_sin,
         uintptr_t scratch, int64_t scratch_size, uintptr_t input_norm, double input_norm_eps, uintptr_t qkv,
         uintptr_t qkv_bias, uintptr_t o, uintptr_t o_bias, uintptr_t post_attention_norm,
         double post_attention_norm_eps, uintptr_t gate_up, uintptr_t gate_up_bias, uintptr_t down,
         uintptr_t down_bias, int64_t batch, int64_t hidden, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
         int64_t intermediate, int64_t cache_size, int dtype, int num_threads, int attention_threads) {
        const fastmm::DecodeLayerShape shape{batch, hidden, q_heads, kv_heads, head_dim, intermediate, cache_size};
        const fastmm::DecodeLayerWeights weights{ptr<const void>(input_norm),
                                                 input_norm_eps,
                                                 ptr<const void>(qkv),
                                                 ptr<const void>(qkv_bias),
                                                 ptr<const void>(o),
                                                 ptr<const void>(o_bias),
                                                 ptr<const void>(post_attention_norm),
                                                 post_attention_norm_eps,
                                                 ptr<const void>(gate_up),
                                                 ptr<const void>(gate_up_bias),
                                                 ptr<const void>(down),
                                                 ptr<const void>(down_bias)};
        const fastmm::DecodeLayerIO io{ptr<const void>(x),
                                       ptr<const void>(residual),
                                       ptr<const int64_t>(modality),
                                       ptr<const int32_t>(positions),
                                       ptr<const float>(rope_cos),
                                       ptr<const float>(rope_sin),
                                       ptr<void>(k_cache),
                                       ptr<void>(v_cache),
                                       ptr<void>(x_out),
                                       ptr<void>(residual_out),
                                       ptr<void>(scratch),
                                       scratch_size};
        fastmm::decode_layer(shape, weights, io, dtype, num_threads, attention_threads);
      },
      py::arg("x"), py::arg("residual"), py::arg("modality"), py::arg("positions"), py::arg("x_out"),
      py::arg("residual_out"), py::arg("k_cache"), py::arg("v_cache"), py::arg("rope_cos"), py::arg("rope_sin"),
      py::arg("scratch"), py::arg("scratch_size"), py::arg("input_norm"), py::arg("input_norm_eps"), py::arg("qkv"),
      py::arg("qkv_bias"), py::arg("o"), py::arg("o_bias"), py::arg("post_attention_norm"),
      py::arg("post_attention_norm_eps"), py::arg("gate_up"), py::arg("gate_up_bias"), py::arg("down"),
      py::arg("down_bias"), py::arg("batch"), py::arg("hidden"), py::arg("q_heads"), py::arg("kv_heads"),
      py::arg("head_dim"), py::arg("intermediate"), py::arg("cache_size"), py::arg("dtype"), py::arg("num_threads"),
      py::arg("attention_threads"), Release());
}
