// fastmm._C: the C++ kernels as Python functions. Each csrc/<family>.cpp registers its own entry points
// (FASTMM_ENTRY_POINTS, module.h); the module definition below runs every registration, so nothing here names a
// kernel. Entry points take tensors (or None) as fastmm::TensorArg (tensor_arg_caster.h builds them before the
// GIL is released) and plain scalars, and check their tensors themselves. decode_layer is the exception: its
// runner checks every buffer once when it is built and then calls it per layer and step, so it takes pointers as
// Python ints (tensor.data_ptr(), 0 for None), sizes as ints and dtypes as fastmm::DType codes. Every kernel
// call releases the GIL.
#include <pybind11/pybind11.h>

#include <vector>

#include "module.h"

namespace fastmm {
namespace {

// Function-local, so that it exists before the first file's static initializer adds to it.
std::vector<EntryPoints>& registrations() {
  static std::vector<EntryPoints> all;
  return all;
}

}  // namespace

bool add_entry_points(EntryPoints entry_points) {
  registrations().push_back(entry_points);
  return true;
}

}  // namespace fastmm

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmm C++ CPU kernels (call through fastmm.native)";
  for (fastmm::EntryPoints entry_points : fastmm::registrations()) entry_points(m);
}
