// sampling family: fused classifier-free-guidance sampling of image tokens (Janus, LlamaGen, Emu3, Chameleon).
//
// Per output row: mix the G groups' logits (u + (c - u) s, ...), divide by the temperature, keep top-k then
// top-p, and draw by an exponential race, argmax (s - log E) over the kept ids, E from a counter-based hash.
// The spec, the tie rules and the RNG are in fastmm/reference/sampling.py; this file repeats its fp32
// operations one for one, so that both give the same ids.
//
// Nothing is stored per id: every pass recomputes the guided scores from the logits (a few loads and flops
// per id; a row stays in L2: 64 KiB per group at V = 16384 fp32), so the only scratch is a histogram on the
// stack and nothing is allocated. Passes over the allowed ids, per row:
//   no top-k / top-p     the race alone: 1 pass
//   top-k                3 counting passes of a radix select, then the race
//   top-p                1 max pass, 3 mass passes of a radix select, then the race
//   mix "log_softmax"    first 2 passes per group over all V (max, then the sum of exp)
// Radix select: scores map to uint32 keys in the same order (ordered_keys), and the threshold key is found
// 11, 11, then 10 bits at a time from a histogram of the keys that share the bits found so far. For top-k the
// histogram counts ids and yields the k-th largest key exactly; for top-p it sums exp(s - max), and the
// threshold is the largest key whose mass from the top reaches top_p * Z. Equal scores share a key, so ties
// at a threshold are kept together, as the spec says. Threads split the rows.
#include "sampling.h"

#include <algorithm>
#include <iterator>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "module.h"

