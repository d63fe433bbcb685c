// vq family: nearest-code search for VQ image tokenizers (Chameleon, Janus, Emu3, LlamaGen).
//
// index[n] = argmin_k (codebook_sq[k] - 2 z[n].codebook[k]) in fp32, lowest k on ties, a NaN score never wins,
// without the N x K score matrix: each thread keeps a running (best score, index) per row.
//
// Codes are vectorized 16 to a register and rows broadcast, the layout that suits every D: at D = 4-8 (Emu3,
// Janus) a row-major dot product would be a horizontal sum per code. A tile of the codebook is packed once
// into fp32 "panels" of 16 codes, [1 + D][16]: their codebook_sq, then -2 e[d] for each d, so a score vector
// is codebook_sq plus one FMA per d. A register block of 8 rows x 2 panels holds 16 score vectors; each code
// vector loaded serves 8 FMAs, each broadcast row value 2. At D = 256 (Chameleon) this is a GEMM micro-kernel
// with the argmin fused; it measured ~90 % of one core's FMA peak, torch.mm (MKL on this AMD CPU) ~60 %
// before any argmin pass, so there is no separate large-D path through torch.
//
// The hot loop tracks no indices: per row it stores the score vectors of a chunk of 256 codes (to L1) and
// keeps their lane-wise minimum, one vminps per score vector; tracking the index too would add a compare and
// a blend, as much again as the 4 FMAs of a D = 4 score. After the chunk, a row whose chunk minimum beats its
// best so far looks up the first stored score equal to it, which gives the index. On unordered data that
// happens about ln(K / 256) + 1 times per row (the first chunk always).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "module.h"
#include "vq.h"

