// fusion family: the passes of LLaVA-HR's mixture-of-resolution adapter that are not GEMMs, token-major
// (fastmm/reference/fusion.py has the math; fastmm/native/fusion.py runs the GEMMs in between with torch).
//
//   fusion_depthwise_gelu: h = GELU(DWConv_kxk(y) + b) over the ViT grid (zero padding), and in the same pass
//     the token sums of y, h (as stored) and s, from which the adapter's gate is computed: its token means of
//     F = y + h Wfp^T + bfp and of S follow from them by algebra, so nothing re-reads y, h, F or s for them.
//   fusion_blend: y' = y + proj + bfp + gate[b] * s, proj = h Wfp^T, one pass.
//
// Channels are contiguous in token-major tensors: both kernels work on 16-channel fp32 blocks (common.h), one
// rounding on store.
//
// The depthwise convolution reads each input token k*k times. A thread converts each input row it needs once
// into a ring of k fp32 rows, each padded with k/2 zero tokens on both sides, so the tap loops have no edge
// cases and no 16-bit conversions. The ring holds a chunk of channels, sized so that it stays in L2 while the
// thread's output rows stream through it; the chunk's taps sit padded in a small fp32 buffer beside it. An
// output row is computed in two steps: the convolution, four tokens at a time (each tap loaded serves four
// FMAs), into an fp32 row of pre-activations; then GELU, the store to h and the sums, token by token.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "lanes.h"
#include "module.h"

namespace fastmm {
namespace {

// ---- GELU -------------------------------------------------------------------------------------------------

// erf(x) for |x| <= 4 as x P(x^2) / Q(x^2), the fp32 rational approximation of Eigen and XLA: within 7e-8 of
// erf in exact arithmetic, 4.4e-7 evaluated in fp32 (a few ulp of results near 1). Past 4, erf is +-1 to fp32
// precision, so x is clamped there; NaN stays NaN. Plain vector arithmetic: it vectorizes on every target,
// where std::erf lane by lane would not.
inline f32x16 erf_lanes(f32x16 x) {
  // A lane loop: it vectorizes (compares and blends), where `?:` on the vectors goes lane by lane on AVX2.
  for (int i = 0; i < kBlock; ++i) x[i] = std::min(std::max(x[i], -4.f), 4.f);
  const f32x16 x2 = x * x;
  f32x16 p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
  p = p * x2 + -2.10102402082508e-06f;
  p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f;
  p = p * x2 + -2.95459980854025e-03f;
  p = p * x2 + -1.60960333262415e-02f;
  f32x16 q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
  q = q * x2 + -1.68282697438203e-03f;
  q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return x * p / q;
}

// The exact (erf) GELU: 0.5 x (1 + erf(x / sqrt 2)).
inline f32x16 gelu_lanes(f32x16 x) { return 0.5f * x * (1.f + erf_lanes(x * 0.70710678118654752f)); }

// ---- native vectors (Lanes: csrc/lanes.h) ------------------------------------------------------------------

// store_block for a full fp32 block, as native vectors: GCC moves a whole f32x16 through general registers on
// its way to memory otherwise.
inline void store_floats(float* p, f32x16 v) {
  Lanes parts[kBlock / kLanes];
  std::memcpy(parts, &v, sizeof(v));
  for (int64_t i = 0; i < kBlock / kLanes; ++i) store_lanes(p + i * kLanes, parts[i]);
}

// Where a kernel stores a block of T: store_block, or store_floats for a full fp32 block.
template <typename T, typename N>
void store_out(T* p, f32x16 v, N n) {
  store_block(p, v, n);
}
inline void store_out(float* p, f32x16 v, FullBlock) { store_floats(p, v); }

// acc[0, 16) += v.
inline void accumulate(float* acc, f32x16 v) {
  Lanes parts[kBlock / kLanes];
  std::memcpy(parts, &v, sizeof(v));
  for (int64_t i = 0; i < kBlock / kLanes; ++i) store_lanes(acc + i * kLanes, load_lanes(acc + i * kLanes) + parts[i]);
}

// ---- depthwise convolution + GELU + token sums ------------------------------------------------------------

constexpr int64_t kMaxKernelSize = 15;
// Bytes of a thread's ring of padded input rows: well inside a 512 KiB L2, next to the output rows.
constexpr int64_t kRingBytes = 128 << 10;

struct DwProblem {
  const void* y;      // [B, gh * gw, d]
  const void* s;      // [B, gh * gw, d], y's type
  const float* taps;  // [k * k, d]: taps[i * k + j][c] weighs the input at (row + i - k/2, col + j - k/2)
  const float* bias;  // [d]
  void* h;            // [B, gh * gw, d], float or y's type
  float* row_sums;    // [B * gh, 3, d]: the sums of y, h and s over each grid row's tokens
  int64_t batch, grid_h, grid_w, dim, k;
};

// Channels per chunk: a multiple of kBlock with the ring within kRingBytes (at least one block), at most d
// rounded up to a block.
int64_t chunk_channels(const DwProblem& pb) {
  const int64_t channel_bytes = pb.k * (pb.grid_w + pb.k - 1) * static_cast<int64_t>(sizeof(float));
  const int64_t fits = kRingBytes / channel_bytes / kBlock * kBlock;
  const int64_t all = (pb.dim + kBlock - 1) / kBlock * kBlock;
  return std::min(std::max(fits, kBlock), all);
}

// One thread's fp32 buffers for a chunk of `stride` channels: the taps and the bias (row k * k); the ring, whose
// slot row % k holds input row `row` as grid_w + k - 1 tokens, the outer k / 2 on each side zero (only the
// inner tokens are ever written, so the padding stays zero); the output row's pre-activations; and its sums.
struct ChunkBuffers {
  int64_t stride, padded_width;
  std::vector<float> taps, ring, pre, sums;

