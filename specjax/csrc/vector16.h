// GCC vector types of 16 float32 lanes and the operations on them that the attention
// and draft layer kernels share. Written on whole vectors, they compile to AVX-512 where
// the machine has it and to narrower instructions elsewhere.

#ifndef SPECJAX_CSRC_VECTOR16_H_
#define SPECJAX_CSRC_VECTOR16_H_

#include <cstdint>
#include <cstring>

namespace specjax {
namespace v16 {

constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IntVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Load(const float* from) {
  Vec v;
  std::memcpy(&v, from, sizeof(v));
  return v;
}

inline void Store(float* to, Vec v) { std::memcpy(to, &v, sizeof(v)); }

// GCC before version 12 lacks __builtin_shufflevector. Its __builtin_shuffle takes the
// lane indices as a vector instead.
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, IntVec{__VA_ARGS__})
#endif

// Sums the lanes by halves, in an order fixed here rather than by the compiler.
inline float Sum(Vec v) {
  v += SHUFFLE(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += SHUFFLE(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return v[0] + v[1];
}

// Returns exp(x) for x <= 0, and 0 below -87 (where float32 underflows), as 2^n exp(r)
// with |r| <= ln(2) / 2 and a degree-6 Taylor polynomial for exp(r). Its error is an
// estimated one unit in the last place. Written on whole vectors, so it vectorizes on any CPU.
inline Vec Exp(Vec x) {
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

}  // namespace v16
}  // namespace specjax

#endif  // SPECJAX_CSRC_VECTOR16_H_