namespace fastmm {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- lanes ------------------------------------------------------------------------------------------------

#if defined(__AVX512F__) && defined(__AVX512BW__)
// GCC 12's intrinsic headers trip -Wmaybe-uninitialized on their own _mm512_undefined_ps (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// vminps returns its second operand when either is NaN, so a NaN score never replaces the running minimum.
inline f32x16 min_lanes(f32x16 score, f32x16 running) { return _mm512_min_ps(score, running); }

// Bit i set iff v[i] < bound (false for NaN).
inline uint32_t lanes_below(f32x16 v, float bound) {
  return _mm512_cmp_ps_mask(v, _mm512_set1_ps(bound), _CMP_LT_OQ);
}

// Bit i set iff v[i] == value.
inline uint32_t lanes_equal(f32x16 v, float value) {
  return _mm512_cmp_ps_mask(v, _mm512_set1_ps(value), _CMP_EQ_OQ);
}

// The smallest lane of v, which holds no NaN.
inline float smallest_lane(f32x16 v) { return _mm512_reduce_min_ps(v); }

#pragma GCC diagnostic pop
#else
// The same operations lane by lane, for builds without AVX-512.
inline f32x16 min_lanes(f32x16 score, f32x16 running) {
  for (int i = 0; i < kBlock; ++i) running[i] = score[i] < running[i] ? score[i] : running[i];
  return running;
}

inline uint32_t lanes_below(f32x16 v, float bound) {
  uint32_t mask = 0;
  for (int i = 0; i < kBlock; ++i) mask |= static_cast<uint32_t>(v[i] < bound) << i;
  return mask;
}

inline uint32_t lanes_equal(f32x16 v, float value) {
  uint32_t mask = 0;
  for (int i = 0; i < kBlock; ++i) mask |= static_cast<uint32_t>(v[i] == value) << i;
  return mask;
}

inline float smallest_lane(f32x16 v) {
  float m = v[0];
  for (int i = 1; i < kBlock; ++i) m = std::min(m, v[i]);
  return m;
}
#endif

// ---- sizes ------------------------------------------------------------------------------------------------

// Rows per register block: 8 rows x 2 panels = 16 accumulators, plus 8 running minima, 2 code vectors and a
// broadcast: 27 of the 32 zmm registers.
constexpr int64_t kRowBlock = 8;

// Bytes of packed codes per tile: the tile stays in L2 (1 MiB per core on Zen 4) while every row block of the
// thread streams through it (128 to 512 KiB measured alike; 768 KiB slower).
constexpr int64_t kTileBytes = 256 << 10;
// Panels between checks of the running minima: 256 codes (8 to 64 panels measured within noise).
constexpr int64_t kChunkPanels = 16;

int64_t num_panels(int64_t num_codes) { return (num_codes + kBlock - 1) / kBlock; }

// Codes per tile: a multiple of 16, at least one panel.
int64_t tile_codes(int64_t dim) {
  return std::max<int64_t>(kBlock, kTileBytes / (static_cast<int64_t>(sizeof(f32x16)) * (dim + 1)) * kBlock);
}

// ---- packing ----------------------------------------------------------------------------------------------

// m[i][j] <- m[j][i] for the 16 x 16 matrix held in m, by Eklundh's scheme: rounds of swapping the
// off-diagonal s x s sub-blocks within each 2s x 2s block, s = 8, 4, 2, 1, each swap two 2-source permutes.
template <int kStep>
inline void swap_sub_blocks(f32x16 (&m)[kBlock]) {
  i32x16 low, high;  // lane j of the new rows i and i + s, as an index into (m[i], m[i + s])
  for (int j = 0; j < kBlock; ++j) {
    low[j] = (j & kStep) ? kBlock + j - kStep : j;
    high[j] = (j & kStep) ? kBlock + j : j + kStep;
  }
  for (int i = 0; i < kBlock; ++i) {
    if (i & kStep) continue;
    const f32x16 a = m[i], b = m[i + kStep];
    m[i] = __builtin_shuffle(a, b, low);
    m[i + kStep] = __builtin_shuffle(a, b, high);
  }
}

inline void transpose(f32x16 (&m)[kBlock]) {
  swap_sub_blocks<8>(m);
  swap_sub_blocks<4>(m);
  swap_sub_blocks<2>(m);
  swap_sub_blocks<1>(m);
}

// Blocks 1 + d, d in [d_begin, dim), of a panel: lane c holds -2 codes[c][d] for c < lanes, 0 past them.
template <typename T>
void pack_columns(const T* codes, int64_t lanes, int64_t dim, int64_t d_begin, f32x16* panel) {
  for (int64_t d = d_begin; d < dim; ++d) {
    f32x16 column = {};
    for (int64_t c = 0; c < lanes; ++c) column[c] = -2.f * to_float(codes[c * dim + d]);
    panel[1 + d] = column;
  }
}

// The same for 16 codes, 16 dimensions at a time: their blocks widened in registers and transposed. About 3x
// the speed of the lane-by-lane copy: the search of one row in K = 8192, D = 256 fell from 1.6 to 0.6 ms.
template <typename T>
void pack_full_panel(const T* codes, int64_t dim, f32x16* panel) {
  int64_t d = 0;
  for (; d + kBlock <= dim; d += kBlock) {
    f32x16 m[kBlock];
    for (int c = 0; c < kBlock; ++c) m[c] = load_block(codes + c * dim + d, FullBlock{});
    transpose(m);
    for (int i = 0; i < kBlock; ++i) panel[1 + d + i] = -2.f * m[i];
  }
  pack_columns(codes, kBlock, dim, d, panel);
}

// Panels of codes [first, first + count): panel p holds codes first + 16p + lane as block 0, codebook_sq,
// and blocks 1 + d, -2 e[d] (exact: a power of two). Lanes past the last code get codebook_sq = +inf and
// e = 0: they score +inf, or NaN against an infinite z, and never beat a best.
template <typename T>
void pack_panels(const T* codebook, const float* codebook_sq, int64_t first, int64_t count, int64_t dim,
                 f32x16* panels) {
  for (int64_t p = 0; p < num_panels(count); ++p) {
    f32x16* panel = panels + p * (dim + 1);
    const int64_t code = first + p * kBlock;
    const int64_t lanes = std::min(kBlock, count - p * kBlock);
    panel[0] = splat(kInf);
    for (int64_t c = 0; c < lanes; ++c) panel[0][c] = codebook_sq[code + c];
    if (lanes == kBlock) {
      pack_full_panel(codebook + code * dim, dim, panel);
    } else {
      pack_columns(codebook + code * dim, lanes, dim, 0, panel);
    }
  }
}

// z viewed as rows: row n = b * seq + s is z[b, s, :], read through the strides (in elements).
template <typename T>
struct Rows {
  const T* z;
  int64_t seq, dim, stride_batch, stride_seq, stride_dim;

