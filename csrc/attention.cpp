// attention family: span attention (one key range per query) and decode attention over a static KV cache.
//
// Span attention is flash attention on the CPU. A work item is one (batch row, kv head, query tile); its
// query tile holds the tile's queries for all G = Hq / Hkv query heads of the kv head (GQA), so each K/V tile
// is read once for the whole group. The item walks the keys that any of its queries may attend, in tiles of
// kKeyTile, keeping an online softmax in fp32:
//
//   skipped  keys outside [min kv_start, max kv_end) of the tile's queries are never visited;
//   plain    tiles inside every query's range take no mask;
//   masked   the rest compare each key with each query's range.
//
// Queries sit in vector lanes: a "panel" is 16 queries of one head, and everything per query (the running
// max and sum, the range, the output) is a 16-lane vector. Both products then are rank-1 updates of panels by
// broadcast scalars, read straight from K and V in their row-major layout (no transpose of K):
//
//   scores[j][p] = sum_c K[j][c] * Qt[c][p]       Qt: queries transposed, pre-scaled by scale * log2(e)
//   Ot[c][p]     = alpha[p] * Ot[c][p] + sum_j V[j][c] * P[j][p]
//
// One micro-kernel (panel_product) serves both: a register block of 6 scalars x 4 panels, 24 accumulators,
// 4 vector loads and 6 broadcasts per 24 FMAs. The row max over keys is a lane-wise max over rows, so the
// softmax needs no horizontal reductions. Scores live in log2 units, so exp is exp2.
//
// Decode attention has one or a few queries per head: queries in lanes would leave 15 of 16 lanes idle, so it
// puts 16 keys in the lanes instead, and streams the cache once (the work is memory-bound). When batch x
// kv_heads gives the threads too few items, the cache is split into chunks whose partial results (unnormalized
// output, max, sum) are merged by log-sum-exp afterwards (flash-decoding).
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention.h"
#include "common.h"
#include "lanes.h"
#include "module.h"

namespace fastmm {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- lanes ------------------------------------------------------------------------------------------------

// 2^f for |f| <= 1/2 by a degree-6 polynomial (relative error 2e-9): the part of 2^x both builds share.
// V is f32x16 or Lanes (the same type with AVX-512).
template <typename V>
V exp2_fraction(V f) {
  V p = V{} + 0x1.41a6fep-13f;
  p = fma_lanes(p, f, V{} + 0x1.5f44f0p-10f);
  p = fma_lanes(p, f, V{} + 0x1.3b2dfep-7f);
  p = fma_lanes(p, f, V{} + 0x1.c6aed6p-5f);
  p = fma_lanes(p, f, V{} + 0x1.ebfbdap-3f);
  p = fma_lanes(p, f, V{} + 0x1.62e430p-1f);
  p = fma_lanes(p, f, V{} + 1.f);
  return p;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// GCC 12's intrinsic headers trip -W(maybe-)uninitialized on their own _mm512_undefined_ps (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// 2^x: x = n + f with n an integer and |f| <= 1/2, 2^f by exp2_fraction (so the result is within about 1 ulp),
// times 2^n by vscalefps. Below -150 every result rounds to 0; clamping there
// turns -inf (a masked score) into 0 instead of NaN. vmaxps returns its second operand when one is NaN, so a
// NaN stays NaN.
inline f32x16 exp2_lanes(f32x16 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-150.f), x);
  const f32x16 whole = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(exp2_fraction(x - whole), whole);
}

