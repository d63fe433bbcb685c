// prune family: what visual-token pruning needs from kernels (fastmm/reference/prune.py has the math).
//
//   attention_importance_fwd: out[b, c] = sum over query heads h and rated rows r, with the column's key j in the
//     row's range, of exp(q[b, h, r] . k[b, h / G, j] * scale - lse[b, h, r]): the attention mass each scored key
//     receives, one exponential per probability thanks to the rows' log-sum-exp.
//   compact_tokens_fwd: each row's kept tokens, in order, packed into the first slots of a fixed-capacity buffer.
//
// attention_importance puts keys in vector lanes: a tile is kTileKeys score columns, whose keys are gathered
// (span_index picks them anywhere in the sequence) and transposed to [d][kTileKeys] in fp32 once per kv head.
// Every query row of that kv head's G heads then makes its scores for the whole tile as rank-1 updates, one
// broadcast of q[c] times one row of the transposed keys per channel c, so a key loaded once serves all G * R
// rows, and the probabilities come out in lanes, ready for a vector exponential and a lane-wise range mask with
// no horizontal sums. Rows are blocked so that several accumulators hide the FMA latency. The queries are
// scaled by scale * log2(e) once up front, so that an exponential is exp2 of (score - lse * log2(e)). Rows whose
// range misses a tile, or whose lse is -inf (they attended nothing), are left out of it; when only a few rows
// remain (FastV's last token), the transposition would cost more than their scores, and each key is dotted with
// them in place instead, channels in lanes.
//
// A thread owns a contiguous run of tiles of one batch row at a time and walks the kv heads outside the tiles,
// so the rows of one kv head stay in cache across its tiles, and each output element is summed by one thread
// (no atomics) and written once.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "common.h"
#include "lanes.h"
#include "module.h"