  ChunkBuffers(const DwProblem& pb, int64_t stride)
      : stride(stride),
        padded_width(pb.grid_w + pb.k - 1),
        taps((pb.k * pb.k + 1) * stride),
        ring(pb.k * padded_width * stride),
        pre(pb.grid_w * stride),
        sums(3 * stride) {}

  float* slot(int64_t row, int64_t k) { return ring.data() + (row % k) * padded_width * stride; }
};

// dst[j] = src[j] in fp32 for the `width` channels of a chunk, zero up to the end of the last block.
template <typename T>
void widen_channels(const T* src, int64_t width, float* dst) {
  for_each_block(width, [=](int64_t j, auto n) { store_floats(dst + j, load_block(src + j, n)); });
}

void load_taps(const DwProblem& pb, int64_t c0, int64_t width, ChunkBuffers& buf) {
  for (int64_t t = 0; t < pb.k * pb.k; ++t) widen_channels(pb.taps + t * pb.dim + c0, width, &buf.taps[t * buf.stride]);
  widen_channels(pb.bias + c0, width, &buf.taps[pb.k * pb.k * buf.stride]);
}

// The passes over y, s and h read a chunk's channels token by token, d elements apart: at d = 1024 each run
// starts on a new page, where hardware prefetchers stop. So they prefetch the run kAhead tokens ahead, which
// helps when the data has left the caches.
constexpr int64_t kAhead = 4;

// Prefetches the `count` elements from p on, for reading (kWrite false) or for writing.
template <bool kWrite, typename T>
inline void prefetch_run(const T* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  const int64_t size = count * static_cast<int64_t>(sizeof(T));
  for (int64_t offset = 0; offset < size; offset += 64) __builtin_prefetch(bytes + offset, kWrite);
}

template <typename T>
void load_row(const DwProblem& pb, int64_t b, int64_t row, int64_t c0, int64_t width, ChunkBuffers& buf) {
  const T* src = static_cast<const T*>(pb.y) + ((b * pb.grid_h + row) * pb.grid_w) * pb.dim + c0;
  float* dst = buf.slot(row, pb.k) + (pb.k / 2) * buf.stride;
  for (int64_t col = 0; col < pb.grid_w; ++col) {
    if (col + kAhead < pb.grid_w) prefetch_run<false>(src + (col + kAhead) * pb.dim, width);
    widen_channels(src + col * pb.dim, width, dst + col * buf.stride);
  }
}

// The input rows an output row reads: for each tap row inside the grid, its ring slot (at padded token 0) and
// its k taps. Tap rows outside the grid would read zero padding and are left out.
struct TapRows {
  const float* input[kMaxKernelSize];
  const float* taps[kMaxKernelSize];
  int64_t count = 0;
};

// The convolution (plus bias) of the kLanes channels from c on at output token col: the sum over tap rows and
// taps j of tap * padded input token col + j, so no index leaves the ring.
inline Lanes conv_one(const TapRows& rows, int64_t k, int64_t stride, int64_t col, int64_t c, Lanes bias) {
  Lanes acc = bias;
  for (int64_t t = 0; t < rows.count; ++t) {
    const float* input = rows.input[t] + col * stride + c;
    const float* taps = rows.taps[t] + c;
    for (int64_t j = 0; j < k; ++j) acc += load_lanes(taps + j * stride) * load_lanes(input + j * stride);
  }
  return acc;
}

// v, kept in a register: GCC would otherwise fold the load of a tap into each of the four FMAs that use it, and
// four loads per tap make the convolution load-bound.
inline Lanes in_register(Lanes v) {
  asm("" : "+x"(v));
  return v;
}

// conv_one at output tokens col .. col + 3. Tap j meets input tokens j .. j + 3: the four stay in registers as a
// sliding window, so each step loads one tap and one input token for four FMAs.
struct Four {
  Lanes v0, v1, v2, v3;
};

inline Four conv_four(const TapRows& rows, int64_t k, int64_t stride, int64_t col, int64_t c, Lanes bias) {
  Lanes a0 = bias, a1 = bias, a2 = bias, a3 = bias;
  for (int64_t t = 0; t < rows.count; ++t) {
    const float* input = rows.input[t] + col * stride + c;
    const float* taps = rows.taps[t] + c;
    Lanes x0 = load_lanes(input), x1 = load_lanes(input + stride), x2 = load_lanes(input + 2 * stride);
    for (int64_t j = 0; j < k; ++j) {
      const Lanes x3 = load_lanes(input + (j + 3) * stride);
      const Lanes tap = in_register(load_lanes(taps + j * stride));
      a0 += tap * x0;
      a1 += tap * x1;
      a2 += tap * x2;
      a3 += tap * x3;
      x0 = x1;
      x1 = x2;
      x2 = x3;
    }
  }
  return {a0, a1, a2, a3};
}

// pre[col] = the convolution plus bias at every token col of output row `row` (the chunk's channels, rounded
// up to whole blocks).
void convolve_row(const DwProblem& pb, int64_t row, int64_t width, ChunkBuffers& buf) {
  const int64_t k = pb.k, half = k / 2, gw = pb.grid_w, stride = buf.stride;
  TapRows rows;
  for (int64_t i = std::max<int64_t>(0, half - row); i < std::min(k, pb.grid_h + half - row); ++i) {
    rows.input[rows.count] = buf.slot(row + i - half, k);
    rows.taps[rows.count] = &buf.taps[i * k * stride];
    ++rows.count;
  }
  const float* bias = &buf.taps[k * k * stride];
  float* pre = buf.pre.data();
  for (int64_t c = 0; c < width; c += kLanes) {
    const Lanes b = load_lanes(bias + c);
    int64_t col = 0;
    for (; col + 4 <= gw; col += 4) {
      const Four acc = conv_four(rows, k, stride, col, c, b);
      store_lanes(pre + col * stride + c, acc.v0);
      store_lanes(pre + (col + 1) * stride + c, acc.v1);
      store_lanes(pre + (col + 2) * stride + c, acc.v2);
      store_lanes(pre + (col + 3) * stride + c, acc.v3);
    }
    for (; col < gw; ++col) store_lanes(pre + col * stride + c, conv_one(rows, k, stride, col, c, b));
  }
}

// Output row `row` of image b for the chunk [c0, c0 + width): h = GELU(pre), and the row's sums of y, h (as
// stored, after rounding to H) and s. Token by token, so that h and s are read and written in runs of width
// channels.
template <typename T, typename H>
void output_row(const DwProblem& pb, int64_t b, int64_t row, int64_t c0, int64_t width, ChunkBuffers& buf) {
  convolve_row(pb, row, width, buf);
  const int64_t gw = pb.grid_w, d = pb.dim, stride = buf.stride;
  const float* pre = buf.pre.data();
  const float* center = buf.slot(row, pb.k) + (pb.k / 2) * stride;  // the row's own input tokens: y in fp32
  const int64_t first = (b * pb.grid_h + row) * gw * d + c0;         // token 0 of the row, channel c0
  float* sum_y = buf.sums.data();
  float* sum_h = sum_y + stride;
  float* sum_s = sum_h + stride;
  std::fill(buf.sums.begin(), buf.sums.end(), 0.f);
  for (int64_t col = 0; col < gw; ++col) {
    const T* s = static_cast<const T*>(pb.s) + first + col * d;
    H* h = static_cast<H*>(pb.h) + first + col * d;
    const float* p = pre + col * stride;
    const float* y = center + col * stride;
    if (col + kAhead < gw) {
      prefetch_run<false>(s + kAhead * d, width);
      prefetch_run<true>(h + kAhead * d, width);
    }
    for_each_block(width, [=](int64_t j, auto n) {
      store_out(h + j, gelu_lanes(load_block(p + j, FullBlock{})), n);
      accumulate(sum_h + j, load_block(h + j, n));
      accumulate(sum_y + j, load_block(y + j, FullBlock{}));  // lanes past the chunk hold 0
      accumulate(sum_s + j, load_block(s + j, n));
    });
  }
  float* row_sums = pb.row_sums + (b * pb.grid_h + row) * 3 * d + c0;
  for (int64_t q = 0; q < 3; ++q) std::copy_n(&buf.sums[q * stride], width, row_sums + q * d);
}

// Output rows [row_begin, row_end) of image b, chunk by chunk. The ring fills with input rows in order, each
// converted once: output row `row` needs rows row - k/2 .. row + k/2 (those inside the grid), and the slot an
// input row takes held a row k earlier, which no later output row reads.
template <typename T, typename H>
void output_rows(const DwProblem& pb, int64_t b, int64_t row_begin, int64_t row_end, ChunkBuffers& buf) {
  const int64_t half = pb.k / 2;
  for (int64_t c0 = 0; c0 < pb.dim; c0 += buf.stride) {
    const int64_t width = std::min(buf.stride, pb.dim - c0);
    load_taps(pb, c0, width, buf);
    int64_t next = std::max<int64_t>(0, row_begin - half);  // the first input row not in the ring
    for (int64_t row = row_begin; row < row_end; ++row) {
      for (; next <= std::min(pb.grid_h - 1, row + half); ++next) load_row<T>(pb, b, next, c0, width, buf);
      output_row<T, H>(pb, b, row, c0, width, buf);
    }
  }
}

// sums[b][q] = the sum over b's grid rows, in row order, of row_sums[b * gh + row][q]: the same result for
// any thread count.
void reduce_row_sums(const DwProblem& pb, float* sums, int num_threads) {
  const int64_t d = pb.dim, gh = pb.grid_h;
  parallel_for(pb.batch * 3, num_threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / 3, q = bq % 3;
      const float* rows = pb.row_sums + (b * gh * 3 + q) * d;
      for_each_block(d, [=](int64_t j, auto n) {
        f32x16 acc = {};
        for (int64_t row = 0; row < gh; ++row) acc += load_block(rows + row * 3 * d + j, n);
        store_block(sums + bq * d + j, acc, n);
      });
    }
  });
}