// out[j] = sum of the lanes of v[j]: four rounds of shuffles that each halve the partial sums per vector
// while doubling the vectors per register, 15 shuffle pairs and adds instead of 16 separate reductions. They
// leave key j = q + 4 t in lane 4 q + t, so a final permutation (a 4 x 4 transpose) puts key j in lane j.
inline f32x16 transpose_sum(const f32x16 (&v)[kBlock]) {
  __m512 halves[8], quarters[4], eighths[2];
  for (int i = 0; i < 8; ++i) {
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                              _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xee));
  }
  for (int i = 0; i < 4; ++i) {
    quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0x88),
                                _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0xdd));
  }
  for (int i = 0; i < 2; ++i) {
    eighths[i] = _mm512_add_ps(_mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(eighths[0], eighths[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(eighths[0], eighths[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i key_order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(key_order, sums);
}
#pragma GCC diagnostic pop
#else
// Builds without AVX-512. 2^x as above, with the scaling by 2^n done in two exponent-field halves (n alone
// reaches -150, below the smallest normal exponent): 2^-150 and below round to 0, like vscalefps. The
// comparison that clamps keeps a NaN (it compares false), and the NaN flows through the polynomial. V is
// f32x16 or Lanes; a comparison of two V gives the integer vector of the same width.
template <typename V>
V exp2_lanes(V x) {
  using Ints = decltype(x < x);
  x = x < -150.f ? V{} - 150.f : x;
  x = x > 128.f ? V{} + 128.f : x;
  const V round_bias = V{} + 0x1.8p23f;  // adding and subtracting it rounds to the nearest integer
  const V whole = (x + round_bias) - round_bias;
  const V p = exp2_fraction(x - whole);
  const Ints n = __builtin_convertvector(x == x ? whole : V{}, Ints);
  const Ints half = n >> 1;
  const auto power = [](Ints e) { return reinterpret_cast<V>((e + 127) << 23); };
  return p * power(half) * power(n - half);
}

#if defined(__AVX__)
// out[j] = sum of the lanes of h[j] for 8 vectors of 8 lanes: two rounds of horizontal adds and one swap of
// 128-bit halves.
inline Lanes transpose_sum8(const Lanes (&h)[8]) {
  const __m256 pairs0 = _mm256_hadd_ps(h[0], h[1]), pairs1 = _mm256_hadd_ps(h[2], h[3]);
  const __m256 pairs2 = _mm256_hadd_ps(h[4], h[5]), pairs3 = _mm256_hadd_ps(h[6], h[7]);
  const __m256 low = _mm256_hadd_ps(pairs0, pairs1), high = _mm256_hadd_ps(pairs2, pairs3);
  return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
}
#endif
#endif

// Lane-wise max; a NaN in v is dropped here and propagates through exp2(v - max) instead.
inline f32x16 max_lanes(f32x16 v, f32x16 running) { return v > running ? v : running; }

// v where first <= j < last lane by lane, -inf elsewhere.
inline f32x16 mask_outside(f32x16 v, int32_t j, i32x16 first, i32x16 last) {
  const i32x16 key = i32x16{} + j;
  return (key >= first) & (key < last) ? v : splat(-kInf);
}

// tanh(x) = 1 - 2 / (1 + e^(2x)), e^(2x) = 2^(2x log2(e)): exp2_lanes gives 0 far below 0 (tanh = -1) and inf
// far above (tanh = 1). Absolute error about 1e-7 near 0, where the subtraction cancels.
inline f32x16 tanh_lanes(f32x16 x) { return 1.f - 2.f / (1.f + exp2_lanes(x * (2.f * kLog2e))); }

// Logit capping in log2 units: a score s = logit * log2(e) becomes cap * tanh(s / cap) with cap = softcap *
// log2(e), which is softcap * tanh(logit / softcap) in log2 units.
inline f32x16 softcap_lanes(f32x16 s, float cap) { return cap * tanh_lanes(s / cap); }

// A running max of -inf (nothing attended yet) is used as 0 so that exp2(score - max) stays 0, not NaN.
inline f32x16 finite_or_zero(f32x16 running_max) { return running_max == -kInf ? f32x16{} : running_max; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- panel product ----------------------------------------------------------------------------------------

// c[r][p] = (rescale ? c[r][p] * rescale[p] : 0) + sum over k of a[r][k] * b[k][p], for rows r < rows and
// panels p < panels; a holds scalars (broadcast to all lanes), b and c 16-lane vectors.
struct PanelProduct {
  const float* a;  // a[r][k] at a[r * a_row + k * a_k]
  int64_t a_row, a_k;
  const f32x16* b;  // [depth][b_stride]: b[k][p] at b[k * b_stride + p]
  int64_t b_stride;
  f32x16* c;  // [rows][c_stride]: c[r][p] at c[r * c_stride + p]
  int64_t c_stride;
  const f32x16* rescale;  // [panels] or null
  int64_t rows, panels, depth;
};

constexpr int kBlockRows = 6;
constexpr int kBlockPanels = 4;

// One register block of R rows x P panels at (r0, p0): R * P accumulators stay in registers over the whole
// depth; each k loads P vectors of b and broadcasts R scalars of a.
template <int R, int P>
void product_block(const PanelProduct& g, int64_t r0, int64_t p0) {
  f32x16 acc[R][P];
  for (int i = 0; i < R; ++i) {
    for (int p = 0; p < P; ++p) {
      acc[i][p] = g.rescale ? g.c[(r0 + i) * g.c_stride + p0 + p] * g.rescale[p0 + p] : f32x16{};
    }
  }
  const float* a = g.a + r0 * g.a_row;
  const f32x16* b = g.b + p0;
  for (int64_t k = 0; k < g.depth; ++k, a += g.a_k, b += g.b_stride) {
    f32x16 bk[P];
    for (int p = 0; p < P; ++p) bk[p] = b[p];
    for (int i = 0; i < R; ++i) {
      const f32x16 ai = splat(a[i * g.a_row]);
      for (int p = 0; p < P; ++p) acc[i][p] = fma_lanes(ai, bk[p], acc[i][p]);
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int p = 0; p < P; ++p) g.c[(r0 + i) * g.c_stride + p0 + p] = acc[i][p];
  }
}

using BlockKernel = void (*)(const PanelProduct&, int64_t, int64_t);

template <int R>
constexpr std::array<BlockKernel, kBlockPanels> blocks_of_rows() {
  return {product_block<R, 1>, product_block<R, 2>, product_block<R, 3>, product_block<R, 4>};
}

// kBlockKernels[R - 1][P - 1]: the full block and every remainder shape.
constexpr std::array<std::array<BlockKernel, kBlockPanels>, kBlockRows> kBlockKernels = {
    blocks_of_rows<1>(), blocks_of_rows<2>(), blocks_of_rows<3>(),
    blocks_of_rows<4>(), blocks_of_rows<5>(), blocks_of_rows<6>()};

void panel_product(const PanelProduct& g) {
  for (int64_t p0 = 0; p0 < g.panels; p0 += kBlockPanels) {
    const int64_t panels = std::min<int64_t>(kBlockPanels, g.panels - p0);
    for (int64_t r0 = 0; r0 < g.rows; r0 += kBlockRows) {
      const int64_t rows = std::min<int64_t>(kBlockRows, g.rows - r0);
      kBlockKernels[rows - 1][panels - 1](g, r0, p0);
    }
  }
}

// ---- span attention: tiles --------------------------------------------------------------------------------

// Keys per key tile: at d = 128 the tile's fp32 K and V rows (64 KiB each) and scores (32 KiB) stay in L2.
// 128 measured a few percent faster than 64 (fewer softmax passes and calls); the last tile of a causal row
// wastes no more, as the walk ends at the tile's largest kv_end.
constexpr int64_t kKeyTile = 128;
// Query rows (heads x queries) per query tile: 4 panels, the register block's width.
constexpr int64_t kTileRows = kBlockPanels * kBlock;

// Queries [begin, begin + count) of one batch row, and the extremes of their key ranges.
struct QueryTile {
  int64_t begin, count;
  int32_t min_start, max_start, min_end, max_end;

  // Keys some query of the tile attends lie in [min_start, max_end); none when that is empty.
  int64_t keys() const { return std::max<int64_t>(0, max_end - min_start); }
  // Keys [lo, hi) need no mask when they lie inside every query's range.
  bool inside_every_range(int64_t lo, int64_t hi) const { return max_start <= lo && hi <= min_end; }
};

struct SpanArgs {
  const void* q;            // [batch, q_heads, num_queries, dim]
  const void* k;            // [batch, kv_heads, num_keys, dim]
  const void* v;            // [batch, kv_heads, num_keys, dim]
  const int32_t* kv_start;  // [batch, num_queries]
  const int32_t* kv_end;    // [batch, num_queries]
  void* o;                  // [batch, q_heads, num_queries, dim]
  float* lse;               // [batch, q_heads, num_queries]
  int64_t batch, q_heads, kv_heads, num_queries, num_keys, dim;
  float scale;
  Masking masking;

  // Whether any key tile needs per-key work beyond the range test.
  bool masks_keys() const { return masking.key_keep || masking.allowed || masking.bias; }
};

// Queries per tile and head: kTileRows shared by the group's heads, whole panels, at least one panel.
int64_t queries_per_tile(int64_t group) { return std::max<int64_t>(1, kTileRows / group / kBlock) * kBlock; }

std::vector<QueryTile> query_tiles(const SpanArgs& a, int64_t tile_queries) {
  const int64_t tiles_per_row = ceil_div(a.num_queries, tile_queries);
  std::vector<QueryTile> tiles(a.batch * tiles_per_row);
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t t = 0; t < tiles_per_row; ++t) {
      QueryTile& tile = tiles[b * tiles_per_row + t];
      tile.begin = t * tile_queries;
      tile.count = std::min(tile_queries, a.num_queries - tile.begin);
      const int32_t* start = a.kv_start + b * a.num_queries + tile.begin;
      const int32_t* end = a.kv_end + b * a.num_queries + tile.begin;
      tile.min_start = *std::min_element(start, start + tile.count);
      tile.max_start = *std::max_element(start, start + tile.count);
      tile.min_end = *std::min_element(end, end + tile.count);
      tile.max_end = *std::max_element(end, end + tile.count);
    }
  }
  return tiles;
}

// Per-thread buffers of one work item, reused across items. Vectors of f32x16 are 64-byte aligned.
struct SpanWorkspace {
  std::vector<f32x16> queries;    // [dim][panels]: Qt, scaled by scale * log2(e); padding lanes 0
  std::vector<f32x16> out;        // [dim][panels]: Ot, unnormalized
  std::vector<f32x16> scores;     // [kKeyTile][panels]: scores, then probabilities
  std::vector<f32x16> row_max;    // [panels], log2 units
  std::vector<f32x16> row_sum;    // [panels]
  std::vector<f32x16> rescale;    // [panels]: exp2(previous max - new max)
  std::vector<i32x16> first_key;  // [panels]: kv_start of each lane's query
  std::vector<i32x16> last_key;   // [panels]: kv_end
  std::vector<float> keys, values;  // [kKeyTile][dim]: fp32 copies of 16-bit K and V tiles
  std::vector<float> row;           // [dim]: one output row on its way out
  std::vector<int64_t> pair_rows;   // [tile queries]: offset of each query's row in a [queries][keys] mask

  SpanWorkspace(int64_t dim, int64_t panels, int64_t tile_queries)
      : queries(dim * panels), out(dim * panels), scores(kKeyTile * panels), row_max(panels),
        row_sum(panels), rescale(panels), first_key(panels), last_key(panels), keys(kKeyTile * dim),
        values(kKeyTile * dim), row(dim), pair_rows(tile_queries) {}
};

// Rows [first, first + count) of a [length][dim] K or V head as fp32: the rows themselves for fp32, else a
// converted copy in buffer.
const float* rows_as_float(const float* src, int64_t first, int64_t, int64_t dim, std::vector<float>&) {
  return src + first * dim;
}

template <typename T>
const float* rows_as_float(const T* src, int64_t first, int64_t count, int64_t dim, std::vector<float>& buffer) {
  const T* rows = src + first * dim;
  for_each_block(count * dim, [&](int64_t j, auto n) { store_block(buffer.data() + j, load_block(rows + j, n), n); });
  return buffer.data();
}

// ---- span attention: one work item ------------------------------------------------------------------------

// One (batch row, kv head, query tile). Panel p = g * chunks + c holds queries [16 c, 16 c + 16) of the tile
// for query head kv_head * group + g.
template <typename T>
class SpanItem {
 public:
  SpanItem(const SpanArgs& a, SpanWorkspace& ws, const QueryTile& tile, int64_t batch_row, int64_t kv_head)
      : a_(a), ws_(ws), tile_(tile), b_(batch_row), kv_head_(kv_head), group_(a.q_heads / a.kv_heads),
        chunks_(ceil_div(tile.count, kBlock)), panels_(group_ * chunks_) {}

  void run() {
    load_queries();
    const int64_t head_offset = (b_ * a_.kv_heads + kv_head_) * a_.num_keys * a_.dim;
    const T* k = static_cast<const T*>(a_.k) + head_offset;
    const T* v = static_cast<const T*>(a_.v) + head_offset;
    for (int64_t lo = tile_.min_start; lo < tile_.max_end; lo += kKeyTile) {
      const int64_t count = std::min<int64_t>(kKeyTile, tile_.max_end - lo);
      const float* keys = rows_as_float(k, lo, count, a_.dim, ws_.keys);
      const float* values = rows_as_float(v, lo, count, a_.dim, ws_.values);
      key_tile(keys, values, lo, count);
    }
    store_outputs();
  }

 private:
  int64_t query_row(int64_t g, int64_t query) const {
    return (b_ * a_.q_heads + kv_head_ * group_ + g) * a_.num_queries + tile_.begin + query;
  }

  // Qt for every panel, zero running statistics and output; lanes past the tile's queries hold zero queries
  // with an empty range and are never stored.
  void load_queries() {
    const T* q = static_cast<const T*>(a_.q);
    const float q_scale = a_.scale * kLog2e;
    std::fill_n(ws_.queries.begin(), a_.dim * panels_, f32x16{});
    std::fill_n(ws_.out.begin(), a_.dim * panels_, f32x16{});
    for (int64_t p = 0; p < panels_; ++p) {
      const int64_t g = p / chunks_, chunk = p % chunks_;
      const int64_t lanes = std::min<int64_t>(kBlock, tile_.count - chunk * kBlock);
      ws_.row_max[p] = splat(-kInf);
      ws_.row_sum[p] = f32x16{};
      ws_.first_key[p] = i32x16{};
      ws_.last_key[p] = i32x16{};
      for (int64_t t = 0; t < lanes; ++t) {
        const int64_t query = chunk * kBlock + t;
        const int64_t range = b_ * a_.num_queries + tile_.begin + query;
        ws_.pair_rows[query] = range * a_.num_keys;
        ws_.first_key[p][t] = a_.kv_start[range];
        ws_.last_key[p][t] = a_.kv_end[range];
        const T* src = q + query_row(g, query) * a_.dim;
        float* row = ws_.row.data();
        for_each_block(a_.dim, [=](int64_t c, auto n) { store_block(row + c, load_block(src + c, n) * q_scale, n); });
        for (int64_t c = 0; c < a_.dim; ++c) ws_.queries[c * panels_ + p][t] = row[c];
      }
    }
  }

  // Keys [lo, lo + count), rows of keys and values (fp32, [count][dim]).
  void key_tile(const float* keys, const float* values, int64_t lo, int64_t count) {
    f32x16* scores = ws_.scores.data();
    panel_product({keys, a_.dim, 1, ws_.queries.data(), panels_, scores, panels_, nullptr, count, panels_,
                   a_.dim});
    const bool masked = a_.masks_keys() || !tile_.inside_every_range(lo, lo + count);
    for (int64_t p = 0; p < panels_; ++p) softmax_panel(p, lo, count, masked);
    panel_product({values, 1, a_.dim, scores, panels_, ws_.out.data(), panels_, ws_.rescale.data(), a_.dim,
                   panels_, count});
  }

  // Online softmax of panel p over the tile's scores: masks them if needed, turns them into exp2(score - new
  // max), and updates the running max and sum; rescale[p] is what the output accumulated so far must be
  // multiplied by.
  void softmax_panel(int64_t p, int64_t lo, int64_t count, bool masked) {
    f32x16* scores = ws_.scores.data() + p;
    const int64_t stride = panels_;
    f32x16 new_max = ws_.row_max[p];
    if (a_.masking.softcap > 0.f) {
      const float cap = a_.masking.softcap * kLog2e;
      for (int64_t j = 0; j < count; ++j) scores[j * stride] = softcap_lanes(scores[j * stride], cap);
    }
    if (masked) {
      for (int64_t j = 0; j < count; ++j) {
        f32x16& s = scores[j * stride];
        s = mask_outside(s, static_cast<int32_t>(lo + j), ws_.first_key[p], ws_.last_key[p]);
        if (a_.masks_keys()) s = mask_key(s, p, lo + j);
        new_max = max_lanes(s, new_max);
      }
    } else {
      for (int64_t j = 0; j < count; ++j) new_max = max_lanes(scores[j * stride], new_max);
    }
    const f32x16 shift = finite_or_zero(new_max);
    f32x16 sum = {};
    for (int64_t j = 0; j < count; ++j) {
      f32x16& s = scores[j * stride];
      s = exp2_lanes(s - shift);
      sum += s;
    }
    ws_.rescale[p] = exp2_lanes(ws_.row_max[p] - shift);
    ws_.row_sum[p] = ws_.row_sum[p] * ws_.rescale[p] + sum;
    ws_.row_max[p] = new_max;
  }

  // Panel p's scores for key `key` under key_keep, the pair mask and the bias. A query's mask row is read one
  // key at a time (16 gathers per key and panel): a few percent of the 2 x dim FMAs each key costs the panel.
  f32x16 mask_key(f32x16 s, int64_t p, int64_t key) const {
    const Masking& m = a_.masking;
    if (m.key_keep && !m.key_keep[b_ * a_.num_keys + key]) return splat(-kInf);
    if (!m.allowed && !m.bias) return s;
    const int64_t chunk = p % chunks_;
    const int64_t lanes = std::min<int64_t>(kBlock, tile_.count - chunk * kBlock);
    const int64_t* rows = ws_.pair_rows.data() + chunk * kBlock;
    for (int64_t t = 0; t < lanes; ++t) {
      const int64_t pair = rows[t] + key;
      if (m.bias) s[t] += m.bias[pair] * kLog2e;
      if (m.allowed && !m.allowed[pair]) s[t] = -kInf;
    }
    return s;
  }

  // o = Ot / sum (0 for an empty range) and lse = (max + log2(sum)) * ln 2 (-inf for an empty range).
  void store_outputs() {
    T* o = static_cast<T*>(a_.o);
    for (int64_t p = 0; p < panels_; ++p) {
      const int64_t g = p / chunks_, chunk = p % chunks_;
      const int64_t lanes = std::min<int64_t>(kBlock, tile_.count - chunk * kBlock);
      for (int64_t t = 0; t < lanes; ++t) {
        const float sum = ws_.row_sum[p][t];
        const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
        float* row = ws_.row.data();
        for (int64_t c = 0; c < a_.dim; ++c) row[c] = ws_.out[c * panels_ + p][t] * inv_sum;
        const int64_t out_row = query_row(g, chunk * kBlock + t);
        T* dst = o + out_row * a_.dim;
        for_each_block(a_.dim, [=](int64_t c, auto n) { store_block(dst + c, load_block(row + c, n), n); });
        a_.lse[out_row] = sum > 0.f ? (ws_.row_max[p][t] + std::log2(sum)) * kLn2 : -kInf;
      }
    }
  }

  const SpanArgs& a_;
  SpanWorkspace& ws_;
  const QueryTile& tile_;
  const int64_t b_, kv_head_, group_, chunks_, panels_;
};

// ---- span attention: scheduling ---------------------------------------------------------------------------

// Work items (batch row, kv head, query tile) run through a dynamic schedule, costliest first: causal tiles
// differ in cost by up to L / kKeyTile times, and on a shared machine a static split would also wait for the
// slowest core.
template <typename T>
void span_attention(const SpanArgs& a, int num_threads) {
  const int64_t group = a.q_heads / a.kv_heads;
  const int64_t tile_queries = queries_per_tile(group);
  const int64_t tiles_per_row = ceil_div(a.num_queries, tile_queries);
  const std::vector<QueryTile> tiles = query_tiles(a, tile_queries);

  const int64_t num_items = a.batch * a.kv_heads * tiles_per_row;  // item = (b * kv_heads + h) * tiles + t
  auto tile_of = [&](int64_t item) -> const QueryTile& {
    return tiles[item / (a.kv_heads * tiles_per_row) * tiles_per_row + item % tiles_per_row];
  };
  auto cost = [&](int64_t item) { return tile_of(item).keys() + kKeyTile; };  // + packing and output
  std::vector<int64_t> order(num_items);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost(x) > cost(y); });

  const int64_t max_panels = group * ceil_div(tile_queries, kBlock);
#pragma omp parallel num_threads(team_size(num_items, num_threads))
  {
    SpanWorkspace ws(a.dim, max_panels, tile_queries);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_items; ++i) {
      const int64_t item = order[i];
      const int64_t head = item / tiles_per_row;  // b * kv_heads + kv head
      SpanItem<T>(a, ws, tile_of(item), head / a.kv_heads, head % a.kv_heads).run();
    }
  }
}

// ---- decode attention -------------------------------------------------------------------------------------

struct DecodeArgs {
  const void* q;             // [batch, q_heads, num_queries, dim]
  const void* k_cache;       // [batch, kv_heads, cache_size, dim]
  const void* v_cache;       // [batch, kv_heads, cache_size, dim]
  const int32_t* cache_len;  // [batch]
  void* o;                   // [batch, q_heads, num_queries, dim]
  float* lse;                // [batch, q_heads, num_queries] or null
  int64_t batch, q_heads, kv_heads, num_queries, cache_size, dim;
  float scale;
  Masking masking;  // key_keep unused

  // Query rows per kv head: its group's heads times the queries, consecutive in q and o.
  int64_t rows() const { return q_heads / kv_heads * num_queries; }
};

// Splits of each cache: enough items for 4 per thread (so unequal cache lengths still balance), but chunks of
// at least kMinSplitKeys keys, below which the merge and the per-item setup stop paying for themselves.
constexpr int64_t kMinSplitKeys = 512;

int64_t cache_chunk(const DecodeArgs& a, int num_threads) {
  const int64_t heads = a.batch * a.kv_heads;
  const int64_t wanted = ceil_div(4 * num_threads, heads);
  const int64_t splits = std::max<int64_t>(1, std::min(wanted, a.cache_size / kMinSplitKeys));
  return ceil_div(ceil_div(a.cache_size, splits), kBlock) * kBlock;
}

// Partial results of every (batch row, kv head, split, query row): unnormalized output, max (log2 units), sum.
struct DecodePartials {
  int64_t splits, dim_blocks;
  std::vector<f32x16> out;  // [batch * kv_heads][splits][rows][dim_blocks]
  std::vector<float> max, sum;  // [batch * kv_heads][splits][rows]

  DecodePartials(const DecodeArgs& a, int64_t splits_)
      : splits(splits_), dim_blocks(ceil_div(a.dim, kBlock)),
        out(a.batch * a.kv_heads * splits * a.rows() * dim_blocks), max(a.batch * a.kv_heads * splits * a.rows()),
        sum(max.size()) {}
};

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Lane partials of the dot product of a query (fp32, zero-padded to whole blocks) with one key row: two
// accumulators, so that the chain of FMAs is half as long.
template <typename T>
f32x16 dot_partials(const f32x16* q, const T* key, int64_t dim) {
  f32x16 even = {}, odd = {};
  int64_t c = 0;
  for (; c + 2 * kBlock <= dim; c += 2 * kBlock) {
    even = fma_lanes(q[c / kBlock], load_block(key + c, FullBlock{}), even);
    odd = fma_lanes(q[c / kBlock + 1], load_block(key + c + kBlock, FullBlock{}), odd);
  }
  if (c + kBlock <= dim) {
    even = fma_lanes(q[c / kBlock], load_block(key + c, FullBlock{}), even);
    c += kBlock;
  }
  if (c < dim) odd = fma_lanes(q[c / kBlock], load_block(key + c, dim - c), odd);
  return even + odd;
}

// Scores of one query against 16 keys (rows of k at stride dim), one per lane. Keys are read row by row, in
// memory order: reading a 64-byte column across the 16 rows instead streams the cache at a third of the
// memory bandwidth, because the hardware prefetchers do not follow that pattern.
template <typename T>
f32x16 key_scores(const f32x16* q, const T* k, int64_t dim) {
  f32x16 partials[kBlock];
  for (int j = 0; j < kBlock; ++j) partials[j] = dot_partials(q, k + j * dim, dim);
  return transpose_sum(partials);
}

// out[b] = out[b] * rescale + sum over j < count of p[j] * v[j][16 b ...], for N whole blocks b of the output
// starting at block first, held in registers while the value rows stream by in memory order.
template <int N, typename T>
void accumulate_values(f32x16* out, float rescale, const float* p, const T* v, int64_t count, int64_t dim,
                       int64_t first) {
  f32x16 acc[N];
  for (int i = 0; i < N; ++i) acc[i] = out[first + i] * rescale;
  const T* row = v + first * kBlock;
  for (int64_t j = 0; j < count; ++j, row += dim) {
    const f32x16 pj = splat(p[j]);
    for (int i = 0; i < N; ++i) acc[i] = fma_lanes(pj, load_block(row + i * kBlock, FullBlock{}), acc[i]);
  }
  for (int i = 0; i < N; ++i) out[first + i] = acc[i];
}

// Up to kValueBlocks output blocks per pass over the value rows: d <= 128 takes one pass.
constexpr int64_t kValueBlocks = 8;

// out[j] = the scores of query q against keys j < kKeyGroup (rows of k at stride dim).
constexpr int64_t kKeyGroup = kBlock;
template <typename T>
void key_group_scores(const f32x16* q, const T* k, int64_t dim, float* out) {
  const f32x16 scores = key_scores(q, k, dim);
  std::memcpy(out, &scores, sizeof(scores));
}
#else
// The same with native-width Lanes (AVX2: 8 lanes). GCC 12 keeps an f32x16 that a loop carries in memory
// there and moves it through general registers at every update (lanes.h), which made these loops, the whole of
// decode attention's arithmetic, many times slower than the registers allow. Scores take 8 keys at a time:
// each query block loaded once feeds 8 independent chains of FMAs (one key per chain, so the FMA latency is
// hidden), and one transpose-sum gives the 8 scores.
// out[j] = the scores of query against keys j < 8 (rows of k at stride dim).
template <typename T>
void key_block_scores(const float* query, const T* k, int64_t dim, float* out) {
  Lanes acc[8] = {};
  int64_t c = 0;
  for (; c + kLanes <= dim; c += kLanes) {
    const Lanes qv = load_lanes(query + c);
    for (int j = 0; j < 8; ++j) acc[j] = fma_lanes(qv, load_lanes(k + j * dim + c), acc[j]);
  }
  if (c < dim) {
    const Lanes qv = load_lanes(query + c);  // the query is zero-padded to whole 16-lane blocks
    for (int j = 0; j < 8; ++j) acc[j] = fma_lanes(qv, load_lanes(k + j * dim + c, dim - c), acc[j]);
  }
#if defined(__AVX__)
  store_lanes(out, transpose_sum8(acc));
#else
  for (int j = 0; j < 8; ++j) out[j] = lanes_sum(acc[j]);
#endif
}

constexpr int64_t kKeyGroup = 8;
template <typename T>
void key_group_scores(const f32x16* q, const T* k, int64_t dim, float* out) {
  key_block_scores(reinterpret_cast<const float*>(q), k, dim, out);
}

template <int N, typename T>
void accumulate_values(f32x16* out, float rescale, const float* p, const T* v, int64_t count, int64_t dim,
                       int64_t first) {
  constexpr int kVectors = N * kBlock / kLanes;
  float* o = reinterpret_cast<float*>(out + first);
  Lanes acc[kVectors];
  for (int i = 0; i < kVectors; ++i) acc[i] = load_lanes(o + i * kLanes) * rescale;
  const T* row = v + first * kBlock;
  for (int64_t j = 0; j < count; ++j, row += dim) {
    const Lanes pj = Lanes{} + p[j];
    for (int i = 0; i < kVectors; ++i) acc[i] = fma_lanes(pj, load_lanes(row + i * kLanes), acc[i]);
  }
  for (int i = 0; i < kVectors; ++i) store_lanes(o + i * kLanes, acc[i]);
}

// Output blocks per pass: accumulators for 4 blocks fill half the 16 registers of AVX2.
constexpr int64_t kValueBlocks = 4;
#endif

template <typename T>
using ValuePass = void (*)(f32x16*, float, const float*, const T*, int64_t, int64_t, int64_t);

// accumulate_values<1 .. kValueBlocks, T>.
template <typename T, size_t... I>
constexpr std::array<ValuePass<T>, sizeof...(I)> value_passes(std::index_sequence<I...>) {
  return {accumulate_values<I + 1, T>...};
}

template <typename T>
void accumulate_value_rows(f32x16* out, float rescale, const float* p, const T* v, int64_t count, int64_t dim) {
  static constexpr auto passes = value_passes<T>(std::make_index_sequence<kValueBlocks>{});
  const int64_t whole = dim / kBlock;
  for (int64_t block = 0; block < whole; block += kValueBlocks) {
    passes[std::min(kValueBlocks, whole - block) - 1](out, rescale, p, v, count, dim, block);
  }
  if (whole * kBlock < dim) {
    const int64_t n = dim - whole * kBlock;
    f32x16 acc = out[whole] * rescale;
    for (int64_t j = 0; j < count; ++j) acc = fma_lanes(splat(p[j]), load_block(v + j * dim + whole * kBlock, n), acc);
    out[whole] = acc;
  }
}

// One (batch row, kv head, split): the group's query rows against keys [first, last) of the cache.
template <typename T>
class DecodeItem {
 public:
  DecodeItem(const DecodeArgs& a, DecodePartials& parts, int64_t head, int64_t split, int64_t chunk)
      : a_(a), parts_(parts), head_(head), split_(split), rows_(a.rows()), dim_blocks_(parts.dim_blocks) {
    const int64_t len = a.cache_len[head / a.kv_heads];
    first_ = std::min(split * chunk, len);
    last_ = std::min(first_ + chunk, len);
    row_end_offset_ = len - a.num_queries + 1;  // query i attends keys j < row_end_offset_ + i
  }

  void run() {
    std::vector<f32x16> q(rows_ * dim_blocks_);
    load_queries(q);
    const int64_t slot = (head_ * parts_.splits + split_) * rows_;
    f32x16* out = parts_.out.data() + slot * dim_blocks_;
    float* max = parts_.max.data() + slot;
    float* sum = parts_.sum.data() + slot;
    std::fill_n(out, rows_ * dim_blocks_, f32x16{});
    std::fill_n(max, rows_, -kInf);
    std::fill_n(sum, rows_, 0.f);

    const int64_t cache_offset = head_ * a_.cache_size * a_.dim;
    const T* k = static_cast<const T*>(a_.k_cache) + cache_offset;
    const T* v = static_cast<const T*>(a_.v_cache) + cache_offset;
    alignas(64) float scores[kStepKeys];
    for (int64_t lo = first_; lo < last_; lo += kStepKeys) {
      const int64_t count = std::min(kStepKeys, last_ - lo);
      const auto rows_over = [&](const auto* keys, const auto* values) {
        for (int64_t r = 0; r < rows_; ++r) {
          const int64_t attended = std::min(count, row_end_offset_ + r % a_.num_queries - lo);
          if (attended <= 0) continue;
          step_scores(q.data() + r * dim_blocks_, keys, attended, scores);
          mask_scores(scores, attended, r % a_.num_queries, lo);
          update_row(scores, attended, values, out + r * dim_blocks_, max[r], sum[r]);
        }
      };
      const T* keys = k + lo * a_.dim;
      const T* values = v + lo * a_.dim;
      // fp16 / bf16 K and V that several query rows read are widened once per step, not once per row.
      if (std::is_same_v<T, float> || rows_ < kWidenRows) {
        rows_over(keys, values);
        continue;
      }
      widen(keys, count * a_.dim, wide_keys_);
      widen(values, count * a_.dim, wide_values_);
      rows_over(static_cast<const float*>(wide_keys_.data()), static_cast<const float*>(wide_values_.data()));
    }
  }

 private:
  // Keys per online-softmax step: the max, exp2 and rescale of a step cost as much as a few dozen keys, and
  // a longer step keeps more of the out-of-order window on loads.
  static constexpr int64_t kStepKeys = 64;
  // Query rows of an item from which fp16 / bf16 K and V are widened once per step: with one or two rows the
  // copy costs about what it saves.
  static constexpr int64_t kWidenRows = 4;

  static void widen(const T* src, int64_t n, std::vector<float>& dst) {
    dst.resize(n);
    float* out = dst.data();
    for_each_block(n, [=](int64_t j, auto count) { store_block(out + j, load_block(src + j, count), count); });
  }

  void load_queries(std::vector<f32x16>& q) const {
    const T* src = static_cast<const T*>(a_.q) + head_ * rows_ * a_.dim;  // the group's rows are consecutive
    const float q_scale = a_.scale * kLog2e;
    for (int64_t r = 0; r < rows_; ++r) {
      const T* row = src + r * a_.dim;
      f32x16* dst = q.data() + r * dim_blocks_;
      for_each_block(a_.dim, [=](int64_t c, auto n) { dst[c / kBlock] = load_block(row + c, n) * q_scale; });
    }
  }

  // scores[j] = the score of query q against key j of the step (rows of keys) for j < count, and -inf from
  // count to the next whole Lanes. A last group of fewer than kKeyGroup keys is copied, zero-padded, so no row
  // past count is read.
  template <typename K>
  void step_scores(const f32x16* q, const K* keys, int64_t count, float* scores) {
    int64_t j = 0;
    for (; j + kKeyGroup <= count; j += kKeyGroup) key_group_scores(q, keys + j * a_.dim, a_.dim, scores + j);
    if (j < count) {
      padded_keys_.assign(kKeyGroup * a_.dim, 0.f);
      const K* rest = keys + j * a_.dim;
      for (int64_t i = 0; i < (count - j) * a_.dim; ++i) padded_keys_[i] = to_float(rest[i]);
      key_group_scores(q, padded_keys_.data(), a_.dim, scores + j);
    }
    for (int64_t t = count; t < ceil_div(count, kLanes) * kLanes; ++t) scores[t] = -kInf;
  }

  // Softcap, bias and pair mask of the scores of query `query` against keys [lo, lo + count).
  void mask_scores(float* scores, int64_t count, int64_t query, int64_t lo) const {
    const Masking& m = a_.masking;
    if (m.softcap == 0.f && !m.bias && !m.allowed) return;
    const int64_t pairs = ((head_ / a_.kv_heads) * a_.num_queries + query) * a_.cache_size + lo;
    for (int64_t b = 0; b * kBlock < count; ++b) {
      const int64_t n = std::min(kBlock, count - b * kBlock);
      f32x16 s = load_block(scores + b * kBlock, n);
      if (m.softcap > 0.f) s = softcap_lanes(s, m.softcap * kLog2e);
      if (m.bias) s += load_block(m.bias + pairs + b * kBlock, n) * kLog2e;
      if (m.allowed) {
        const uint8_t* allowed = m.allowed + pairs + b * kBlock;
        for (int64_t t = 0; t < n; ++t) s[t] = allowed[t] ? s[t] : -kInf;
      }
      store_block(scores + b * kBlock, s, n);
    }
  }

  // Online softmax step of one query row over the scores of its first `count` keys (at least one; -inf up to
  // the next whole Lanes); a step whose keys are all masked, with nothing attended before it, changes nothing.
  // Carried values are Lanes (lanes.h).
  template <typename K>
  void update_row(const float* scores, int64_t count, const K* values, f32x16* out, float& max,
                  float& sum) const {
    const int64_t vectors = ceil_div(count, kLanes);
    Lanes step_max = Lanes{} - kInf;
    for (int64_t i = 0; i < vectors; ++i) {
      const Lanes s = load_lanes(scores + i * kLanes);
      step_max = s > step_max ? s : step_max;  // a NaN score is dropped here and propagates through exp2
    }
    float new_max = max;
    for (int i = 0; i < kLanes; ++i) new_max = std::max(new_max, step_max[i]);
    if (new_max == -kInf) return;
    alignas(64) float probs[kStepKeys];
    Lanes step_sum = {};
    for (int64_t i = 0; i < vectors; ++i) {
      const Lanes p = exp2_lanes(load_lanes(scores + i * kLanes) - new_max);
      step_sum += p;
      store_lanes(probs + i * kLanes, p);
    }
    const float rescale = std::exp2(max - new_max);
    sum = sum * rescale + lanes_sum(step_sum);
    max = new_max;
    accumulate_value_rows(out, rescale, probs, values, count, a_.dim);
  }

  const DecodeArgs& a_;
  DecodePartials& parts_;
  const int64_t head_, split_, rows_, dim_blocks_;
  int64_t first_, last_, row_end_offset_;
  std::vector<float> padded_keys_;  // [kKeyGroup][dim]: a last group of fewer than kKeyGroup keys, zero-padded
  std::vector<float> wide_keys_, wide_values_;  // [kStepKeys][dim]: a step's K and V widened to fp32
};

// o = sum over splits of out_s * 2^(max_s - M) / sum over splits of sum_s * 2^(max_s - M), M the largest max.
// On the calling thread: it reads splits x dim values per query row, against 2 x dim x (cache length) per kv
// head for the items, and a second parallel region would cost more than it saves.
template <typename T>
void merge_splits(const DecodeArgs& a, const DecodePartials& parts) {
  const int64_t rows = a.rows();
  T* o = static_cast<T*>(a.o);
  std::vector<f32x16> acc(parts.dim_blocks);
  for (int64_t x = 0; x < a.batch * a.kv_heads * rows; ++x) {  // x = (b * kv_heads + h) * rows + r
    const int64_t first_slot = (x / rows * parts.splits) * rows + x % rows;  // split s at first_slot + s * rows
    float max = -kInf;
    for (int64_t s = 0; s < parts.splits; ++s) max = std::max(max, parts.max[first_slot + s * rows]);
    std::fill(acc.begin(), acc.end(), f32x16{});
    float sum = 0.f;
    for (int64_t s = 0; s < parts.splits; ++s) {
      const int64_t slot = first_slot + s * rows;
      if (parts.sum[slot] == 0.f) continue;  // a split past the cache length or past the query's keys
      const float weight = std::exp2(parts.max[slot] - max);
      sum += parts.sum[slot] * weight;
      const f32x16* out = parts.out.data() + slot * parts.dim_blocks;
      for (int64_t c = 0; c < parts.dim_blocks; ++c) acc[c] += out[c] * weight;
    }
    const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
    if (a.lse) a.lse[x] = sum > 0.f ? (max + std::log2(sum)) * kLn2 : -kInf;
    T* dst = o + x * a.dim;
    const f32x16* merged = acc.data();
    for_each_block(a.dim, [=](int64_t c, auto n) { store_block(dst + c, merged[c / kBlock] * inv_sum, n); });
  }
}

template <typename T>
void decode_attention(const DecodeArgs& a, int num_threads) {
  const int64_t chunk = cache_chunk(a, num_threads);
  DecodePartials parts(a, ceil_div(a.cache_size, chunk));
  const int64_t num_items = a.batch * a.kv_heads * parts.splits;  // item = (b * kv_heads + h) * splits + s
#pragma omp parallel for num_threads(team_size(num_items, num_threads)) schedule(dynamic, 1)
  for (int64_t item = 0; item < num_items; ++item) {
    DecodeItem<T>(a, parts, item / parts.splits, item % parts.splits, chunk).run();
  }
  merge_splits<T>(a, parts);
}

void check_sizes(const char* op, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t length, int64_t dim,
                 int num_threads) {
  FASTMM_CHECK(batch >= 0 && length >= 0, op, "batch and sequence (or cache) length must be >= 0");
  FASTMM_CHECK(kv_heads >= 1 && q_heads >= 0 && q_heads % kv_heads == 0, op,
               "q_heads must be a multiple of kv_heads >= 1, got " + std::to_string(q_heads) + " and " +
                   std::to_string(kv_heads));
  FASTMM_CHECK(dim >= 1, op, "head_dim must be >= 1, got " + std::to_string(dim));
  FASTMM_CHECK(num_threads >= 1, op, "num_threads must be >= 1, got " + std::to_string(num_threads));
}

// ---- checked arguments of the entry points ---------------------------------------------------------------

constexpr const char* kKernel = "attention";

// Sizes of a call, from its checked q and k.
struct Heads {
  int64_t batch, q_heads, kv_heads, num_queries, num_keys, dim;
};

// Checks what both entry points share: q, k and v (named k_name, v_name) and the outputs o and lse.
Heads checked_heads(const TensorArg& q, const TensorArg& k, const TensorArg& v, const TensorArg& o,
                    const TensorArg& lse, const char* k_name, const char* v_name) {
  check(q, kKernel, "q", contiguous(kFloats, {kAny, kAny, kAny, kAny}));
  const int64_t batch = q.sizes[0], q_heads = q.sizes[1], num_queries = q.sizes[2], dim = q.sizes[3];
  if (dim < 1) fail(q, kKernel, "q", "[B, Hq, Lq, d] with head dim d >= 1");
  check(k, kKernel, k_name, contiguous(q.dtype, {batch, kAny, kAny, dim}));
  const int64_t kv_heads = k.sizes[1], num_keys = k.sizes[2];
  if (kv_heads < 1 || q_heads % kv_heads) {
    fail(k, kKernel, k_name, "[B, Hkv, S, d] with Hkv >= 1 dividing Hq = " + std::to_string(q_heads));
  }
  check(v, kKernel, v_name, contiguous(q.dtype, {batch, kv_heads, num_keys, dim}));
  check(o, kKernel, "o", contiguous(q.dtype, {batch, q_heads, num_queries, dim}));
  check(lse, kKernel, "lse", contiguous(DType::kFloat32, {batch, q_heads, num_queries}));
  return {batch, q_heads, kv_heads, num_queries, num_keys, dim};
}

// The masking tensors, checked, and softcap, as the kernels take them.
Masking checked_masking(const Heads& h, const TensorArg& key_keep, const TensorArg& allowed, const TensorArg& bias,
                        double softcap) {
  check(key_keep, kKernel, "key_keep", contiguous(DType::kBool, {h.batch, h.num_keys}).or_none());
  check(allowed, kKernel, "allowed", contiguous(DType::kBool, {h.batch, h.num_queries, h.num_keys}).or_none());
  check(bias, kKernel, "bias", contiguous(DType::kFloat32, {h.batch, h.num_queries, h.num_keys}).or_none());
  if (!(softcap >= 0)) refuse(kKernel, "softcap must be >= 0, got " + std::to_string(softcap));
  return {key_keep.ptr<const uint8_t>(), allowed.ptr<const uint8_t>(), bias.ptr<const float>(),
          static_cast<float>(softcap)};
}

// 0 <= kv_start <= kv_end <= S for every query: the kernel indexes K and V with them.
void check_key_ranges(const TensorArg& kv_start, const TensorArg& kv_end, int64_t num_keys) {
  const int32_t* start = kv_start.ptr<const int32_t>();
  const int32_t* end = kv_end.ptr<const int32_t>();
  for (int64_t i = 0; i < kv_start.numel(); ++i) {
    if (start[i] < 0 || end[i] < start[i] || end[i] > num_keys) {
      refuse(kKernel, "key ranges must satisfy 0 <= kv_start <= kv_end <= S = " + std::to_string(num_keys) +
                          ", got [" + std::to_string(start[i]) + ", " + std::to_string(end[i]) + ") at " +
                          std::to_string(i));
    }
  }
}

// Lq <= cache_len <= S for every row: the kernel reads the cache up to cache_len.
void check_cache_lengths(const TensorArg& cache_len, int64_t num_queries, int64_t cache_size) {
  const int32_t* lengths = cache_len.ptr<const int32_t>();
  const int64_t batch = cache_len.sizes[0];
  if (batch == 0) return;
  const auto [lo, hi] = std::minmax_element(lengths, lengths + batch);
  if (*lo < num_queries || *hi > cache_size) {
    refuse(kKernel, "cache_len must lie in [Lq = " + std::to_string(num_queries) + ", S = " +
                        std::to_string(cache_size) + "], got values in [" + std::to_string(*lo) + ", " +
                        std::to_string(*hi) + "]");
  }
}

}  // namespace