// Every sum, product and quotient below rounds to fp32 on its own, as in the reference: the build is GNU C++ at
// -O3 -march=native, where GCC contracts a * b + c into one FMA (-ffp-contract=fast), which would change the
// guided scores (u + (c - u) s must match transformers bit for bit) and the RNG's log in the last bit.
// fma_lanes, an intrinsic, stays fused where it is asked for (exp_lanes, whose rounding no test pins). The
// intrinsics inlined into these functions then trip GCC 12's -Wuninitialized on their own _mm512_undefined_*
// (GCC bug 105593), which the common.h and attention.cpp functions silence around themselves.
#pragma GCC optimize("fp-contract=off")
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace fastmm {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

inline i32x16 lane_ids() { return i32x16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }

// Bit l set where lane l of a comparison result is true.
inline uint32_t lane_bits(i32x16 mask) {
#if defined(__AVX512F__)
  return _mm512_test_epi32_mask(reinterpret_cast<__m512i>(mask), reinterpret_cast<__m512i>(mask));
#else
  uint32_t bits = 0;
  for (int l = 0; l < kBlock; ++l) bits |= static_cast<uint32_t>(mask[l] != 0) << l;
  return bits;
#endif
}

// ---- the RNG (reference: row_keys, hash32, exponential, log_f32) -------------------------------------------

// lowbias32 (Chris Wellons), on one uint32 or on 16 lanes.
template <typename U>
U hash32(U x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

struct RaceKeys {
  uint32_t key1, key2;
};

RaceKeys race_keys(uint32_t seed, uint64_t step, int64_t row) {
  uint32_t state = hash32(seed);
  state = hash32(state ^ static_cast<uint32_t>(step));
  state = hash32(state ^ static_cast<uint32_t>(step >> 32));
  const uint32_t key1 = hash32(state ^ static_cast<uint32_t>(row));
  return {key1, hash32(key1 ^ 0x9e3779b9u)};
}

// FreeBSD / musl logf for positive normal x, operation for operation (reference: log_f32).
inline f32x16 log_lanes(f32x16 x) {
  constexpr int32_t kOneBits = 0x3f800000, kSqrtHalfBits = 0x3f3504f3;
  const i32x16 bits = reinterpret_cast<i32x16>(x) + (kOneBits - kSqrtHalfBits);
  const i32x16 k = (bits >> 23) - 0x7f;
  const f32x16 f = reinterpret_cast<f32x16>((bits & 0x007fffff) + kSqrtHalfBits) - 1.f;
  const f32x16 s = f / (2.f + f);
  const f32x16 z = s * s;
  const f32x16 w = z * z;
  const f32x16 r = z * (0xaaaaaa.0p-24f + w * 0x91e9ee.0p-25f) + w * (0xccce13.0p-25f + w * 0xf89e26.0p-26f);
  const f32x16 hfsq = 0.5f * f * f;
  const f32x16 dk = __builtin_convertvector(k, f32x16);
  return s * (hfsq + r) + dk * 0x1.2fefa2p-17f - hfsq + f + dk * 0x1.62e3p-1f;
}

// W in [2^-33, 1 - 2^-24] for 16 ids: the race's uniform variate, fine-grained near 0 (reference: exponential).
inline f32x16 race_uniform(u32x16 ids, RaceKeys keys) {
  constexpr float kMaxScaledW = 4294967040.f;  // 2^32 - 256, the largest fp32 below 2^32
  const u32x16 bits = hash32(hash32(ids ^ keys.key1) ^ keys.key2);
  const f32x16 scaled = __builtin_convertvector(bits, f32x16) + 0.5f;
  return (scaled < kMaxScaledW ? scaled : splat(kMaxScaledW)) * 0x1p-32f;
}

// -log(E) with E = -log1p(-W): what the race adds to a score (reference: exponential, race_noise).
inline f32x16 race_noise(f32x16 w) {
  const f32x16 x = -w;
  const f32x16 u = 1.f + x;
  const f32x16 e = -(log_lanes(u) + (x - (u - 1.f)));  // -log1p(x), see the reference
  return -log_lanes(e);
}

// An upper bound of race_noise(w), from W's binary exponent e alone: E >= W, so -log E <= -log W <= -e ln 2;
// one more ln 2 covers the rounding of the logs with room to spare.
inline f32x16 race_noise_bound(f32x16 w) {
  const i32x16 biased_exponent = reinterpret_cast<i32x16>(w) >> 23;
  return __builtin_convertvector(128 - biased_exponent, f32x16) * 0.6931472f;
}

// ---- scores ------------------------------------------------------------------------------------------------

// uint32 keys in the order of the scores (NaN excluded), -0 sharing +0's key so that equal scores share a key.
inline u32x16 ordered_keys(f32x16 s) {
  const u32x16 bits = reinterpret_cast<u32x16>(s == 0.f ? f32x16{} : s);
  const u32x16 negative = reinterpret_cast<u32x16>(reinterpret_cast<i32x16>(bits) >> 31);
  return bits ^ (negative | 0x80000000u);
}

template <typename T>
struct Problem {
  const T* logits;  // [groups * batch, vocab], rows row_stride apart
  int64_t batch, vocab, row_stride, lo, hi;
  float scales[2];    // scales[j] weighs group j - group j + 1
  float temperature;  // 0: greedy
  int64_t top_k;      // 0: off
  float top_p;        // 1: off
  bool log_softmax;
  uint32_t seed;
  uint64_t step;  // the RNG offset
};

// Calls body(j, n) for the blocks of [0, count): n is FullBlock{} for whole blocks, then the length of the last,
// partial block. common.h's for_each_block does the same, but a function template defined there keeps the
// default options and GCC will not inline this file's fp-contract=off lambdas into it: a call per block.
template <typename Body>
inline void for_each_block_here(int64_t count, Body&& body) {
  int64_t j = 0;
  for (; j + kBlock <= count; j += kBlock) body(j, FullBlock{});
  if (j < count) body(j, count - j);
}

inline f32x16 fill_past(f32x16 v, FullBlock, float) { return v; }
inline f32x16 fill_past(f32x16 v, int64_t n, float fill) {
  return lane_ids() < static_cast<int32_t>(n) ? v : splat(fill);
}

// max over [0, count) and log of sum exp(x - max): the two statistics of log_softmax, as torch computes them.
template <typename T>
void log_softmax_stats(const T* x, int64_t count, float& max, float& log_sum) {
  f32x16 running = splat(-kInf);
  for_each_block_here(count, [&](int64_t j, auto n) {
    const f32x16 v = fill_past(load_block(x + j, n), n, -kInf);
    running = v > running ? v : running;
  });
  max = lane_max(running);
  f32x16 sum = {};
  for_each_block_here(count, [&](int64_t j, auto n) {
    sum += exp_lanes(fill_past(load_block(x + j, n), n, -kInf) - max);  // -inf lanes add exp(-inf) = 0
  });
  log_sum = std::log(lane_sum(sum));
}

// Running argmax over blocks of 16 ids: per lane the first maximum (strict >), then the lowest id among the
// lanes that hold the overall maximum. So ties go to the lowest id, and a row of -inf gives id 0.
class ArgMax {
 public:
  void update(f32x16 v, int64_t first) {
    const i32x16 better = v > best_;
    best_ = better ? v : best_;
    index_ = better ? lane_ids() + static_cast<int32_t>(first) : index_;
  }

  int64_t index() const {
    const float m = lane_max(best_);
    int32_t index = std::numeric_limits<int32_t>::max();
    for (int l = 0; l < kBlock; ++l) {
      if (best_[l] == m) index = std::min(index, index_[l]);
    }
    return index;
  }

 private:
  f32x16 best_ = splat(-kInf);
  i32x16 index_ = lane_ids();
};

// One digit of the radix select: keys whose bits under `high` equal the prefix found so far fall into bucket
// (key >> shift) & (buckets - 1).
struct Digit {
  int shift;
  uint32_t buckets;
  uint32_t high;
};
constexpr Digit kDigits[] = {{21, 2048, 0x00000000u}, {10, 2048, 0xffe00000u}, {0, 1024, 0xfffffc00u}};
constexpr uint32_t kMaxBuckets = 2048;

template <typename T, int G>
class RowSampler {
 public:
  RowSampler(const Problem<T>& pb, int64_t row) : RowSampler(pb, row, race_keys(pb.seed, pb.step, row)) {}

  // keys: the race's RNG words (only sample() draws; probs() needs none).
  RowSampler(const Problem<T>& pb, int64_t row, RaceKeys keys) : pb_(pb), keys_(keys) {
    for (int i = 0; i < G; ++i) {
      const T* group_row = pb.logits + (i * pb.batch + row) * pb.row_stride;
      if (pb.log_softmax) log_softmax_stats(group_row, pb.vocab, max_[i], log_sum_[i]);
      group_[i] = group_row + pb.lo;
    }
    divide_ = pb.temperature != 0.f && pb.temperature != 1.f;  // z / 1 == z exactly
  }

  int64_t sample() const {
    const int64_t count = pb_.hi - pb_.lo;
    if (pb_.temperature == 0.f) {  // greedy
      ArgMax best;
      for_each_score([&](int64_t j, f32x16 z, int64_t) { best.update(z, j); });
      return pb_.lo + best.index();
    }
    return race(kept_min_key(count));
  }

  // The distribution sample() draws from, over the allowed ids, into p[0, hi - lo) (reference: processed_probs):
  // one-hot at the greedy id at temperature 0, else exp(s - max) over the kept ids (0 elsewhere) times 1 / their
  // sum, as torch.softmax computes it (its exp and its order of summation differ in the last bits).
  void probs(float* p) const {
    const int64_t count = pb_.hi - pb_.lo;
    if (pb_.temperature == 0.f) {
      ArgMax best;
      for_each_score([&](int64_t j, f32x16 z, int64_t) { best.update(z, j); });
      std::fill(p, p + count, 0.f);
      p[best.index()] = 1.f;
      return;
    }
    const uint32_t min_key = kept_min_key(count);
    const float max = max_score();  // top-k and top-p always keep the max
    f32x16 sum = {};
    for_each_score([&](int64_t j, f32x16 s, int64_t n) {
      i32x16 kept = lane_ids() < static_cast<int32_t>(n);
      if (min_key) kept &= ordered_keys(s) >= min_key;
      const f32x16 w = kept ? exp_lanes(s - max) : f32x16{};
      if (n == kBlock) {
        store_block(p + j, w, FullBlock{});
      } else {
        store_block(p + j, w, n);
      }
      sum += w;
    });
    const f32x16 scale = splat(1.f / lane_sum(sum));
    for_each_block_here(count, [&](int64_t j, auto n) { store_block(p + j, load_block(p + j, n) * scale, n); });
  }

 private:
  // The smallest ordered key the kept set holds (top-k, then top-p); 0 keeps all.
  uint32_t kept_min_key(int64_t count) const {
    uint32_t min_key = 0;  // kept: ordered_keys(s) >= min_key
    if (pb_.top_k > 0 && pb_.top_k < count) min_key = kth_largest_key(pb_.top_k);
    if (pb_.top_p < 1.f) min_key = std::max(min_key, top_p_key(min_key, max_score(), pb_.top_p));
    return min_key;
  }

  // Scores of the allowed ids [lo + j, lo + j + n): guided, NaN as -inf, divided by the temperature unless
  // greedy. Operations in the reference's order (guided_scores); (x - 0) - 0 == x for mix "logits".
  template <typename N>
  f32x16 scores(int64_t j, N n) const {
    f32x16 g[G];
    for (int i = 0; i < G; ++i) g[i] = (load_block(group_[i] + j, n) - max_[i]) - log_sum_[i];
    f32x16 z = g[G - 1];
    for (int i = G - 2; i >= 0; --i) z = z + (g[i] - g[i + 1]) * pb_.scales[i];
    z = z == z ? z : splat(-kInf);
    return divide_ ? z / pb_.temperature : z;
  }

  // body(j, s, n) for the blocks of allowed ids: scores s of ids lo + j + lane for lanes < n, -inf above.
  template <typename Body>
  void for_each_score(Body&& body) const {
    for_each_block_here(pb_.hi - pb_.lo, [&](int64_t j, auto n) {
      if constexpr (std::is_same_v<decltype(n), FullBlock>) {
        body(j, scores(j, n), kBlock);
      } else {
        body(j, fill_past(scores(j, n), n, -kInf), n);
      }
    });
  }

  // f(s, lanes, buckets) for the blocks holding ids whose key is >= floor and shares prefix's bits above
  // digit d: lanes has bit l set for those, buckets holds every lane's bucket of d.
  template <typename F>
  void for_each_match(const Digit& d, uint32_t prefix, uint32_t floor, F&& f) const {
    for_each_score([&](int64_t, f32x16 s, int64_t n) {
      const u32x16 keys = ordered_keys(s);
      const uint32_t lanes =
          lane_bits((lane_ids() < static_cast<int32_t>(n)) & ((keys & d.high) == prefix) & (keys >= floor));
      if (lanes) f(s, lanes, (keys >> d.shift) & (d.buckets - 1));
    });
  }

  float max_score() const {
    f32x16 running = splat(-kInf);
    for_each_score([&](int64_t, f32x16 s, int64_t) { running = s > running ? s : running; });
    return lane_max(running);
  }

  // The key of the k-th largest score, 1 <= k < count: top-k keeps the keys >= it.
  uint32_t kth_largest_key(int64_t k) const {
    uint32_t prefix = 0;
    int64_t rank = k;  // the wanted key's rank among the keys that share prefix's high bits
    for (const Digit& d : kDigits) {
      uint32_t counts[kMaxBuckets] = {};
      for_each_match(d, prefix, 0, [&](f32x16, uint32_t lanes, u32x16 buckets) {
        for (; lanes; lanes &= lanes - 1) ++counts[buckets[__builtin_ctz(lanes)]];
      });
      uint32_t b = d.buckets - 1;
      for (; b > 0 && rank > counts[b]; --b) rank -= counts[b];
      prefix |= b << d.shift;
    }
    return prefix;
  }

  // The smallest key top-p keeps among the keys >= floor (top-k's), given the max score: the largest key whose
  // mass from the top, sum of exp(s - max), reaches top_p * Z. 0 (keep all) when Z is NaN.
  uint32_t top_p_key(uint32_t floor, float max, float top_p) const {
    uint32_t prefix = 0;
    float above = 0.f;   // mass of the keys above prefix's bucket
    float target = 0.f;  // top_p * Z
    for (size_t level = 0; level < std::size(kDigits); ++level) {
      const Digit& d = kDigits[level];
      float mass[kMaxBuckets] = {};
      for_each_match(d, prefix, floor, [&](f32x16 s, uint32_t lanes, u32x16 buckets) {
        const f32x16 w = exp_lanes(s - max);
        for (; lanes; lanes &= lanes - 1) {
          const int l = __builtin_ctz(lanes);
          mass[buckets[l]] += w[l];
        }
      });
      if (level == 0) {  // Z summed top down, as `above` is below: the last bucket reaches exactly Z
        float z = 0.f;
        for (int64_t b = d.buckets - 1; b >= 0; --b) z += mass[b];
        target = top_p * z;
      }
      int64_t b = d.buckets - 1;
      for (; b >= 0 && !(above + mass[b] >= target); --b) above += mass[b];
      // Past the first level, the sums of a bucket's sub-buckets may round below the bucket's own sum and miss
      // the target: the whole bucket is kept then.
      if (b < 0) return level == 0 ? 0 : prefix;
      prefix |= static_cast<uint32_t>(b) << d.shift;
    }
    return prefix;
  }

  // The race over the allowed ids whose key is >= min_key: argmax of s - log E, the lowest id on ties. The two
  // logs of -log E are most of the work, and most ids cannot win: a lane whose score plus race_noise_bound
  // stays below the best key so far is dropped before them (were it equal it would still lose, to a lower id),
  // and a block with no lane left is skipped. The ids are the same as without the shortcut.
  int64_t race(uint32_t min_key) const {
    ArgMax best;
    float leader = -kInf;
    for_each_score([&](int64_t j, f32x16 s, int64_t n) {
      i32x16 kept = lane_ids() < static_cast<int32_t>(n);
      if (min_key) kept &= ordered_keys(s) >= min_key;
      const u32x16 ids = reinterpret_cast<u32x16>(lane_ids() + static_cast<int32_t>(pb_.lo + j));
      const f32x16 w = race_uniform(ids, keys_);
      kept &= s + race_noise_bound(w) >= leader;
      if (!lane_bits(kept)) return;
      const f32x16 keys = kept ? s + race_noise(w) : splat(-kInf);
      best.update(keys, j);
      leader = std::max(leader, lane_max(keys));
    });
    return pb_.lo + best.index();
  }

  const Problem<T>& pb_;
  const RaceKeys keys_;
  const T* group_[G];
  float max_[G] = {};      // log_softmax's statistics per group; 0 for mix "logits"
  float log_sum_[G] = {};
  bool divide_;
};

template <typename T, int G>
void sample_rows(const Problem<T>& pb, int64_t* out, int num_threads) {
  parallel_for(pb.batch, num_threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) out[row] = RowSampler<T, G>(pb, row).sample();
  });
}

