// Vector operations, the register-blocked inner loop and the shape checks shared by the
// float32 product kernels (row_matmul.cc, packed_matmul.cc).

#ifndef SPECJAX_CSRC_SIMD_H_
#define SPECJAX_CSRC_SIMD_H_

#include <cmath>
#include <cstdint>
#include <string>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "kernels.h"
#include "rows.h"

namespace specjax {

// The loop below is written with intrinsics. Left to GCC's vectorizer, groups of 2 to 4
// rows spilled their sums to the stack and mixed 128-bit with 512-bit operations. On
// one core of an AMD EPYC, 4 rows of a 384 x 1024 weight took 49 us and 5 rows 33 us.
// Written out, 4 rows take 24 us and 5 rows 25 us.
#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec Broadcast(float x) { return _mm512_set1_ps(x); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float FmaScalar(float a, float b, float c) { return std::fma(a, b, c); }
constexpr int kWide = 8;  // vectors per column block for 1 or 2 rows (32 registers)
constexpr int kNarrow = 4;  // for 3 to 6 rows
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec Broadcast(float x) { return _mm256_set1_ps(x); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float FmaScalar(float a, float b, float c) { return std::fma(a, b, c); }
constexpr int kWide = 4;  // 16 registers
constexpr int kNarrow = 2;
#else
// Portable code: plain arrays that the compiler may vectorize. Where the target has a
// fused multiply-add (__FP_FAST_FMAF, as on AArch64) every term uses it, so that the
// compiler's contraction of some loops and not others cannot change a result. Without
// one, every term is a product and a sum.
// NOTE: the fused branch is tested on x86 built with -mfma alone, not on AArch64.
struct Vec {
  float lane[8];
};
constexpr int kLanes = 8;
inline Vec Load(const float* p) {
  Vec v;
  for (int i = 0; i < kLanes; ++i) v.lane[i] = p[i];
  return v;
}
inline void Store(float* p, Vec v) {
  for (int i = 0; i < kLanes; ++i) p[i] = v.lane[i];
}
inline Vec Broadcast(float x) {
  Vec v;
  for (int i = 0; i < kLanes; ++i) v.lane[i] = x;
  return v;
}
inline float FmaScalar(float a, float b, float c) {
#ifdef __FP_FAST_FMAF
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}
inline Vec Fma(Vec a, Vec b, Vec c) {
  for (int i = 0; i < kLanes; ++i) c.lane[i] = FmaScalar(a.lane[i], b.lane[i], c.lane[i]);
  return c;
}
constexpr int kWide = 4;
constexpr int kNarrow = 2;
#endif

// Pins `v` to a register where it is computed. Without it GCC folded the weight loads
// into every row's multiply-add (4 loads of each weight for 4 rows), and hoisted the
// broadcasts out of the column loop into stack slots.
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
inline void Keep(Vec& v) { __asm__ volatile("" : "+v"(v)); }
#else
inline void Keep(Vec&) {}
#endif

// Floats ahead of the current weight row that a weight stored as one stream (the packed
// layout) is prefetched from. In forwards of the shipped target on a 2-core AMD EPYC,
// 16 KiB ahead took a 5-token forward from 0.95 to 0.65 ms and a 1-token one from 0.56 to
// 0.48 ms (8 KiB and 32 KiB ahead did less). Likely without it the loads of 5 rows wait
// behind their multiply-adds, which fill the reorder window.
constexpr int64_t kPrefetchFloats = 4096;

// Adds xs[:, :depth] @ w[:depth, :V * kLanes] into y[:, j:j + V * kLanes] for `Rows`
// rows, the sums held in registers. Row m of xs starts at xs + m * kChunk, and the
// weight rows lie `stride` floats apart. With `Stream`, the weight continues in memory
// past this block and is prefetched. Each element takes its terms one at a time in
// order, each with one fused multiply-add, so the blocking never changes a result.
template <int Rows, int V, bool Stream = false>
inline void Columns(const float* xs, int depth, const float* __restrict w, int64_t stride,
                    float* __restrict y, int64_t n, int64_t j) {
  Vec acc[Rows][V];
#pragma GCC unroll 8
  for (int m = 0; m < Rows; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[m][v] = Load(y + m * n + j + v * kLanes);
  for (int r = 0; r < depth; ++r) {
    const float* wr = w + r * stride;
    Vec wv[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      wv[v] = Load(wr + v * kLanes);
      Keep(wv[v]);
    }
    if (Stream) {
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) __builtin_prefetch(wr + kPrefetchFloats + v * kLanes, 0, 3);
    }
#pragma GCC unroll 8
    for (int m = 0; m < Rows; ++m) {
      Vec xm = Broadcast(xs[m * kChunk + r]);
      Keep(xm);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[m][v] = Fma(xm, wv[v], acc[m][v]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < Rows; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) Store(y + m * n + j + v * kLanes, acc[m][v]);
}

// A kernel's product over weight rows [k0, k1): y (rows, n) = x[:, k0:k1] @ w[k0:k1, :],
// where x has row stride ldx and w is (k, n) in the kernel's own layout.
using FloatProduct = void (*)(const float* x, const float* w, float* y, int64_t rows, int64_t ldx,
                              int64_t n, int64_t k0, int64_t k1);

// Checks that x is (rows, k) and w (k, n) with k a multiple of `k_step` and n of `n_step`,
// then computes y = x @ w with `product` over parts of the contraction (rows.h). Returns
// an error message, or an empty string once y is written.
inline std::string RunFloatProduct(const char* name, int64_t threads, Floats x, Floats w, Floats y,
                                   FloatProduct product, int64_t k_step = 1, int64_t n_step = 1) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return std::string(name) + " expects x (rows, k) and w (k, n)";
  int64_t rows = xd[0], k = wd[0], n = wd[1];
  if (k % k_step != 0 || n % n_step != 0)
    return std::string(name) + " expects k a multiple of " + std::to_string(k_step) + " and n of " +
           std::to_string(n_step);
  const float* xs = x.typed_data();
  const float* ws = w.typed_data();
  SplitContraction(threads, k, k * n * 4, rows * n, y.typed_data(),
                   [=](int64_t k0, int64_t k1, float* out) { product(xs, ws, out, rows, k, n, k0, k1); });
  return "";
}

}  // namespace specjax

#endif  // SPECJAX_CSRC_SIMD_H_
