// How a C++ file adds its entry points to fastmm._C. At the bottom of csrc/<family>.cpp:
//
//   FASTMM_ENTRY_POINTS(m) { m.def("nearest_code", &fastmm::entry::nearest_code, fastmm::release()); }
//
// bindings.cpp's module definition runs every file's registration when Python imports fastmm._C, so a new
// kernel family is one new .cpp file (CMake globs csrc/*.cpp) and no shared file changes. Entry points take
// tensors as fastmm::TensorArg (tensor_arg_caster.h, included here) and plain scalars; arguments are positional.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "tensor_arg_caster.h"

namespace fastmm {

using EntryPoints = void (*)(pybind11::module_&);

// Adds a file's registration to those bindings.cpp runs; returns true so that it can initialize a static.
bool add_entry_points(EntryPoints entry_points);

// Every kernel call releases the GIL (arguments are converted before, with it held).
inline pybind11::call_guard<pybind11::gil_scoped_release> release() { return {}; }

}  // namespace fastmm

// Defines this file's registration function (internal linkage, one per file) and adds it during static
// initialization of the extension, before PYBIND11_MODULE runs.
#define FASTMM_ENTRY_POINTS(m)                                                                             \
  static void fastmm_entry_points(pybind11::module_& m);                                                   \
  [[maybe_unused]] static const bool fastmm_entry_points_added = fastmm::add_entry_points(fastmm_entry_points); \
  static void fastmm_entry_points(pybind11::module_& m)