template <typename T, typename H>
void depthwise_gelu(const DwProblem& pb, float* sums, int num_threads) {
  const int64_t chunk = chunk_channels(pb);
  // Threads split the B * gh output rows into contiguous runs, which may span images.
  parallel_for(pb.batch * pb.grid_h, num_threads, [&](int64_t begin, int64_t end, int) {
    ChunkBuffers buf(pb, chunk);
    for (int64_t b = begin / pb.grid_h; b * pb.grid_h < end; ++b) {
      const int64_t row_begin = std::max(begin, b * pb.grid_h) - b * pb.grid_h;
      const int64_t row_end = std::min(end, (b + 1) * pb.grid_h) - b * pb.grid_h;
      output_rows<T, H>(pb, b, row_begin, row_end, buf);
    }
  });
  reduce_row_sums(pb, sums, num_threads);
}

// ---- blend ------------------------------------------------------------------------------------------------

struct BlendProblem {
  const void* y;      // [B, n, d]
  const void* s;      // [B, n, d], y's type
  const void* proj;   // [B, n, d], float or y's type
  const float* bias;  // [d]
  const float* gate;  // [B]
  void* out;          // [B, n, d], y's type
  int64_t batch, tokens, dim;
};

// out = y + proj + bias + gate[b] * s, in the reference's order of additions.
template <typename T, typename P>
void blend(const BlendProblem& pb, int num_threads) {
  const int64_t d = pb.dim;
  parallel_for(pb.batch * pb.tokens, num_threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t t = begin; t < end; ++t) {
      const T* y = static_cast<const T*>(pb.y) + t * d;
      const T* s = static_cast<const T*>(pb.s) + t * d;
      const P* proj = static_cast<const P*>(pb.proj) + t * d;
      T* out = static_cast<T*>(pb.out) + t * d;
      const float gate = pb.gate[t / pb.tokens];
      const float* bias = pb.bias;
      for_each_block(d, [=](int64_t j, auto n) {
        const f32x16 fused = load_block(y + j, n) + load_block(proj + j, n) + load_block(bias + j, n);
        store_out(out + j, fused + gate * load_block(s + j, n), n);
      });
    }
  });
}