namespace fastmm {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- native vectors (Lanes: csrc/lanes.h) ------------------------------------------------------------------

typedef int32_t LaneInts __attribute__((vector_size(kLanes * sizeof(int32_t))));

// v in every lane, as one broadcast: Lanes{} + v adds the zeros in a scalar instruction first (0 + -0 is not
// -0), and a loop over the lanes inserts them one by one.
template <std::size_t... I>
inline Lanes splat_lanes(float v, std::index_sequence<I...>) {
  return Lanes{((void)I, v)...};
}
inline Lanes splat_lanes(float v) { return splat_lanes(v, std::make_index_sequence<kLanes>{}); }

// v, kept in a register: GCC would otherwise fold the load of a key vector into each FMA that uses it, one
// load per FMA, and the loads, not the FMAs, would set the pace.
inline Lanes in_register(Lanes v) {
  asm("" : "+x"(v));
  return v;
}

inline LaneInts load_ints(const int32_t* p) {
  LaneInts v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// 2^x lane by lane: x = n + f with n an integer and |f| <= 1/2, 2^f by the degree-6 polynomial of
// csrc/attention.cpp (within about 1 ulp), times 2^n built in the exponent bits. Plain vector arithmetic, so it
// vectorizes at every width (common.h's exp_lanes is scalar std::exp without AVX-512). Below -126 the result
// is 0 (which turns -inf into 0), above 127 it is inf; NaN stays NaN.
inline Lanes exp2_lanes(Lanes x) {
  const Lanes lo = Lanes{} - 126.f, hi = Lanes{} + 127.f;
  Lanes c = x < lo ? lo : x;
  c = c > hi ? hi : c;
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (|c| is far below 2^22).
  const Lanes shifter = Lanes{} + 0x1.8p23f;
  const Lanes whole = (c + shifter) - shifter;
  const Lanes f = c - whole;
  Lanes p = Lanes{} + 0x1.41a6fep-13f;
  p = p * f + 0x1.5f44f0p-10f;
  p = p * f + 0x1.3b2dfep-7f;
  p = p * f + 0x1.c6aed6p-5f;
  p = p * f + 0x1.ebfbdap-3f;
  p = p * f + 0x1.62e430p-1f;
  p = p * f + 1.f;
  const LaneInts exponent = (__builtin_convertvector(whole, LaneInts) + 127) << 23;  // whole in [-126, 127]
  Lanes result = p * reinterpret_cast<Lanes>(exponent);
  result = x < lo ? Lanes{} : result;
  result = x > hi ? Lanes{} + kInf : result;
  return x != x ? x : result;
}

// ---- attention importance ---------------------------------------------------------------------------------

// Score columns per tile: a whole number of native vectors.
constexpr int64_t kTileKeys = 16;
constexpr int64_t kParts = kTileKeys / kLanes;
// Query rows per register block: kRowBlock * kParts accumulators (twelve), enough independent FMAs to cover their
// latency, with room left for the key vectors and the broadcasts.
constexpr int64_t kRowBlock = std::max<int64_t>(1, 12 / kParts);
// Up to this many rows per tile and kv head (FastV's last token: G rows), scores are dot products over the
// channels of each key in place: transposing a tile of keys costs about as much as a few rows' scores.
constexpr int64_t kFewRows = 4;

struct ImportanceProblem {
  const void* k;              // [B, Hkv, S, d]
  const int32_t* row_start;   // [B, R]
  const int32_t* row_end;     // [B, R]
  const float* lse;           // [B, Hq, R]
  const int32_t* span_index;  // [B, n]
  float* out;                 // [B, n]
  int64_t batch, q_heads, kv_heads, rows, keys, dim, columns;
};

// One query row that scores a tile: its scaled fp32 query, log-sum-exp in log2 units and key range
// (clamped to [0, S], so that the range test alone keeps padding lanes, key index -1, out).
struct ActiveRow {
  const float* q;
  float lse2;
  int32_t start, end;
};

// A tile's keys, transposed: keys[c * kTileKeys + i] = k[span_index[c0 + i]][c] in fp32, 0 for padding lanes;
// index[i] the key (or -1).
struct Tile {
  std::vector<float> keys;
  std::vector<float> row;  // [d]: one key widened to fp32
  alignas(64) int32_t index[kTileKeys];
  int32_t first, last;  // the smallest and largest key in the tile (first > last: none)
};

// A key row in fp32: the row itself for float, else widened into `row` (a contiguous loop, which GCC
// vectorizes, where converting while transposing would go element by element).
template <typename T>
const float* widened(const T* key, int64_t dim, float* row) {
  for (int64_t c = 0; c < dim; ++c) row[c] = to_float(key[c]);
  return row;
}
inline const float* widened(const float* key, int64_t, float*) { return key; }

#if defined(__F16C__)
// GCC leaves the fp16 conversion of common.h scalar (a branch per element); F16C converts eight at a time,
// exactly as to_float does.
inline const float* widened(const fp16* key, int64_t dim, float* row) {
  int64_t c = 0;
  for (; c + 8 <= dim; c += 8) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(key + c));
    _mm256_storeu_ps(row + c, _mm256_cvtph_ps(half));
  }
  for (; c < dim; ++c) row[c] = to_float(key[c]);
  return row;
}
#endif

// The keys of columns [c0, c0 + width) (span points at c0) into tile.index, -1 for padding: lanes past the
// width, and span_index values outside [0, S), whatever the caller checked.
void index_tile(const int32_t* span, int64_t width, int64_t num_keys, Tile& tile) {
  tile.first = std::numeric_limits<int32_t>::max();
  tile.last = -1;
  for (int64_t i = 0; i < kTileKeys; ++i) {
    const int32_t j = i < width ? span[i] : -1;
    const bool valid = j >= 0 && j < num_keys;
    tile.index[i] = valid ? j : -1;
    if (valid) {
      tile.first = std::min(tile.first, j);
      tile.last = std::max(tile.last, j);
    }
  }
}

// tile.keys from head ([S, d]), transposed, zeros for padding lanes.
template <typename T>
void transpose_keys(const T* head, int64_t dim, Tile& tile) {
  for (int64_t i = 0; i < kTileKeys; ++i) {
    float* column = tile.keys.data() + i;
    const int32_t j = tile.index[i];
    if (j < 0) {
      for (int64_t c = 0; c < dim; ++c) column[c * kTileKeys] = 0.f;
      continue;
    }
    const float* key = widened(head + j * dim, dim, tile.row.data());
    for (int64_t c = 0; c < dim; ++c) column[c * kTileKeys] = key[c];
  }
}

