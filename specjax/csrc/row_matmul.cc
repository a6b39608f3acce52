// A float32 product y = x @ w for a few rows of x, as an XLA FFI handler for the CPU backend.
//
// Decoding multiplies 1 to K + 1 rows by each weight matrix. XLA's CPU dot ran such
// products at 10 to 30 GFLOP/s, so a verify forward of 5 rows cost nearly twice a
// 1-row forward although both read the same weights. This kernel reads each weight
// row once per group of up to 6 input rows, keeps the running sums of a block of
// columns in vector registers, and splits the contraction over threads (rows.h).
//
// Every output element is summed in the same order whatever the number of rows. So
// row i of a many-row product equals the 1-row product of row i bit for bit, and a
// verify forward computes the products that plain decoding would.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using specjax::kBlock;
using specjax::kChunk;
using specjax::kMaxGroup;

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// Vector code written out with intrinsics. Left to GCC's vectorizer, groups of 2 to 4
// rows spilled their sums to the stack and mixed 128-bit with 512-bit operations. On
// one core of an AMD EPYC, 4 rows of a 384 x 1024 weight took 49 us and 5 rows 33 us;
// written out, 4 rows take 24 us and 5 rows 25 us.
#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec Broadcast(float x) { return _mm512_set1_ps(x); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
constexpr int kWide = 8;  // vectors per column block for 1 or 2 rows (32 registers)
constexpr int kNarrow = 4;  // for 3 to 6 rows
#else
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec Broadcast(float x) { return _mm256_set1_ps(x); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
constexpr int kWide = 4;  // 16 registers
constexpr int kNarrow = 2;
#endif

// Pins `v` to a register where it is computed. Without it GCC folded the weight loads
// into every row's multiply-add (4 loads of each weight for 4 rows), and hoisted the
// broadcasts out of the column loop into stack slots.
inline void Keep(Vec& v) { __asm__ volatile("" : "+v"(v)); }

// Adds xs[:, :depth] @ w[:depth, j:j + V * kLanes] into y for `Rows` rows, the sums
// held in registers. Each element takes its terms one at a time in order, each with
// one fused multiply-add, whatever the block, so the blocking never changes a result.
template <int Rows, int V>
inline void Columns(const float (&xs)[kMaxGroup][kChunk], int depth,
                    const float* __restrict w, float* __restrict y, int64_t n, int64_t j) {
  Vec acc[Rows][V];
#pragma GCC unroll 8
  for (int m = 0; m < Rows; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[m][v] = Load(y + m * n + j + v * kLanes);
  for (int r = 0; r < depth; ++r) {
    const float* wr = w + r * n + j;
    Vec wv[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      wv[v] = Load(wr + v * kLanes);
      Keep(wv[v]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < Rows; ++m) {
      Vec xm = Broadcast(xs[m][r]);
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

// y[:, c0:c1] = x @ w[:, c0:c1] for `Rows` rows; x is (Rows, k) with row stride ldx,
// w is (k, n) and y (Rows, n), both row-major.
template <int Rows>
void Group(const float* __restrict x, const float* __restrict w, float* __restrict y,
           int64_t k, int64_t ldx, int64_t n, int64_t c0, int64_t c1) {
  constexpr int V = Rows <= 2 ? kWide : kNarrow;
  for (int m = 0; m < Rows; ++m) std::memset(y + m * n + c0, 0, sizeof(float) * (c1 - c0));
  float xs[kMaxGroup][kChunk];
  for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
    const int depth = static_cast<int>(std::min<int64_t>(kChunk, k - k0));
    for (int m = 0; m < Rows; ++m)
      for (int r = 0; r < depth; ++r) xs[m][r] = x[m * ldx + k0 + r];
    const float* wk = w + k0 * n;
    int64_t j = c0;
    for (; j + V * kLanes <= c1; j += V * kLanes) Columns<Rows, V>(xs, depth, wk, y, n, j);
    for (; j + kLanes <= c1; j += kLanes) Columns<Rows, 1>(xs, depth, wk, y, n, j);
    for (; j < c1; ++j)
      for (int m = 0; m < Rows; ++m) {
        float sum = y[m * n + j];
        for (int r = 0; r < depth; ++r) sum = std::fma(xs[m][r], wk[r * n + j], sum);
        y[m * n + j] = sum;
      }
  }
}
#else
// Portable code, vectorized by the compiler.
// y[:, c0:c1] = x @ w[:, c0:c1] for `Rows` rows; x is (Rows, k) with row stride ldx,
// w is (k, n) and y (Rows, n), both row-major.
template <int Rows>
void Group(const float* __restrict x, const float* __restrict w, float* __restrict y,
           int64_t k, int64_t ldx, int64_t n, int64_t c0, int64_t c1) {
  for (int m = 0; m < Rows; ++m) std::memset(y + m * n + c0, 0, sizeof(float) * (c1 - c0));
  int64_t k0 = 0;
  for (; k0 + kChunk <= k; k0 += kChunk) {
    float xs[Rows][kChunk];
    for (int m = 0; m < Rows; ++m)
      for (int r = 0; r < kChunk; ++r) xs[m][r] = x[m * ldx + k0 + r];
    int64_t j = c0;
    for (; j + kBlock <= c1; j += kBlock) {
      float acc[Rows][kBlock];
      for (int m = 0; m < Rows; ++m)
        for (int t = 0; t < kBlock; ++t) acc[m][t] = y[m * n + j + t];
      for (int r = 0; r < kChunk; ++r) {
        const float* wr = w + (k0 + r) * n + j;
        for (int m = 0; m < Rows; ++m)
          for (int t = 0; t < kBlock; ++t) acc[m][t] += xs[m][r] * wr[t];
      }
      for (int m = 0; m < Rows; ++m)
        for (int t = 0; t < kBlock; ++t) y[m * n + j + t] = acc[m][t];
    }
    for (; j < c1; ++j)
      for (int m = 0; m < Rows; ++m) {
        float sum = y[m * n + j];
        for (int r = 0; r < kChunk; ++r) sum += xs[m][r] * w[(k0 + r) * n + j];
        y[m * n + j] = sum;
      }
  }
  for (; k0 < k; ++k0)
    for (int m = 0; m < Rows; ++m)
      for (int64_t j = c0; j < c1; ++j) y[m * n + j] += x[m * ldx + k0] * w[k0 * n + j];
}

#endif

using GroupFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                        int64_t);
constexpr GroupFn kGroups[kMaxGroup + 1] = {nullptr,  Group<1>, Group<2>, Group<3>,
                                            Group<4>, Group<5>, Group<6>};

// y = x[:, k0:k1] @ w[k0:k1, :] for all rows of x, whose row stride is ldx.
void Product(const float* x, const float* w, float* y, int64_t rows, int64_t ldx, int64_t n,
             int64_t k0, int64_t k1) {
  for (int64_t r = 0; r < rows; r += kMaxGroup) {
    int64_t group = std::min<int64_t>(kMaxGroup, rows - r);
    kGroups[group](x + r * ldx + k0, w + k0 * n, y + r * n, k1 - k0, ldx, n, 0, n);
  }
}

ffi::Error RowMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("row_matmul expects x (rows, k) and w (k, n)");
  int64_t rows = xd[0], k = wd[0], n = wd[1];
  const float* xs = x.typed_data();
  const float* ws = w.typed_data();
  specjax::SplitContraction::Run(pool, k, k * n * 4, rows * n, y->typed_data(),
                                 [=](int64_t k0, int64_t k1, float* out) {
                                   Product(xs, ws, out, rows, k, n, k0, k1);
                                 });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxRowMatmul, RowMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