// ---- the decode kernel for decode_layer.cpp, and the entry points (registered at the bottom of this file) -----------

void decode_attention_fwd(const void* q, const void* k_cache, const void* v_cache, const int32_t* cache_len,
                          void* o, int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t num_queries,
                          int64_t cache_size, int64_t head_dim, double scale, int dtype, int num_threads,
                          const Masking& masking, float* lse) {
  check_sizes(__func__, batch, q_heads, kv_heads, cache_size, head_dim, num_threads);
  FASTMM_CHECK(num_queries >= 0, __func__, "num_queries must be >= 0");
  FASTMM_CHECK(masking.softcap >= 0.f && !masking.key_keep, __func__,
               "softcap must be >= 0, and key_keep folded into allowed");
  const DecodeArgs args{q,        k_cache,     v_cache,    cache_len, o,
                        lse,      batch,       q_heads,    kv_heads,  num_queries,
                        cache_size, head_dim, static_cast<float>(scale), masking};
  if (batch * q_heads * num_queries == 0) return;
  dispatch_dtype(dtype, [&](auto tag) { decode_attention<decltype(tag)>(args, num_threads); });
}

namespace entry {

void span_attention_fwd(const TensorArg& q, const TensorArg& k, const TensorArg& v, const TensorArg& kv_start,
                        const TensorArg& kv_end, const TensorArg& o, const TensorArg& lse, const TensorArg& key_keep,
                        const TensorArg& allowed, const TensorArg& bias, double scale, double softcap,
                        int num_threads) {
  const Heads h = checked_heads(q, k, v, o, lse, "k", "v");
  check(kv_start, kKernel, "kv_start", contiguous(DType::kInt32, {h.batch, h.num_queries}));
  check(kv_end, kKernel, "kv_end", contiguous(DType::kInt32, {h.batch, h.num_queries}));
  const Masking masking = checked_masking(h, key_keep, allowed, bias, softcap);
  check_key_ranges(kv_start, kv_end, h.num_keys);
  FASTMM_CHECK(num_threads >= 1, __func__, "num_threads must be >= 1, got " + std::to_string(num_threads));
  const SpanArgs args{q.data,
                      k.data,
                      v.data,
                      kv_start.ptr<const int32_t>(),
                      kv_end.ptr<const int32_t>(),
                      o.data,
                      lse.ptr<float>(),
                      h.batch,
                      h.q_heads,
                      h.kv_heads,
                      h.num_queries,
                      h.num_keys,
                      h.dim,
                      static_cast<float>(scale),
                      masking};
  if (h.batch * h.q_heads * h.num_queries == 0) return;
  dispatch_dtype(static_cast<int>(q.dtype), [&](auto tag) { span_attention<decltype(tag)>(args, num_threads); });
}

void decode_attention_fwd(const TensorArg& q, const TensorArg& k_cache, const TensorArg& v_cache,
                          const TensorArg& cache_len, const TensorArg& o, const TensorArg& lse,
                          const TensorArg& allowed, const TensorArg& bias, double scale, double softcap,
                          int num_threads) {
  const Heads h = checked_heads(q, k_cache, v_cache, o, lse, "k_cache", "v_cache");
  check(cache_len, kKernel, "cache_len", contiguous(DType::kInt32, {h.batch}));
  const Masking masking = checked_masking(h, TensorArg{}, allowed, bias, softcap);
  check_cache_lengths(cache_len, h.num_queries, h.num_keys);
  fastmm::decode_attention_fwd(q.data, k_cache.data, v_cache.data, cache_len.ptr<const int32_t>(), o.data, h.batch,
                               h.q_heads, h.kv_heads, h.num_queries, h.num_keys, h.dim, scale,
                               static_cast<int>(q.dtype), num_threads, masking, lse.ptr<float>());
}

}  // namespace entry
}  // namespace fastmm

FASTMM_ENTRY_POINTS(m) {
  m.def("span_attention_fwd", &fastmm::entry::span_attention_fwd, fastmm::release());
  m.def("decode_attention_fwd", &fastmm::entry::decode_attention_fwd, fastmm::release());
}