// a . b over dim fp32 values.
inline float dot(const float* a, const float* b, int64_t dim) {
  Lanes acc[4] = {};
  int64_t c = 0;
  for (; c + 4 * kLanes <= dim; c += 4 * kLanes) {
    for (int64_t u = 0; u < 4; ++u) acc[u] += load_lanes(a + c + u * kLanes) * load_lanes(b + c + u * kLanes);
  }
  for (; c + kLanes <= dim; c += kLanes) acc[0] += load_lanes(a + c) * load_lanes(b + c);
  const Lanes total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  float out = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) out += total[i];
  for (; c < dim; ++c) out += a[c] * b[c];
  return out;
}

// sums[i] += the probabilities of the tile's keys for `count` rows, key by key with the channels in lanes: for
// a few rows, transposing the keys would cost more than the scores themselves.
template <typename T>
void few_rows(const ActiveRow* rows, int64_t count, const T* head, int64_t dim, Tile& tile, float* sums) {
  for (int64_t i = 0; i < kTileKeys; ++i) {
    const int32_t j = tile.index[i];
    if (j < 0) continue;
    const float* key = widened(head + j * dim, dim, tile.row.data());
    float sum = 0.f;
    for (int64_t r = 0; r < count; ++r) {
      if (j >= rows[r].start && j < rows[r].end) sum += std::exp2(dot(rows[r].q, key, dim) - rows[r].lse2);
    }
    sums[i] += sum;
  }
}

// sums (the tile's keys in lanes) += their probabilities for the kRows rows: scores by rank-1 updates over the
// channels, then exp2(score - lse2) where the key lies in the row's range.
template <int64_t kRows>
void row_block(const ActiveRow* rows, const Tile& tile, int64_t dim, Lanes (&sums)[kParts]) {
  Lanes acc[kRows][kParts] = {};
  const float* keys = tile.keys.data();
  for (int64_t c = 0; c < dim; ++c) {
    Lanes key[kParts];
    for (int64_t p = 0; p < kParts; ++p) key[p] = in_register(load_lanes(keys + c * kTileKeys + p * kLanes));
    for (int64_t r = 0; r < kRows; ++r) {
      const Lanes q = splat_lanes(rows[r].q[c]);
      for (int64_t p = 0; p < kParts; ++p) acc[r][p] += q * key[p];
    }
  }
  for (int64_t p = 0; p < kParts; ++p) {
    const LaneInts index = load_ints(tile.index + p * kLanes);
    for (int64_t r = 0; r < kRows; ++r) {
      const Lanes prob = exp2_lanes(acc[r][p] - rows[r].lse2);
      const LaneInts inside = (index >= rows[r].start) & (index < rows[r].end);
      sums[p] += inside ? prob : Lanes{};
    }
  }
}

// Dispatches a block of `count` rows (1 to kRowBlock) to its unrolled kernel.
template <int64_t kRows = kRowBlock>
void row_block_of(int64_t count, const ActiveRow* rows, const Tile& tile, int64_t dim, Lanes (&sums)[kParts]) {
  if constexpr (kRows > 1) {
    if (count < kRows) return row_block_of<kRows - 1>(count, rows, tile, dim, sums);
  }
  row_block<kRows>(rows, tile, dim, sums);
}

// One thread's buffers, reused across its tiles.
struct ImportanceBuffers {
  Tile tile;
  std::vector<ActiveRow> active;
  std::vector<float> sums;  // [tiles * kTileKeys]
};