// ---- checked arguments ------------------------------------------------------------------------------------

// float32 or the activations' dtype: what h and proj may be (the launcher picks the GEMMs' dtype).
DTypes float32_or(DType dtype) { return DTypes(DTypes(DType::kFloat32).bits | DTypes(dtype).bits); }

// Calls f(T{}, U{}) for the activations' element type T and a second tensor's U, which is float or T.
template <typename F>
void dispatch_pair(DType dtype, DType second, F&& f) {
  dispatch_dtype(static_cast<int>(dtype), [&](auto tag) {
    if (second == DType::kFloat32) {
      f(tag, float{});
    } else {
      f(tag, tag);
    }
  });
}

void check_threads(const char* kernel, int num_threads) {
  if (num_threads < 1) refuse(kernel, "num_threads must be >= 1, got " + std::to_string(num_threads));
}

// The kernel size k of taps [k * k, d]: odd, 1 to kMaxKernelSize.
int64_t kernel_size(const TensorArg& taps, const char* kernel) {
  const int64_t count = taps.sizes[0];
  for (int64_t k = 1; k <= kMaxKernelSize; k += 2) {
    if (k * k == count) return k;
  }
  fail(taps, kernel, "weight", "[k * k, d] with k odd, 1 to " + std::to_string(kMaxKernelSize));
}

}  // namespace

