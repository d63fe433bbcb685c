// check() and its messages (tensor_arg.h).
#include "tensor_arg.h"

#include <algorithm>
#include <stdexcept>

namespace fastmm {

namespace {

// "(2, 4)", "(6,)", "()": Python's tuple notation, as the launchers' messages always printed shapes. A spec's
// kAny prints as "*" (spec = true); a tensor's -1 is a stride.
std::string tuple_text(const int64_t* values, int n, int shown, bool spec = false) {
  std::string out = "(";
  for (int d = 0; d < shown; ++d) {
    if (d) out += ", ";
    out += spec && values[d] == kAny ? std::string("*") : std::to_string(values[d]);
  }
  if (shown < n) out += ", ...";
  return out + (n == 1 ? ",)" : ")");
}

const char* dtype_text(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "torch.float32";
    case DType::kFloat16:
      return "torch.float16";
    case DType::kBFloat16:
      return "torch.bfloat16";
    case DType::kInt64:
      return "torch.int64";
    case DType::kInt32:
      return "torch.int32";
    case DType::kBool:
      return "torch.bool";
    default:
      return "another dtype";
  }
}

// "torch.float32", or "torch.float32, torch.float16 or torch.bfloat16".
std::string dtypes_text(DTypes dtypes) {
  std::string out;
  int listed = 0;
  const int count = __builtin_popcount(dtypes.bits);
  for (int code = 0; code <= static_cast<int>(DType::kOther); ++code) {
    if (!dtypes.contains(static_cast<DType>(code))) continue;
    if (listed) out += listed + 1 == count ? " or " : ", ";
    out += dtype_text(static_cast<DType>(code));
    ++listed;
  }
  return out;
}

std::string spec_text(const TensorSpec& spec) {
  std::string out = spec.layout == Layout::kContiguous ? "a contiguous CPU " : "a CPU ";
  out += dtypes_text(spec.dtypes) + " tensor of shape " + tuple_text(spec.shape, spec.ndim, spec.ndim, true);
  if (spec.layout == Layout::kRows) out += " with unit stride along its last dim and non-negative strides";
  if (spec.layout == Layout::kStrided) out += " with non-negative strides";
  if (spec.optional) out += " or None";
  return out;
}

// What t is, in the launchers' words: "torch.float32 shape (2, 4) strides (4, 1) on cpu", or "None".
std::string arg_text(const TensorArg& t) {
  if (!t.present) return "None";
  const int shown = std::min(t.ndim, kMaxDims);
  return std::string(t.dtype_name) + " shape " + tuple_text(t.sizes, t.ndim, shown) + " strides " +
         tuple_text(t.strides, t.ndim, shown) + " on " + t.device;
}

[[noreturn]] void throw_must_be(const char* kernel, const char* name, const std::string& expected,
                                const std::string& got) {
  refuse(kernel, std::string(name) + " must be " + expected + ", got " + got);
}

bool shape_matches(const TensorArg& t, const TensorSpec& spec) {
  if (t.ndim != spec.ndim) return false;
  for (int d = 0; d < spec.ndim; ++d) {
    if (spec.shape[d] != kAny && spec.shape[d] != t.sizes[d]) return false;
  }
  return true;
}

// torch's is_contiguous(): row-major without gaps, skipping dims of size 1, whose stride is never stepped.
bool is_contiguous(const TensorArg& t) {
  if (t.numel() == 0) return true;
  int64_t expected = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    if (t.sizes[d] == 1) continue;
    if (t.strides[d] != expected) return false;
    expected *= t.sizes[d];
  }
  return true;
}

bool layout_matches(const TensorArg& t, Layout layout) {
  for (int d = 0; d < t.ndim; ++d) {
    if (t.strides[d] < 0) return false;
  }
  switch (layout) {
    case Layout::kContiguous:
      return is_contiguous(t);
    case Layout::kRows:
      return t.ndim == 0 || t.sizes[t.ndim - 1] <= 1 || t.strides[t.ndim - 1] == 1;
    case Layout::kStrided:
      return true;
  }
  return false;
}

// Whether every element t addresses through its (non-negative) strides lies inside its storage: the furthest
// one, storage_offset + sum (size - 1) * stride, ends within storage_nbytes. Overflow counts as outside.
bool inside_storage(const TensorArg& t) {
  if (t.numel() == 0) return true;
  int64_t last = t.storage_offset;
  for (int d = 0; d < t.ndim; ++d) {
    int64_t reach;
    if (__builtin_mul_overflow(t.sizes[d] - 1, t.strides[d], &reach) || __builtin_add_overflow(last, reach, &last)) {
      return false;
    }
  }
  int64_t end;
  return t.storage_offset >= 0 && !__builtin_mul_overflow(last + 1, t.element_size, &end) && end <= t.storage_nbytes;
}

}  // namespace

int64_t TensorArg::numel() const {
  int64_t n = 1;
  for (int d = 0; d < std::min(ndim, kMaxDims); ++d) n *= sizes[d];
  return n;
}

TensorSpec::TensorSpec(DTypes dtypes, Layout layout, std::initializer_list<int64_t> sizes)
    : dtypes(dtypes), layout(layout), ndim(static_cast<int>(sizes.size())), shape() {
  if (sizes.size() > static_cast<size_t>(kMaxDims)) throw std::logic_error("TensorSpec: more dims than kMaxDims");
  std::copy(sizes.begin(), sizes.end(), shape);
}

void check(const TensorArg& t, const char* kernel, const char* name, const TensorSpec& spec) {
  if (!t.present) {
    if (spec.optional) return;
    throw_must_be(kernel, name, spec_text(spec), "None");
  }
  // In this order: the layout and storage tests read ndim sizes and strides, all kept once ndim is the spec's.
  if (!t.cpu || !spec.dtypes.contains(t.dtype) || !shape_matches(t, spec) || !layout_matches(t, spec.layout)) {
    throw_must_be(kernel, name, spec_text(spec), arg_text(t));
  }
  if (!inside_storage(t)) {
    throw_must_be(kernel, name, spec_text(spec) + " inside its storage",
                  arg_text(t) + ", storage offset " + std::to_string(t.storage_offset) + " in a storage of " +
                      std::to_string(t.storage_nbytes) + " bytes");
  }
}

void fail(const TensorArg& t, const char* kernel, const char* name, const std::string& expected) {
  throw_must_be(kernel, name, expected, arg_text(t));
}

void refuse(const char* kernel, const std::string& message) {
  throw std::invalid_argument(std::string("native ") + kernel + " kernel: " + message);
}

}  // namespace fastmm