// out[b, columns of tiles [t0, t1)]: kv head by kv head, tile by tile. qs holds the scaled fp32 queries.
template <typename T>
void importance_tiles(const ImportanceProblem& pb, const float* qs, int64_t b, int64_t t0, int64_t t1,
                      ImportanceBuffers& buf) {
  const int64_t d = pb.dim, R = pb.rows, n = pb.columns, group = pb.q_heads / pb.kv_heads;
  buf.sums.assign((t1 - t0) * kTileKeys, 0.f);
  const int32_t* span = pb.span_index + b * n;
  const int32_t* row_start = pb.row_start + b * R;
  const int32_t* row_end = pb.row_end + b * R;
  const int32_t num_keys = static_cast<int32_t>(pb.keys);
  for (int64_t hk = 0; hk < pb.kv_heads; ++hk) {
    const T* head = static_cast<const T*>(pb.k) + (b * pb.kv_heads + hk) * pb.keys * d;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * kTileKeys, width = std::min(kTileKeys, n - c0);
      index_tile(span + c0, width, pb.keys, buf.tile);
      if (buf.tile.first > buf.tile.last) continue;  // padding columns only
      // The rows that give this tile anything: a range meeting [first, last], a finite log-sum-exp (-inf: the
      // row attended nothing, so it pays no key anything, where exp(score - lse) would be inf or NaN).
      buf.active.clear();
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t r = 0; r < R; ++r) {
          const float lse = pb.lse[(b * pb.q_heads + h) * R + r];
          const int32_t start = std::max(row_start[r], 0), end = std::min(row_end[r], num_keys);
          if (start >= end || end <= buf.tile.first || start > buf.tile.last || lse == -kInf) continue;
          buf.active.push_back({qs + ((b * pb.q_heads + h) * R + r) * d, lse * kLog2e, start, end});
        }
      }
      const int64_t count = static_cast<int64_t>(buf.active.size());
      float* tile_sums = buf.sums.data() + (t - t0) * kTileKeys;
      if (count <= kFewRows) {
        few_rows<T>(buf.active.data(), count, head, d, buf.tile, tile_sums);
        continue;
      }
      transpose_keys<T>(head, d, buf.tile);
      // The kv head's sum apart, then added to the tile's: shorter chains of fp32 additions than one running
      // sum over every head and row.
      Lanes sums[kParts] = {};
      for (int64_t i = 0; i < count; i += kRowBlock) {
        row_block_of(std::min(kRowBlock, count - i), buf.active.data() + i, buf.tile, d, sums);
      }
      for (int64_t p = 0; p < kParts; ++p) {
        store_lanes(tile_sums + p * kLanes, load_lanes(tile_sums + p * kLanes) + sums[p]);
      }
    }
  }
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = t * kTileKeys, width = std::min(kTileKeys, n - c0);
    std::copy_n(buf.sums.data() + (t - t0) * kTileKeys, width, pb.out + b * n + c0);
  }
}

template <typename T>
void attention_importance(const ImportanceProblem& pb, const void* q, float scale, int num_threads) {
  const int64_t d = pb.dim, query_rows = pb.batch * pb.q_heads * pb.rows;
  // The queries in fp32, times scale * log2(e): converted once here rather than once per tile.
  std::unique_ptr<float[]> qs(new float[std::max<int64_t>(query_rows * d, 1)]);
  const float factor = scale * kLog2e;
  parallel_for(query_rows, num_threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = qs.get() + i * d;
      const float* src = widened(static_cast<const T*>(q) + i * d, d, row);
      for (int64_t c = 0; c < d; ++c) row[c] = src[c] * factor;
    }
  });
  const int64_t tiles = (pb.columns + kTileKeys - 1) / kTileKeys;
  parallel_for(pb.batch * tiles, num_threads, [&](int64_t begin, int64_t end, int) {
    ImportanceBuffers buf;
    buf.tile.keys.resize(std::max<int64_t>(d, 1) * kTileKeys);
    buf.tile.row.resize(std::max<int64_t>(d, 1));
    buf.active.reserve(pb.q_heads / pb.kv_heads * pb.rows);
    for (int64_t b = begin / tiles; b * tiles < end; ++b) {
      const int64_t t0 = std::max(begin, b * tiles) - b * tiles;
      const int64_t t1 = std::min(end, (b + 1) * tiles) - b * tiles;
      importance_tiles<T>(pb, qs.get(), b, t0, t1, buf);
    }
  });
}