  const T* row(int64_t n) const { return z + (n / seq) * stride_batch + (n % seq) * stride_seq; }
};

// The rows [first, first + rows) of z in fp32, interleaved for the broadcasts: value d of row r at
// out[d * kRowBlock + r], so one pointer with constant offsets addresses the whole block. A partial block
// repeats its last row (its scores are never read), so the inner loop always has kRowBlock iterations and
// unrolls. Rows inner: in a channels-first map the block's rows are adjacent and each d is a page away.
template <typename T>
void load_rows(const Rows<T>& z, int64_t first, int64_t rows, float* out) {
  const T* row[kRowBlock];
  for (int64_t r = 0; r < kRowBlock; ++r) row[r] = z.row(first + std::min(r, rows - 1));
  for (int64_t d = 0; d < z.dim; ++d) {
    for (int64_t r = 0; r < kRowBlock; ++r) out[d * kRowBlock + r] = to_float(row[r][d * z.stride_dim]);
  }
}

// ---- scoring ----------------------------------------------------------------------------------------------

// Scores of the kRowBlock rows of z against kPanels consecutive panels: stored, row r's against panel g at
// scores[r * kChunkPanels + g], and folded into minima[r] lane-wise. (Compiling D in for D <= 16, which
// unrolls the loop over d, measured 2 % faster at D = 4 and 8: not worth a kernel per D.)
template <int kPanels>
inline void score_panels(const float* z, int64_t dim, const f32x16* panels, f32x16* scores, f32x16* minima) {
  const int64_t stride = dim + 1;
  f32x16 acc[kRowBlock][kPanels];
  for (int r = 0; r < kRowBlock; ++r) {
    for (int g = 0; g < kPanels; ++g) acc[r][g] = panels[g * stride];
  }
  for (int64_t d = 0; d < dim; ++d) {
    f32x16 code[kPanels];
    for (int g = 0; g < kPanels; ++g) code[g] = panels[g * stride + 1 + d];
    for (int r = 0; r < kRowBlock; ++r) {
      const f32x16 zd = splat(z[d * kRowBlock + r]);
      for (int g = 0; g < kPanels; ++g) acc[r][g] = fma_lanes(zd, code[g], acc[r][g]);
    }
  }
  for (int r = 0; r < kRowBlock; ++r) {
    for (int g = 0; g < kPanels; ++g) {
      scores[r * kChunkPanels + g] = acc[r][g];
      minima[r] = min_lanes(acc[r][g], minima[r]);
    }
  }
}

// Scores of the kRowBlock rows of z against a chunk of count <= kChunkPanels panels, stored as in
// score_panels; out[r] = their lane-wise minimum for row r.
void score_chunk(const float* z, int64_t dim, const f32x16* panels, int64_t count, f32x16* scores,
                 f32x16* out) {
  f32x16 minima[kRowBlock];  // a local array, so that it stays in registers between the stores to scores
  for (int r = 0; r < kRowBlock; ++r) minima[r] = splat(kInf);
  const int64_t stride = dim + 1;
  int64_t p = 0;
  for (; p + 2 <= count; p += 2) score_panels<2>(z, dim, panels + p * stride, scores + p, minima);
  if (p < count) score_panels<1>(z, dim, panels + p * stride, scores + p, minima);
  std::copy(minima, minima + kRowBlock, out);
}

// Folds a chunk into one row's (best, index), given the row's stored scores against it and their lane-wise
// minimum, which the caller found strictly below best (so ties keep the earlier chunk's code, and NaN, never
// below anything, never wins). The new index is the first code that scores the minimum: the lowest on ties.
// first_code is the code of the chunk's lane 0.
void fold_chunk(const f32x16* scores, f32x16 minimum, int64_t count, int64_t first_code, float& best,
                int64_t& index) {
  const float m = smallest_lane(minimum);
  // vminps returns one of its operands, so m is one of the stored scores: the scan finds it.
  for (int64_t p = 0; p < count; ++p) {
    if (const uint32_t hits = lanes_equal(scores[p], m)) {
      best = m;
      index = first_code + p * kBlock + __builtin_ctz(hits);
      return;
    }
  }
}

// ---- search -----------------------------------------------------------------------------------------------

template <typename T>
struct Problem {
  Rows<T> z;
  const T* codebook;         // [num_codes, dim]
  const float* codebook_sq;  // [num_codes]
};

// Folds codes [code_begin, code_end) into the running (best, index) of rows [row_begin, row_end), kept at
// best[n - row_begin], index[n - row_begin] (initially +inf, 0). Tiles of codes outside, so that a packed
// tile serves every row; row blocks inside. Extra memory: one tile, one row block, one chunk of scores.
template <typename T>
void search(const Problem<T>& pb, int64_t row_begin, int64_t row_end, int64_t code_begin, int64_t code_end,
            float* best, int64_t* index) {
  const int64_t dim = pb.z.dim;
  const int64_t stride = dim + 1;
  const int64_t codes_per_tile = tile_codes(dim);
  std::vector<f32x16> panels(num_panels(std::min(codes_per_tile, code_end - code_begin)) * stride);
  std::vector<float> z(kRowBlock * dim);
  std::vector<f32x16> scores(kRowBlock * kChunkPanels);
  f32x16 minima[kRowBlock];
  for (int64_t tile = code_begin; tile < code_end; tile += codes_per_tile) {
    const int64_t tile_size = std::min(codes_per_tile, code_end - tile);
    const int64_t tile_panels = num_panels(tile_size);
    pack_panels(pb.codebook, pb.codebook_sq, tile, tile_size, dim, panels.data());
    for (int64_t first_row = row_begin; first_row < row_end; first_row += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, row_end - first_row);
      load_rows(pb.z, first_row, rows, z.data());
      for (int64_t p = 0; p < tile_panels; p += kChunkPanels) {
        const int64_t count = std::min(kChunkPanels, tile_panels - p);
        const f32x16* chunk = panels.data() + p * stride;
        score_chunk(z.data(), dim, chunk, count, scores.data(), minima);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = first_row - row_begin + r;
          if (lanes_below(minima[r], best[i])) {  // a new best for this row: rare after the first chunks
            fold_chunk(scores.data() + r * kChunkPanels, minima[r], count, tile + p * kBlock, best[i], index[i]);
          }
        }
      }
    }
  }
}

