// fastmm._C: the C++ kernels as Python functions. Pointers arrive as Python ints (tensor.data_ptr(), 0 for
// None), sizes as ints, dtypes as fastmm::DType codes. Every call releases the GIL for the kernel.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "norm.h"

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
}