// ---- compact tokens ---------------------------------------------------------------------------------------

struct CompactProblem {
  const char* hidden;       // [B, L, D] elements of element_size bytes
  const int64_t* positions; // [B, L]
  const uint8_t* keep;      // [B, L] bool
  char* hidden_out;         // [B, capacity, D]
  int64_t* positions_out;   // [B, capacity]
  int32_t* count;           // [B]
  int64_t* source;          // [B, capacity]
  int64_t batch, length, dim, capacity, element_size;
};

// Channels per piece of a row: a row is split over threads only when there are fewer rows than threads, and
// never into pieces so small that the split costs more than the copy.
constexpr int64_t kMinPieceBytes = 4096;

// Row b's kept tokens, channels [c0, c1) of each, into its first slots, then zeros up to the capacity; the
// piece that starts at channel 0 also writes the positions, the sources and the count. A row keeping more than
// the capacity keeps its first `capacity` tokens.
void compact_piece(const CompactProblem& pb, int64_t b, int64_t c0, int64_t c1) {
  const int64_t L = pb.length, D = pb.dim, cap = pb.capacity, es = pb.element_size;
  const int64_t bytes = (c1 - c0) * es;
  const uint8_t* keep = pb.keep + b * L;
  const char* hidden = pb.hidden + (b * L * D + c0) * es;
  char* out = pb.hidden_out + (b * cap * D + c0) * es;
  const bool first_piece = c0 == 0;
  int64_t slot = 0;
  for (int64_t t = 0; t < L && slot < cap; ++t) {
    if (!keep[t]) continue;
    std::memcpy(out + slot * D * es, hidden + t * D * es, bytes);
    if (first_piece) {
      pb.positions_out[b * cap + slot] = pb.positions[b * L + t];
      pb.source[b * cap + slot] = t;
    }
    ++slot;
  }
  for (int64_t s = slot; s < cap; ++s) std::memset(out + s * D * es, 0, bytes);
  if (first_piece) {
    std::fill(pb.positions_out + b * cap + slot, pb.positions_out + (b + 1) * cap, int64_t{0});
    std::fill(pb.source + b * cap + slot, pb.source + (b + 1) * cap, int64_t{-1});
    pb.count[b] = static_cast<int32_t>(slot);
  }
}

void compact_tokens(const CompactProblem& pb, int num_threads) {
  // Pieces per row: enough for the threads when rows are few, each at least kMinPieceBytes wide.
  const int64_t row_bytes = pb.dim * pb.element_size;
  const int64_t wanted = (num_threads + pb.batch - 1) / pb.batch;
  const int64_t pieces = std::max<int64_t>(1, std::min(wanted, row_bytes / kMinPieceBytes));
  parallel_for(pb.batch * pieces, num_threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / pieces, piece = item % pieces;
      compact_piece(pb, b, pb.dim * piece / pieces, pb.dim * (piece + 1) / pieces);
    }
  });
}

// ---- checked arguments ------------------------------------------------------------------------------------

constexpr const char* kKernel = "prune";

void check_threads(int num_threads) {
  if (num_threads < 1) refuse(kKernel, "num_threads must be >= 1, got " + std::to_string(num_threads));
}

}  // namespace

// ---- entry points (registered at the bottom of this file) -------------------------------------------------