// ---- speculative Jacobi verification (reference: jacobi_verify_fwd and its helpers) -------------------------

// The RNG words of stream `stream` at token position `position` for image b (reference: stream_bits).
inline RaceKeys stream_keys(uint32_t seed, int64_t position, uint64_t stream, int64_t image) {
  return race_keys(seed, static_cast<uint64_t>(position) + (stream << 32), image);
}

// The index j in [0, n) maximizing log(w_j) - log E_j, w_j = p_j, or max(0, p_j - q_j) when q is given, with
// E_j drawn for id j (relative, as the reference's race) from keys; the lowest index on ties, 0 when every w is
// 0. As in RowSampler::race, a lane whose upper bound (log w < (e + 1) ln 2 for w's binary exponent e, one ln 2
// more for rounding, plus race_noise_bound) stays below the best key so far is dropped before its logs.
inline int64_t race_log_weights(const float* p, const float* q, int64_t n, RaceKeys keys) {
  ArgMax best;
  float leader = -kInf;
  for_each_block_here(n, [&](int64_t j, auto count) {
    f32x16 w = load_block(p + j, count);
    if (q) {
      w = w - load_block(q + j, count);
      w = w > 0.f ? w : f32x16{};
    }
    const u32x16 ids = reinterpret_cast<u32x16>(lane_ids() + static_cast<int32_t>(j));
    const f32x16 uniform = race_uniform(ids, keys);
    const i32x16 exponent = (reinterpret_cast<i32x16>(w) >> 23) - 125;  // e + 2 (w >= 0)
    const f32x16 bound = __builtin_convertvector(exponent, f32x16) * 0.6931472f + race_noise_bound(uniform);
    uint32_t live = lane_bits((w > 0.f) & (bound >= leader));  // lanes past n load p = 0 (and q = 0)
    if (!live) return;
    const f32x16 noise = race_noise(uniform);
    f32x16 key = splat(-kInf);
    for (; live; live &= live - 1) {
      const int l = __builtin_ctz(live);
      key[l] = std::log(w[l]) + noise[l];
    }
    best.update(key, j);
    leader = std::max(leader, lane_max(key));
  });
  return best.index();
}