// Work, in multiply-adds, below which one more thread costs more to start and join than it saves: about 50 us
// of one core's FMAs. Packing an element of the codebook costs about as much as 16 multiply-adds (measured).
constexpr double kMinWorkPerThread = 1 << 21;
constexpr double kPackCostInRows = 16;

int useful_threads(int64_t rows, int64_t num_codes, int64_t dim, int num_threads) {
  const double work = static_cast<double>(num_codes) * static_cast<double>(dim + 1) * (rows + kPackCostInRows);
  return static_cast<int>(std::clamp(work / kMinWorkPerThread, 1.0, static_cast<double>(num_threads)));
}

// Threads split the codes when there are enough of them: each packs only its own, and the rows' partial
// results merge in O(threads x rows). Otherwise (a small codebook) they split the rows, and each packs the
// whole codebook.
constexpr int64_t kMinCodesPerThread = 512;

template <typename T>
void search_split_rows(const Problem<T>& pb, int64_t rows, int64_t num_codes, int64_t* indices,
                       int num_threads) {
  std::vector<float> best(rows, kInf);
  std::fill(indices, indices + rows, int64_t{0});
  const int64_t row_blocks = (rows + kRowBlock - 1) / kRowBlock;
  parallel_for(row_blocks, num_threads, [&](int64_t begin, int64_t end, int) {
    const int64_t first = begin * kRowBlock;
    const int64_t last = std::min(end * kRowBlock, rows);
    search(pb, first, last, 0, num_codes, best.data() + first, indices + first);
  });
}