namespace entry {

// out[b, c] = the summed probabilities that the R rows of q_rows pay key span_index[b, c] (see the top of this
// file). Key indices outside [0, S) and rows outside [0, S] are clamped away, never read.
void attention_importance_fwd(const TensorArg& q_rows, const TensorArg& k, const TensorArg& row_start,
                              const TensorArg& row_end, const TensorArg& lse, const TensorArg& span_index,
                              const TensorArg& out, double scale, int num_threads) {
  check(q_rows, kKernel, "q_rows", contiguous(kFloats, {kAny, kAny, kAny, kAny}));
  const int64_t batch = q_rows.sizes[0], q_heads = q_rows.sizes[1], rows = q_rows.sizes[2], dim = q_rows.sizes[3];
  check(k, kKernel, "k", contiguous(q_rows.dtype, {batch, kAny, kAny, dim}));
  const int64_t kv_heads = k.sizes[1], keys = k.sizes[2];
  if (kv_heads < 1 || q_heads % kv_heads) {
    fail(k, kKernel, "k", "[B, Hkv, S, d] with Hkv >= 1 dividing Hq = " + std::to_string(q_heads));
  }
  if (keys > std::numeric_limits<int32_t>::max()) fail(k, kKernel, "k", "[B, Hkv, S, d] with S < 2^31");
  check(row_start, kKernel, "row_start", contiguous(DType::kInt32, {batch, rows}));
  check(row_end, kKernel, "row_end", contiguous(DType::kInt32, {batch, rows}));
  check(lse, kKernel, "lse", contiguous(DType::kFloat32, {batch, q_heads, rows}));
  check(span_index, kKernel, "span_index", contiguous(DType::kInt32, {batch, kAny}));
  const int64_t columns = span_index.sizes[1];
  check(out, kKernel, "out", contiguous(DType::kFloat32, {batch, columns}));
  check_threads(num_threads);
  if (!std::isfinite(scale)) refuse(kKernel, "scale must be finite, got " + std::to_string(scale));
  if (batch * columns == 0) return;
  const ImportanceProblem pb{k.data,   row_start.ptr<const int32_t>(), row_end.ptr<const int32_t>(),
                             lse.ptr<const float>(), span_index.ptr<const int32_t>(), out.ptr<float>(),
                             batch,    q_heads,  kv_heads, rows, keys, dim, columns};
  dispatch_dtype(static_cast<int>(q_rows.dtype), [&](auto tag) {
    attention_importance<decltype(tag)>(pb, q_rows.data, static_cast<float>(scale), num_threads);
  });
}

// Row b's tokens where keep is set, in order, into slots [0, count[b]) of hidden_out, positions_out and source
// (the token's index); zeros, 0 and -1 past the count. The capacity is hidden_out's second dim; a row keeping
// more keeps its first `capacity` tokens. The outputs must not overlap the inputs.
void compact_tokens_fwd(const TensorArg& hidden, const TensorArg& positions, const TensorArg& keep,
                        const TensorArg& hidden_out, const TensorArg& positions_out, const TensorArg& count,
                        const TensorArg& source, int num_threads) {
  check(hidden, kKernel, "hidden", contiguous(kFloats, {kAny, kAny, kAny}));
  const int64_t batch = hidden.sizes[0], length = hidden.sizes[1], dim = hidden.sizes[2];
  check(positions, kKernel, "positions", contiguous(DType::kInt64, {batch, length}));
  check(keep, kKernel, "keep", contiguous(DType::kBool, {batch, length}));
  check(hidden_out, kKernel, "hidden_out", contiguous(hidden.dtype, {batch, kAny, dim}));
  const int64_t capacity = hidden_out.sizes[1];
  check(positions_out, kKernel, "positions_out", contiguous(DType::kInt64, {batch, capacity}));
  check(count, kKernel, "count", contiguous(DType::kInt32, {batch}));
  check(source, kKernel, "source", contiguous(DType::kInt64, {batch, capacity}));
  check_threads(num_threads);
  if (batch == 0) return;
  const CompactProblem pb{static_cast<const char*>(hidden.data),
                          positions.ptr<const int64_t>(),
                          keep.ptr<const uint8_t>(),
                          static_cast<char*>(hidden_out.data),
                          positions_out.ptr<int64_t>(),
                          count.ptr<int32_t>(),
                          source.ptr<int64_t>(),
                          batch,
                          length,
                          dim,
                          capacity,
                          hidden.element_size};
  compact_tokens(pb, num_threads);
}

}  // namespace entry
}  // namespace fastmm

FASTMM_ENTRY_POINTS(m) {
  m.def("attention_importance_fwd", &fastmm::entry::attention_importance_fwd, fastmm::release());
  m.def("compact_tokens_fwd", &fastmm::entry::compact_tokens_fwd, fastmm::release());
}