struct JacobiWindow {
  const int64_t* drafts;     // [N, W] absolute ids
  const float* draft_probs;  // [N, W, n]
  const int64_t* start;      // [N]
  int64_t images, window, limit;
  int64_t* count;   // [N]
  int64_t* tokens;  // [N, W]
  float* probs;     // [N, W, n]
};

// Rows (b, t) of the window in parallel: p into probs, the acceptance test and the redraft (stream 0). Then per
// image the run of accepted slots, the correction at the first rejection (stream 2), and probs zeroed there.
template <typename T, int G>
void verify_window(const Problem<T>& pb, const JacobiWindow& jw, int num_threads) {
  const int64_t n = pb.hi - pb.lo, W = jw.window, rows = jw.images * W;
  std::vector<uint8_t> accepted_slot(rows);
  parallel_for(rows, team_size(rows, num_threads), [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / W, position = jw.start[b] + row % W;
      float* p = jw.probs + row * n;
      RowSampler<T, G>(pb, row, RaceKeys{0, 0}).probs(p);
      const RaceKeys accept = stream_keys(pb.seed, position, 1, b);
      const float u = (static_cast<float>(hash32(accept.key1 ^ accept.key2)) + 0.5f) * 0x1p-32f;
      const int64_t d = jw.drafts[row] - pb.lo;
      accepted_slot[row] = position < jw.limit && u * jw.draft_probs[row * n + d] < p[d];
      jw.tokens[row] = pb.lo + race_log_weights(p, nullptr, n, stream_keys(pb.seed, position, 0, b));
    }
  });
  parallel_for(jw.images, team_size(jw.images, num_threads), [&](int64_t begin, int64_t end, int) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t accepted = 0;
      for (; accepted < W && accepted_slot[b * W + accepted]; ++accepted) {
        jw.tokens[b * W + accepted] = jw.drafts[b * W + accepted];
      }
      const int64_t position = jw.start[b] + accepted;
      const bool corrects = accepted < W && position < jw.limit;
      if (corrects) {
        const int64_t row = b * W + accepted;
        jw.tokens[row] = pb.lo + race_log_weights(jw.probs + row * n, jw.draft_probs + row * n, n,
                                                  stream_keys(pb.seed, position, 2, b));
      }
      const int64_t count = accepted + corrects;
      jw.count[b] = count;
      std::fill(jw.probs + b * W * n, jw.probs + (b * W + count) * n, 0.f);
    }
  });
}

}  // namespace

