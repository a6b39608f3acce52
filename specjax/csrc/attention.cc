// Decode attention over a KV cache, for the CPU backend.
//
// XLA's attention for a few new tokens scores every slot of the cache and masks the
// unused ones, in about fifteen small operations per layer. This kernel reads only the
// slots below each row's first new position, plus the new tokens, so its cost follows
// the sequence length rather than the cache's capacity.
//
// A query at position p attends to the keys at positions 0 .. p, whether they sit in the
// cache or among this forward's new tokens. The kernel lays them out by position and sums
// over them in the same blocks wherever they sit. So a query's output does not depend on
// how many tokens its forward has, and a verify forward attends exactly as plain
// decoding does.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention.h"
#include "kernels.h"
#include "rows.h"
#include "vector16.h"

namespace {

using namespace specjax::v16;

// Returns the lane sums of 16 vectors, in order: lane i of the result sums parts[i]. Each
// level pairs the vectors up and adds every vector's upper lanes to its lower ones. The
// order is thus a fixed tree, and a score never depends on the other keys of its block.
Vec SumEach(const Vec (&parts)[kLanes]) {
  Vec level[kLanes];
  for (int i = 0; i < 8; ++i) {
    const Vec &a = parts[2 * i], &b = parts[2 * i + 1];
    level[i] = SHUFFLE(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               SHUFFLE(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    const Vec &a = level[2 * i], &b = level[2 * i + 1];
    level[i] = SHUFFLE(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               SHUFFLE(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    const Vec &a = level[2 * i], &b = level[2 * i + 1];
    level[i] = SHUFFLE(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               SHUFFLE(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return SHUFFLE(level[0], level[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUFFLE(level[0], level[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// One row's keys and values of one KV head, by position. Positions below `base`, a
// multiple of kLanes, are read from the cache in place. The rest (the cached positions
// from `base` on, then the new tokens) come from a small copy.
struct Sequence {
  const float* cache_keys;    // (slots, head_dim)
  const float* cache_values;  // (head_dim, slots)
  int64_t slots, base, head_dim;
  std::vector<const float*> tail_keys;  // the key of position base + i
  std::vector<float> tail_values;       // (head_dim, tail_stride)
  int64_t tail_stride;

  const float* Key(int64_t j) const { return j < base ? cache_keys + j * head_dim : tail_keys[j - base]; }
};

constexpr int kQueryBlock = 6;

// outs[q][h] = sum over j of weights[q * padded + j] * value(h, j), for NQ queries.
template <int NQ>
void ValueBlock(const Sequence& seq, const float* weights, int64_t padded, float* const* outs) {
  for (int64_t h = 0; h < seq.head_dim; h += 4) {
    Vec acc[NQ][4] = {};
    const float* cached = seq.cache_values + h * seq.slots;
    const float* copied = seq.tail_values.data() + h * seq.tail_stride - seq.base;
    for (int64_t j = 0; j < padded; j += kLanes) {
      const float* rows = j < seq.base ? cached + j : copied + j;
      int64_t step = j < seq.base ? seq.slots : seq.tail_stride;
      Vec value[4];
      for (int r = 0; r < 4; ++r) value[r] = Load(rows + r * step);
      for (int q = 0; q < NQ; ++q) {
        Vec w = Load(weights + q * padded + j);
        for (int r = 0; r < 4; ++r) acc[q][r] += w * value[r];
      }
    }
    for (int q = 0; q < NQ; ++q)
      for (int r = 0; r < 4; ++r) outs[q][h + r] = Sum(acc[q][r]);
  }
}

using ValueFn = void (*)(const Sequence&, const float*, int64_t, float* const*);
constexpr ValueFn kValueBlocks[kQueryBlock + 1] = {nullptr,        ValueBlock<1>, ValueBlock<2>,
                                                   ValueBlock<3>, ValueBlock<4>, ValueBlock<5>,
                                                   ValueBlock<6>};

// Computes the attention of one row's queries that share a KV head: `group` heads for
// each of `tokens` tokens, `token_stride` floats apart in q and out. Query i, head i % group
// of token i / group, attends to positions 0 .. lengths[i] - 1.
void Attend(const Sequence& seq, const float* q, float* out, int64_t tokens, int64_t group,
            int64_t token_stride, const int64_t* lengths) {
  const int64_t head_dim = seq.head_dim, chunks = head_dim / kLanes;
  const int64_t queries = tokens * group;
  std::vector<const float*> query_of(queries);
  std::vector<float*> out_of(queries);
  for (int64_t i = 0; i < queries; ++i) {
    int64_t at = i / group * token_stride + i % group * head_dim;
    query_of[i] = q + at;
    out_of[i] = out + at;
  }
  const float root = std::sqrt(static_cast<float>(head_dim));
  int64_t longest = *std::max_element(lengths, lengths + queries);
  int64_t padded = (longest + kLanes - 1) / kLanes * kLanes;
  std::vector<float> scores(queries * padded);
  std::vector<Vec> parts(queries * kLanes);
  std::vector<float> zeros(head_dim, 0.0f);
  // Scores, 16 keys at a time: each key's products with a query land in the lanes of one
  // vector, every query reusing the key's loads, and SumEach adds the lanes of 16 keys.
  for (int64_t j = 0; j < padded; j += kLanes) {
    for (int key = 0; key < kLanes; ++key) {
      const float* k = j + key < longest ? seq.Key(j + key) : zeros.data();
      for (int64_t i = 0; i < queries; ++i) {
        const float* query = query_of[i];
        Vec acc = Load(query) * Load(k);
        for (int64_t c = 1; c < chunks; ++c) acc += Load(query + c * kLanes) * Load(k + c * kLanes);
        parts[i * kLanes + key] = acc;
      }
    }
    for (int64_t i = 0; i < queries; ++i) {
      const Vec(&block)[kLanes] = *reinterpret_cast<const Vec(*)[kLanes]>(&parts[i * kLanes]);
      Store(&scores[i * padded + j], SumEach(block) / root);
    }
  }
  // Softmax per query over its own length, where the padding weighs zero.
  for (int64_t i = 0; i < queries; ++i) {
    float* weights = &scores[i * padded];
    std::fill(weights + lengths[i], weights + padded, -INFINITY);
    Vec peak = Vec{} - INFINITY;
    for (int64_t j = 0; j < padded; j += kLanes) {
      Vec w = Load(weights + j);
      peak = w > peak ? w : peak;
    }
    float largest = peak[0];
    for (int l = 1; l < kLanes; ++l) largest = std::max(largest, peak[l]);
    Vec total = Vec{};
    for (int64_t j = 0; j < padded; j += kLanes) {
      Vec w = Exp(Load(weights + j) - largest);
      Store(weights + j, w);
      total += w;
    }
    float sum = Sum(total);
    for (int64_t j = 0; j < padded; j += kLanes) Store(weights + j, Load(weights + j) / sum);
  }
  // Values: up to kQueryBlock queries and 4 value rows at a time keep their sums in
  // registers. Blocks below `base` come from the cache and the rest from the copy.
  for (int64_t i = 0; i < queries; i += kQueryBlock) {
    int64_t count = std::min<int64_t>(kQueryBlock, queries - i);
    kValueBlocks[count](seq, &scores[i * padded], padded, &out_of[i]);
  }
}

}  // namespace

namespace specjax {

void Rotate(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin) {
  const int64_t half = head_dim / 2;
  for (int64_t n = 0; n < heads; ++n) {
    float* head = x + n * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      float low = head[i], high = head[i + half];
      head[i] = low * cos[i] - high * sin[i];
      head[i + half] = high * cos[i + half] + low * sin[i + half];
    }
  }
}

void AttendHead(const float* qs, const float* ks, const float* vs, const float* kc,
                const float* vc, const int32_t* pos, float* result, int64_t b, int64_t g,
                int64_t tokens, int64_t heads, int64_t kv_heads, int64_t slots, int64_t head_dim) {
  const int32_t* row = pos + b * tokens;
  int64_t group = heads / kv_heads;
  int64_t cached = std::clamp<int64_t>(row[0], 0, slots);
  // New tokens at a position not seen before in this forward. Rows padded by repeating
  // their last position feed that position once.
  std::vector<int64_t> fresh, lengths(tokens * group);
  for (int64_t t = 0; t < tokens; ++t)
    if (t == 0 || row[t] != row[t - 1]) fresh.push_back(t);
  for (int64_t t = 0; t < tokens; ++t) {
    int64_t seen = 0;
    while (seen < static_cast<int64_t>(fresh.size()) && row[fresh[seen]] <= row[t]) ++seen;
    std::fill(lengths.begin() + t * group, lengths.begin() + (t + 1) * group, cached + seen);
  }
  Sequence seq;
  seq.slots = slots, seq.head_dim = head_dim;
  seq.base = cached / kLanes * kLanes;
  int64_t tail = cached - seq.base + fresh.size();
  seq.tail_stride = (tail + kLanes - 1) / kLanes * kLanes;
  seq.cache_keys = kc + (b * kv_heads + g) * slots * head_dim;
  seq.cache_values = vc + (b * kv_heads + g) * head_dim * slots;
  seq.tail_keys.resize(tail);
  seq.tail_values.assign(head_dim * seq.tail_stride, 0.0f);
  for (int64_t j = seq.base; j < cached; ++j) {
    seq.tail_keys[j - seq.base] = seq.cache_keys + j * head_dim;
    for (int64_t h = 0; h < head_dim; ++h)
      seq.tail_values[h * seq.tail_stride + j - seq.base] = seq.cache_values[h * slots + j];
  }
  for (size_t i = 0; i < fresh.size(); ++i) {
    int64_t at = ((b * tokens + fresh[i]) * kv_heads + g) * head_dim;
    seq.tail_keys[cached - seq.base + i] = ks + at;
    for (int64_t h = 0; h < head_dim; ++h)
      seq.tail_values[h * seq.tail_stride + cached - seq.base + i] = vs[at + h];
  }
  int64_t first = (b * tokens * heads + g * group) * head_dim;
  ::Attend(seq, qs + first, result + first, tokens, group, heads * head_dim, lengths.data());
}

}  // namespace specjax

std::string specjax::Attention(int64_t threads, Floats q, Floats k, Floats v, Floats k_cache,
                               Floats v_cache, Words positions, Floats cos, Floats sin, Floats out,
                               Floats k_out) {
  auto qd = q.dimensions(), kd = k.dimensions(), cd = k_cache.dimensions(), vd = v_cache.dimensions();
  auto rd = cos.dimensions(), sd = sin.dimensions(), od = k_out.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || cd.size() != 4 || vd.size() != 4 || rd.size() != 3 ||
      sd.size() != 3 || od.size() != 4)
    return std::string("attention expects 4-D q, k, v and caches and 3-D rotary tables");
  int64_t batch = qd[0], tokens = qd[1], heads = qd[2], head_dim = qd[3];
  int64_t kv_heads = cd[1], slots = cd[2];
  if (kd[0] != batch || kd[1] != tokens || kd[2] != kv_heads || kd[3] != head_dim ||
      v.dimensions()[2] != kv_heads || cd[0] != batch || cd[3] != head_dim || vd[0] != batch ||
      vd[1] != kv_heads || vd[2] != head_dim || vd[3] != slots || heads % kv_heads ||
      head_dim % kLanes || positions.dimensions()[0] != batch || positions.dimensions()[1] != tokens)
    return std::string("attention: operand shapes do not match");
  const int64_t table_dims[3] = {batch, tokens, head_dim};
  for (size_t i = 0; i < 3; ++i)
    if (rd[i] != table_dims[i] || sd[i] != table_dims[i])
      return std::string("attention expects rotary tables (batch, tokens, head_dim)");
  for (size_t i = 0; i < 4; ++i)
    if (od[i] != kd[i]) return std::string("attention expects k_out shaped like k");
  const float *vs = v.typed_data(), *kc = k_cache.typed_data(), *vc = v_cache.typed_data();
  const float *cs = cos.typed_data(), *ss = sin.typed_data();
  const int32_t* pos = positions.typed_data();
  float *result = out.typed_data(), *ks = k_out.typed_data();
  // The rotated queries go to a copy, the rotated keys to k_out, which the caller writes
  // into the cache.
  std::vector<float> qs(q.typed_data(), q.typed_data() + batch * tokens * heads * head_dim);
  std::copy(k.typed_data(), k.typed_data() + batch * tokens * kv_heads * head_dim, ks);
  for (int64_t bt = 0; bt < batch * tokens; ++bt) {
    specjax::Rotate(qs.data() + bt * heads * head_dim, heads, head_dim, cs + bt * head_dim, ss + bt * head_dim);
    specjax::Rotate(ks + bt * kv_heads * head_dim, kv_heads, head_dim, cs + bt * head_dim, ss + bt * head_dim);
  }
  // Each row and KV head is one part, computed whole by one thread, so the result does
  // not depend on which thread takes it.
  auto head = [&](int64_t part) {
    specjax::AttendHead(qs.data(), ks, vs, kc, vc, pos, result, part / kv_heads, part % kv_heads, tokens,
                        heads, kv_heads, slots, head_dim);
  };
  specjax::RunParts(threads, batch * kv_heads, head);
  return "";
}