template <typename T>
void search_split_codes(const Problem<T>& pb, int64_t rows, int64_t num_codes, int64_t* indices,
                        int num_threads) {
  const int64_t panels = num_panels(num_codes);
  const int threads = team_size(panels, num_threads);
  std::vector<float> best(threads * rows, kInf);
  std::vector<int64_t> index(threads * rows, 0);
  parallel_for(panels, num_threads, [&](int64_t begin, int64_t end, int thread) {
    search(pb, 0, rows, begin * kBlock, std::min(end * kBlock, num_codes), best.data() + thread * rows,
           index.data() + thread * rows);
  });
  // Thread t searched lower codes than thread t + 1: strictly smaller wins, as within a thread.
  parallel_for(rows, num_threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t n = begin; n < end; ++n) {
      float b = best[n];
      int64_t i = index[n];
      for (int t = 1; t < threads; ++t) {
        if (best[t * rows + n] < b) {
          b = best[t * rows + n];
          i = index[t * rows + n];
        }
      }
      indices[n] = i;
    }
  });
}

}  // namespace

// ---- entry point (registered at the bottom of this file) ------------------------------------------------------------

namespace entry {

void nearest_code(const TensorArg& z, const TensorArg& codebook, const TensorArg& codebook_sq,
                  const TensorArg& indices, int num_threads) {
  constexpr const char* kKernel = "vq";
  check(z, kKernel, "z", strided(kFloats, {kAny, kAny, kAny}));
  const int64_t batch = z.sizes[0], seq = z.sizes[1], dim = z.sizes[2];
  check(codebook, kKernel, "codebook", contiguous(z.dtype, {kAny, dim}));
  const int64_t num_codes = codebook.sizes[0];
  if (num_codes < 1) fail(codebook, kKernel, "codebook", "a codebook of at least one code");
  check(codebook_sq, kKernel, "codebook_sq", contiguous(DType::kFloat32, {num_codes}));
  check(indices, kKernel, "indices", contiguous(DType::kInt64, {batch, seq}));
  FASTMM_CHECK(num_threads >= 1, __func__, "num_threads must be >= 1, got " + std::to_string(num_threads));
  const int64_t rows = batch * seq;
  if (rows == 0) return;
  dispatch_dtype(static_cast<int>(z.dtype), [&](auto tag) {
    using T = decltype(tag);
    const Problem<T> pb{{z.ptr<const T>(), seq, dim, z.strides[0], z.strides[1], z.strides[2]},
                        codebook.ptr<const T>(),
                        codebook_sq.ptr<const float>()};
    const int threads = useful_threads(rows, num_codes, dim, num_threads);
    if (num_codes >= kMinCodesPerThread * threads) {
      search_split_codes(pb, rows, num_codes, indices.ptr<int64_t>(), threads);
    } else {
      search_split_rows(pb, rows, num_codes, indices.ptr<int64_t>(), threads);
    }
  });
}

}  // namespace entry
}  // namespace fastmm

FASTMM_ENTRY_POINTS(m) { m.def("nearest_code", &fastmm::entry::nearest_code, fastmm::release()); }