// ---- entry point (registered at the bottom of this file) ------------------------------------------------------------

namespace entry {

void cfg_sample(const TensorArg& logits, const TensorArg& offset, const TensorArg& out,
                const std::vector<double>& scales, double temperature, int64_t top_k, double top_p, int64_t lo,
                int64_t hi, bool log_softmax, uint32_t seed, int num_threads) {
  constexpr const char* kKernel = "sampling";
  const int64_t groups = static_cast<int64_t>(scales.size()) + 1;
  check(logits, kKernel, "logits", rows_of(kFloats, {kAny, kAny}));
  const int64_t rows = logits.sizes[0], vocab = logits.sizes[1];
  if (groups > 3 || rows < groups || rows % groups || vocab < 1 || vocab >= (int64_t{1} << 31)) {
    fail(logits, kKernel, "logits", "[G*B, V] with G = " + std::to_string(groups) + ", B >= 1 and 1 <= V < 2^31");
  }
  // The kernel steps from row to row by row_stride; a single row's stride is never stepped.
  const int64_t row_stride = rows > 1 ? logits.strides[0] : vocab;
  if (row_stride < vocab) fail(logits, kKernel, "logits", "rows at least V elements apart");
  const int64_t batch = rows / groups;
  check(offset, kKernel, "offset", contiguous(DType::kInt64, {1}).or_none());
  check(out, kKernel, "out", contiguous(DType::kInt64, {batch}));
  FASTMM_CHECK(0 <= lo && lo < hi && hi <= vocab, __func__,
               "expected 0 <= lo < hi <= vocab, got lo " + std::to_string(lo) + ", hi " + std::to_string(hi));
  FASTMM_CHECK(std::isfinite(temperature) && temperature >= 0 && top_k >= 0 && top_p > 0 && top_p <= 1, __func__,
               "expected temperature >= 0, top_k >= 0 and 0 < top_p <= 1");
  FASTMM_CHECK(num_threads >= 1, __func__, "num_threads must be >= 1, got " + std::to_string(num_threads));
  const float scale0 = groups > 1 ? static_cast<float>(scales[0]) : 0.f;
  const float scale1 = groups > 2 ? static_cast<float>(scales[1]) : 0.f;
  const uint64_t step = offset.present ? static_cast<uint64_t>(*offset.ptr<const int64_t>()) : 0;
  dispatch_dtype(static_cast<int>(logits.dtype), [&](auto tag) {
    using T = decltype(tag);
    const Problem<T> pb{logits.ptr<const T>(), batch, vocab, row_stride, lo, hi, {scale0, scale1},
                        static_cast<float>(temperature), top_k, static_cast<float>(top_p), log_softmax, seed, step};
    const int threads = team_size(batch, num_threads);
    if (groups == 1) sample_rows<T, 1>(pb, out.ptr<int64_t>(), threads);
    if (groups == 2) sample_rows<T, 2>(pb, out.ptr<int64_t>(), threads);
    if (groups == 3) sample_rows<T, 3>(pb, out.ptr<int64_t>(), threads);
  });
}

// fastmm._C.jacobi_verify: one speculative Jacobi verification (fastmm.reference.sampling.jacobi_verify_fwd)
// into count [N], tokens [N, W] int64 and probs [N, W, hi - lo] fp32. logits [G*N, W, V] contiguous in a float
// dtype, drafts [N, W] int64 absolute ids in [lo, hi), draft_probs [N, W, hi - lo] fp32, start [N] int64;
// positions >= limit are never taken. Options as cfg_sample's.
void jacobi_verify(const TensorArg& logits, const TensorArg& drafts, const TensorArg& draft_probs,
                   const TensorArg& start, const TensorArg& count, const TensorArg& tokens, const TensorArg& probs,
                   const std::vector<double>& scales, double temperature, int64_t top_k, double top_p, int64_t lo,
                   int64_t hi, bool log_softmax, uint32_t seed, int64_t limit, int num_threads) {
  constexpr const char* kKernel = "sampling";
  const int64_t groups = static_cast<int64_t>(scales.size()) + 1;
  check(logits, kKernel, "logits", contiguous(kFloats, {kAny, kAny, kAny}));
  const int64_t rows = logits.sizes[0], window = logits.sizes[1], vocab = logits.sizes[2];
  if (groups > 3 || rows < groups || rows % groups || window < 1 || vocab < 1 || vocab >= (int64_t{1} << 31)) {
    fail(logits, kKernel, "logits",
         "[G*N, W, V] with G = " + std::to_string(groups) + ", N >= 1, W >= 1 and 1 <= V < 2^31");
  }
  FASTMM_CHECK(0 <= lo && lo < hi && hi <= vocab, __func__,
               "expected 0 <= lo < hi <= vocab, got lo " + std::to_string(lo) + ", hi " + std::to_string(hi));
  const int64_t images = rows / groups, n = hi - lo;
  check(drafts, kKernel, "drafts", contiguous(DType::kInt64, {images, window}));
  check(draft_probs, kKernel, "draft_probs", contiguous(DType::kFloat32, {images, window, n}));
  check(start, kKernel, "start", contiguous(DType::kInt64, {images}));
  check(count, kKernel, "count", contiguous(DType::kInt64, {images}));
  check(tokens, kKernel, "tokens", contiguous(DType::kInt64, {images, window}));
  check(probs, kKernel, "probs", contiguous(DType::kFloat32, {images, window, n}));
  FASTMM_CHECK(std::isfinite(temperature) && temperature >= 0 && top_k >= 0 && top_p > 0 && top_p <= 1, __func__,
               "expected temperature >= 0, top_k >= 0 and 0 < top_p <= 1");
  FASTMM_CHECK(num_threads >= 1, __func__, "num_threads must be >= 1, got " + std::to_string(num_threads));
  const int64_t* draft_ids = drafts.ptr<const int64_t>();
  for (int64_t i = 0; i < images * window; ++i) {
    if (draft_ids[i] < lo || draft_ids[i] >= hi) {
      refuse(kKernel, "drafts must lie in [lo, hi) = [" + std::to_string(lo) + ", " + std::to_string(hi) +
                          "), got " + std::to_string(draft_ids[i]));
    }
  }
  const float scale0 = groups > 1 ? static_cast<float>(scales[0]) : 0.f;
  const float scale1 = groups > 2 ? static_cast<float>(scales[1]) : 0.f;
  const JacobiWindow jw{draft_ids,      draft_probs.ptr<const float>(), start.ptr<const int64_t>(), images, window,
                        limit,          count.ptr<int64_t>(),           tokens.ptr<int64_t>(),      probs.ptr<float>()};
  dispatch_dtype(static_cast<int>(logits.dtype), [&](auto tag) {
    using T = decltype(tag);
    // The window's rows as cfg_sample's batch: row b * W + t of group i is logits row i * N * W + b * W + t.
    const Problem<T> pb{logits.ptr<const T>(), images * window, vocab, vocab, lo, hi, {scale0, scale1},
                        static_cast<float>(temperature), top_k, static_cast<float>(top_p), log_softmax, seed, 0};
    if (groups == 1) verify_window<T, 1>(pb, jw, num_threads);
    if (groups == 2) verify_window<T, 2>(pb, jw, num_threads);
    if (groups == 3) verify_window<T, 3>(pb, jw, num_threads);
  });
}

}  // namespace entry
}  // namespace fastmm

FASTMM_ENTRY_POINTS(m) {
  m.def("cfg_sample", &fastmm::entry::cfg_sample, fastmm::release());
  m.def("jacobi_verify", &fastmm::entry::jacobi_verify, fastmm::release());
}