// ---- entry points (registered at the bottom of this file) -------------------------------------------------

namespace entry {

// h = GELU(DWConv_kxk(y) + bias) over the grid_h x grid_w grid (token t = row * grid_w + col), zero padding;
// sums[b] = the token sums of y, h (as stored) and s. See the top of this file. h must not overlap y or s.
void fusion_depthwise_gelu(const TensorArg& y, const TensorArg& s, const TensorArg& weight, const TensorArg& bias,
                           int64_t grid_h, int64_t grid_w, const TensorArg& h, const TensorArg& sums,
                           int num_threads) {
  constexpr const char* kKernel = "fusion_depthwise_gelu";
  check(y, kKernel, "y", contiguous(kFloats, {kAny, kAny, kAny}));
  const int64_t batch = y.sizes[0], tokens = y.sizes[1], dim = y.sizes[2];
  check(s, kKernel, "s", contiguous(y.dtype, {batch, tokens, dim}));
  check(weight, kKernel, "weight", contiguous(DType::kFloat32, {kAny, dim}));
  const int64_t k = kernel_size(weight, kKernel);
  check(bias, kKernel, "bias", contiguous(DType::kFloat32, {dim}));
  check(h, kKernel, "h", contiguous(float32_or(y.dtype), {batch, tokens, dim}));
  check(sums, kKernel, "sums", contiguous(DType::kFloat32, {batch, 3, dim}));
  int64_t grid_tokens = 0;
  if (grid_h < 1 || grid_w < 1 || __builtin_mul_overflow(grid_h, grid_w, &grid_tokens) || grid_tokens != tokens) {
    refuse(kKernel, "grid_h and grid_w must be >= 1 with grid_h * grid_w = n = " + std::to_string(tokens) +
                        " tokens of y, got " + std::to_string(grid_h) + " and " + std::to_string(grid_w));
  }
  check_threads(kKernel, num_threads);
  if (batch == 0 || dim == 0) return;
  std::vector<float> row_sums(batch * grid_h * 3 * dim);
  const DwProblem pb{y.data, s.data, weight.ptr<const float>(), bias.ptr<const float>(), h.data, row_sums.data(),
                     batch,  grid_h, grid_w,                    dim,                     k};
  dispatch_pair(y.dtype, h.dtype, [&](auto t, auto u) {
    depthwise_gelu<decltype(t), decltype(u)>(pb, sums.ptr<float>(), num_threads);
  });
}

// out = y + proj + bias + gate[b] * s, in fp32, one rounding to y's dtype. out may be proj itself (each block is
// read before it is written), but must not overlap the inputs otherwise.
void fusion_blend(const TensorArg& y, const TensorArg& s, const TensorArg& proj, const TensorArg& bias,
                  const TensorArg& gate, const TensorArg& out, int num_threads) {
  constexpr const char* kKernel = "fusion_blend";
  check(y, kKernel, "y", contiguous(kFloats, {kAny, kAny, kAny}));
  const int64_t batch = y.sizes[0], tokens = y.sizes[1], dim = y.sizes[2];
  check(s, kKernel, "s", contiguous(y.dtype, {batch, tokens, dim}));
  check(proj, kKernel, "proj", contiguous(float32_or(y.dtype), {batch, tokens, dim}));
  check(bias, kKernel, "bias", contiguous(DType::kFloat32, {dim}));
  check(gate, kKernel, "gate", contiguous(DType::kFloat32, {batch}));
  check(out, kKernel, "out", contiguous(y.dtype, {batch, tokens, dim}));
  check_threads(kKernel, num_threads);
  const BlendProblem pb{y.data, s.data, proj.data, bias.ptr<const float>(), gate.ptr<const float>(), out.data,
                        batch,  tokens, dim};
  dispatch_pair(y.dtype, proj.dtype,
                [&](auto t, auto u) { blend<decltype(t), decltype(u)>(pb, num_threads); });
}

}  // namespace entry
}  // namespace fastmm

FASTMM_ENTRY_POINTS(m) {
  m.def("fusion_depthwise_gelu", &fastmm::entry::fusion_depthwise_gelu, fastmm::release());
  m.def("fusion_blend", &fastmm::entry::fusion_blend, fastmm::release());
}
