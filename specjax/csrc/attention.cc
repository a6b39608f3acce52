// Decode attention over a KV cache, as an XLA FFI handler for the CPU backend.
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

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IntVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

Vec Load(const float* from) {
  Vec v;
  std::memcpy(&v, from, sizeof(v));
  return v;
}

void Store(float* to, Vec v) { std::memcpy(to, &v, sizeof(v)); }

// Sums the lanes by halves, in an order fixed here rather than by the compiler.
float Sum(Vec v) {
  typedef float Half __attribute__((vector_size(kLanes / 2 * sizeof(float))));
  typedef float Quarter __attribute__((vector_size(kLanes / 4 * sizeof(float))));
  Half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  Quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// exp(x) for x <= 0, and 0 below -87 (where float32 underflows), from exp(x) =
// 2^n exp(r) with |r| <= ln(2) / 2 and a degree-6 Taylor polynomial for exp(r), whose
// error is about one unit in the last place. Written on whole vectors so that it
// vectorizes on every CPU.
Vec Exp(Vec x) {
  const Vec zero = Vec{} + 0.0f;
  Vec clamped = x < -87.0f ? zero - 87.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  Vec shifted = clamped * 1.44269504f + shifter;
  Vec n = shifted - shifter;
  Vec r = clamped - n * 0.693145752f - n * 1.42860677e-6f;
  Vec p = 1.0f / 720 + zero;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  IntVec exponent = (__builtin_convertvector(n, IntVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  return x < -87.0f ? zero : p * scale;
}

float Dot(const float* a, const float* b, int64_t size) {
  Vec acc = Vec{};
  for (int64_t d = 0; d < size; d += kLanes) acc += Load(a + d) * Load(b + d);
  return Sum(acc);
}

// Computes the attention of one row's queries that share a KV head. `keys[j]` points at
// the key of position j, and `values` contains the values by position, (head_dim, stride).
void Group(const float* q, int64_t q_stride, int64_t queries_per_head, const int64_t* lengths,
           int64_t tokens, const std::vector<const float*>& keys, const float* values,
           int64_t stride, int64_t head_dim, float* out, int64_t out_stride) {
  const float root = std::sqrt(static_cast<float>(head_dim));
  std::vector<float> weights(stride);
  for (int64_t t = 0; t < tokens; ++t) {
    int64_t length = lengths[t];
    int64_t padded = (length + kLanes - 1) / kLanes * kLanes;
    for (int64_t g = 0; g < queries_per_head; ++g) {
      const float* query = q + t * q_stride + g * head_dim;
      float largest = -INFINITY;
      for (int64_t j = 0; j < length; ++j) {
        float score = Dot(query, keys[j], head_dim) / root;
        weights[j] = score;
        largest = std::max(largest, score);
      }
      std::fill(weights.begin() + length, weights.begin() + padded, -INFINITY);
      Vec total = Vec{};
      for (int64_t j = 0; j < padded; j += kLanes) {
        Vec w = Exp(Load(&weights[j]) - largest);
        Store(&weights[j], w);
        total += w;
      }
      float sum = Sum(total);
      for (int64_t j = 0; j < padded; j += kLanes) Store(&weights[j], Load(&weights[j]) / sum);
      // Four value rows at a time share each load of the weights.
      float* result = out + t * out_stride + g * head_dim;
      for (int64_t h = 0; h < head_dim; h += 4) {
        Vec acc[4] = {};
        for (int64_t j = 0; j < padded; j += kLanes) {
          Vec w = Load(&weights[j]);
          for (int i = 0; i < 4; ++i) acc[i] += w * Load(values + (h + i) * stride + j);
        }
        for (int i = 0; i < 4; ++i) result[h + i] = Sum(acc[i]);
      }
    }
  }
}

ffi::Error Attention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                     ffi::Buffer<ffi::F32> k_cache, ffi::Buffer<ffi::F32> v_cache,
                     ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), cd = k_cache.dimensions(), vd = v_cache.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || cd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("attention expects 4-D q, k, v and caches");
  int64_t batch = qd[0], tokens = qd[1], heads = qd[2], head_dim = qd[3];
  int64_t kv_heads = cd[1], slots = cd[2];
  if (kd[0] != batch || kd[1] != tokens || kd[2] != kv_heads || kd[3] != head_dim ||
      v.dimensions()[2] != kv_heads || cd[0] != batch || cd[3] != head_dim || vd[0] != batch ||
      vd[1] != kv_heads || vd[2] != head_dim || vd[3] != slots || heads % kv_heads ||
      head_dim % kLanes || positions.dimensions()[0] != batch || positions.dimensions()[1] != tokens)
    return ffi::Error::InvalidArgument("attention: operand shapes do not match");
  const float *qs = q.typed_data(), *ks = k.typed_data(), *vs = v.typed_data();
  const float *kc = k_cache.typed_data(), *vc = v_cache.typed_data();
  const int32_t* pos = positions.typed_data();
  float* result = out->typed_data();
  int64_t group = heads / kv_heads;

  std::vector<int64_t> fresh, lengths(tokens);
  std::vector<const float*> keys;
  std::vector<float> values;
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t* row = pos + b * tokens;
    int64_t cached = std::clamp<int64_t>(row[0], 0, slots);
    // New tokens at a position not seen before in this forward. Rows padded by repeating
    // their last position feed that position once.
    fresh.clear();
    for (int64_t t = 0; t < tokens; ++t)
      if (t == 0 || row[t] != row[t - 1]) fresh.push_back(t);
    for (int64_t t = 0; t < tokens; ++t) {
      int64_t seen = 0;
      while (seen < static_cast<int64_t>(fresh.size()) && row[fresh[seen]] <= row[t]) ++seen;
      lengths[t] = cached + seen;
    }
    int64_t total = cached + fresh.size();
    int64_t stride = (total + kLanes - 1) / kLanes * kLanes;
    for (int64_t g = 0; g < kv_heads; ++g) {
      keys.resize(total);
      for (int64_t j = 0; j < cached; ++j) keys[j] = kc + ((b * kv_heads + g) * slots + j) * head_dim;
      for (size_t i = 0; i < fresh.size(); ++i)
        keys[cached + i] = ks + ((b * tokens + fresh[i]) * kv_heads + g) * head_dim;
      values.assign(head_dim * stride, 0.0f);
      for (int64_t h = 0; h < head_dim; ++h) {
        const float* from = vc + ((b * kv_heads + g) * head_dim + h) * slots;
        std::copy(from, from + cached, values.begin() + h * stride);
        for (size_t i = 0; i < fresh.size(); ++i)
          values[h * stride + cached + i] = vs[((b * tokens + fresh[i]) * kv_heads + g) * head_dim + h];
      }
      Group(qs + (b * tokens * heads + g * group) * head_dim, heads * head_dim, group, lengths.data(),
            tokens, keys, values.data(), stride, head_dim,
            result + (b * tokens * heads + g * group) * head_dim, heads * head_dim);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
