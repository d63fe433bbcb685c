// How tensors reach the kernels: fastmm::TensorArg, one tensor argument of a fastmm._C entry point, and
// check(), the one test every entry point runs on each of its tensors before a kernel sees a pointer.
//
// The caster builds a TensorArg straight from the torch.Tensor (or None) passed from Python
// (tensor_arg_caster.h); the extension never links libtorch. An entry point then checks each argument against
// a TensorSpec (device, dtype, shape, layout, storage bounds), derives its sizes from the checked arguments and
// calls the pointer-level kernel. Every failed check throws std::invalid_argument (ValueError in Python):
// "native <kernel> kernel: <name> must be <expected>, got <dtype> shape <shape> strides <strides> on <device>".
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "common.h"

namespace fastmm {

// Dimensions a TensorArg records: more than any kernel takes, so a tensor with more only has to fail its check.
constexpr int kMaxDims = 8;

// One tensor argument as the caster read it. It holds no reference: the Python caller's argument keeps the
// tensor alive for the call. Everything is read while the GIL is held, so the entry point (which runs without
// it) never touches a Python object.
struct TensorArg {
  bool present = false;         // false: None was passed, and nothing below is set
  bool cpu = false;             // on the CPU; only dtype, ndim, sizes, strides and device are read otherwise
  DType dtype = DType::kOther;
  const char* dtype_name = "";  // torch's name ("torch.float32"), for messages
  char device[16] = "cpu";      // the device type (for messages), cut to fit
  int ndim = 0;                 // may exceed kMaxDims (then only the first kMaxDims sizes and strides are kept)
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements
  void* data = nullptr;
  // What proves every addressed element lies inside the tensor's memory (inside_storage() in tensor_arg.cpp).
  int64_t storage_offset = 0;   // elements from the start of the storage to data
  int64_t storage_nbytes = 0;
  int64_t element_size = 0;     // bytes; 0 for kOther

  int64_t numel() const;

  // The data as T*, null for None. Typed access is safe once check() has pinned dtype to T's.
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

// An expected size that matches any size.
constexpr int64_t kAny = -1;

// How the elements of an argument must be laid out. All three refuse negative strides.
enum class Layout : uint8_t {
  kContiguous,  // row-major without gaps, as torch's is_contiguous() (a dim of size 1 may have any stride)
  kRows,        // unit stride along the last dim (unless it has size <= 1), any non-negative strides elsewhere
  kStrided,     // any non-negative strides
};

// A set of DType codes. Converts from one DType; kFloats is the kernels' float types.
struct DTypes {
  uint32_t bits;
  constexpr DTypes(DType dtype) : bits(1u << static_cast<int>(dtype)) {}  // implicit: one DType reads as a set
  constexpr explicit DTypes(uint32_t mask) : bits(mask) {}
  constexpr bool contains(DType dtype) const { return (bits >> static_cast<int>(dtype)) & 1u; }
};
constexpr DTypes kFloats{DTypes(DType::kFloat32).bits | DTypes(DType::kFloat16).bits | DTypes(DType::kBFloat16).bits};

// What an entry point requires of one tensor argument: on the CPU, an element type in dtypes, ndim dims of the
// given sizes (kAny: any), the layout, every addressed element inside the storage; None only if optional.
struct TensorSpec {
  DTypes dtypes;
  Layout layout;
  int ndim;
  int64_t shape[kMaxDims];
  bool optional = false;

  TensorSpec(DTypes dtypes, Layout layout, std::initializer_list<int64_t> shape);
  // The same spec with None accepted as well.
  TensorSpec or_none() const {
    TensorSpec spec = *this;
    spec.optional = true;
    return spec;
  }
};

inline TensorSpec contiguous(DTypes dtypes, std::initializer_list<int64_t> shape) {
  return {dtypes, Layout::kContiguous, shape};
}
inline TensorSpec rows_of(DTypes dtypes, std::initializer_list<int64_t> shape) {
  return {dtypes, Layout::kRows, shape};
}
inline TensorSpec strided(DTypes dtypes, std::initializer_list<int64_t> shape) {
  return {dtypes, Layout::kStrided, shape};
}

// Throws "native <kernel> kernel: <name> must be <spec>, got <t>" unless t meets spec. kernel is the op family.
void check(const TensorArg& t, const char* kernel, const char* name, const TensorSpec& spec);

// Throws "native <kernel> kernel: <name> must be <expected>, got <t>": for what a TensorSpec cannot say (one
// size that depends on another's value, a minimum size, a stride relation), checked after check().
[[noreturn]] void fail(const TensorArg& t, const char* kernel, const char* name, const std::string& expected);

// Throws "native <kernel> kernel: <message>": for values inside tensors (ids, ranges, lengths) and scalars.
[[noreturn]] void refuse(const char* kernel, const std::string& message);

}  // namespace fastmm
