// The pybind11 type caster that turns a torch.Tensor (or None) passed to a fastmm._C entry point into a
// fastmm::TensorArg, reading the tensor through the Python C API (the extension never links libtorch).
//
// pybind11 runs casters while it converts a call's arguments, before the call_guard's gil_scoped_release is
// constructed (pybind11.h: load_args, then call<Return, Guard>): every Python object is read with the GIL held,
// and the entry point that runs without it sees only the plain struct. Anything but a tensor or None is not
// converted, which pybind11 reports as a TypeError.
#pragma once

#include <pybind11/gil_safe_call_once.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "tensor_arg.h"

namespace fastmm {
namespace tensor_arg_caster {

namespace py = pybind11;

// A new reference as an owning handle; a null one means torch raised (e.g. data_ptr() of a tensor without
// storage), and that error propagates to the caller.
inline py::object owned(PyObject* obj) {
  if (obj == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(obj);
}

inline int64_t to_int64(PyObject* obj) {
  const long long v = PyLong_AsLongLong(obj);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

struct TorchDType {
  PyObject* object;  // torch.float32, ...: compared by identity (dtypes are singletons)
  DType code;
  std::string name;  // "torch.float32", as str() gives it
  int64_t element_size;
};

// What conversion compares against and the attribute names it reads, looked up once.
struct Torch {
  PyObject* tensor_type;
  std::vector<TorchDType> dtypes;  // the kernels' types first: they are looked up on every call
  PyObject *dtype, *shape, *stride, *is_cpu, *device, *type, *data_ptr, *storage_offset, *untyped_storage, *nbytes;

  static const Torch& get();
};

inline DType code_of(const std::string& name) {
  const std::pair<const char*, DType> codes[] = {{"torch.float32", DType::kFloat32}, {"torch.float16", DType::kFloat16},
                                                 {"torch.bfloat16", DType::kBFloat16}, {"torch.int64", DType::kInt64},
                                                 {"torch.int32", DType::kInt32},     {"torch.bool", DType::kBool}};
  for (const auto& [text, code] : codes) {
    if (name == text) return code;
  }
  return DType::kOther;
}

// Every torch.dtype, found among torch's attributes (aliases such as torch.float are the same objects), so
// that messages name any dtype a caller passes. The references are kept for the life of the process.
inline std::vector<TorchDType> torch_dtypes(const py::module_& torch) {
  const py::object dtype_type = torch.attr("dtype");
  std::vector<TorchDType> dtypes;
  for (const auto& item : torch.attr("__dict__").cast<py::dict>()) {
    PyObject* dtype = item.second.ptr();
    if (!py::isinstance(item.second, dtype_type)) continue;
    if (std::any_of(dtypes.begin(), dtypes.end(), [&](const TorchDType& d) { return d.object == dtype; })) continue;
    const std::string name = py::str(item.second);
    Py_INCREF(dtype);
    dtypes.push_back({dtype, code_of(name), name, item.second.attr("itemsize").cast<int64_t>()});
  }
  std::stable_partition(dtypes.begin(), dtypes.end(), [](const TorchDType& d) { return d.code != DType::kOther; });
  return dtypes;
}

inline const Torch& Torch::get() {
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<Torch> storage;
  return storage
      .call_once_and_store_result([] {
        const py::module_ torch = py::module_::import("torch");
        const auto name = [](const char* text) { return PyUnicode_InternFromString(text); };
        return Torch{py::object(torch.attr("Tensor")).release().ptr(), torch_dtypes(torch), name("dtype"), name("shape"),
                     name("stride"), name("is_cpu"), name("device"), name("type"), name("data_ptr"),
                     name("storage_offset"), name("untyped_storage"), name("nbytes")};
      })
      .get_stored();
}

inline void read_dtype(const Torch& torch, PyObject* dtype, TensorArg& arg) {
  for (const TorchDType& d : torch.dtypes) {
    if (d.object == dtype) {
      arg.dtype = d.code;
      arg.dtype_name = d.name.c_str();
      arg.element_size = d.element_size;
      return;
    }
  }
  arg.dtype_name = "an unknown dtype";
}

// ndim from a tuple of ints (torch.Size or stride()), and its first kMaxDims values into out.
inline int read_tuple(PyObject* tuple, int64_t* out) {
  if (!PyTuple_Check(tuple)) throw py::type_error("a tensor's shape and stride() must be tuples of ints");
  const Py_ssize_t n = PyTuple_GET_SIZE(tuple);
  for (Py_ssize_t d = 0; d < std::min<Py_ssize_t>(n, kMaxDims); ++d) out[d] = to_int64(PyTuple_GET_ITEM(tuple, d));
  return static_cast<int>(n);
}

// Fills arg from obj; false if obj is neither a torch.Tensor nor None. On the CPU it reads the data pointer and
// the storage extent; elsewhere only what messages show (the check refuses the tensor before anything else).
inline bool load(PyObject* obj, TensorArg& arg) {
  if (obj == Py_None) return true;  // arg.present stays false
  const Torch& torch = Torch::get();
  if (!PyObject_TypeCheck(obj, reinterpret_cast<PyTypeObject*>(torch.tensor_type))) return false;
  arg.present = true;
  read_dtype(torch, owned(PyObject_GetAttr(obj, torch.dtype)).ptr(), arg);
  arg.ndim = read_tuple(owned(PyObject_GetAttr(obj, torch.shape)).ptr(), arg.sizes);
  if (read_tuple(owned(PyObject_CallMethodNoArgs(obj, torch.stride)).ptr(), arg.strides) != arg.ndim) {
    throw py::type_error("a tensor's stride() must have one stride per dim");
  }
  arg.cpu = owned(PyObject_GetAttr(obj, torch.is_cpu)).ptr() == Py_True;
  if (!arg.cpu) {
    const py::object device = owned(PyObject_GetAttr(obj, torch.device));
    const std::string type = py::str(owned(PyObject_GetAttr(device.ptr(), torch.type)));
    std::snprintf(arg.device, sizeof(arg.device), "%s", type.c_str());
    return true;
  }
  arg.data = PyLong_AsVoidPtr(owned(PyObject_CallMethodNoArgs(obj, torch.data_ptr)).ptr());
  if (arg.data == nullptr && PyErr_Occurred()) throw py::error_already_set();
  arg.storage_offset = to_int64(owned(PyObject_CallMethodNoArgs(obj, torch.storage_offset)).ptr());
  const py::object storage = owned(PyObject_CallMethodNoArgs(obj, torch.untyped_storage));
  arg.storage_nbytes = to_int64(owned(PyObject_CallMethodNoArgs(storage.ptr(), torch.nbytes)).ptr());
  return true;
}

}  // namespace tensor_arg_caster
}  // namespace fastmm

namespace pybind11 {
namespace detail {

template <>
struct type_caster<fastmm::TensorArg> {
  PYBIND11_TYPE_CASTER(fastmm::TensorArg, const_name("torch.Tensor | None"));

  bool load(handle src, bool /*convert*/) { return fastmm::tensor_arg_caster::load(src.ptr(), value); }
};

}  // namespace detail
}  // namespace pybind11
