// A float32 product y = x @ w for a few rows of x, for the CPU backend.
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
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "rows.h"
#include "simd.h"

namespace {

using specjax::Columns;
using specjax::kChunk;
using specjax::kLanes;
using specjax::kMaxGroup;

// y[:, c0:c1] = x @ w[:, c0:c1] for `Rows` rows; x is (Rows, k) with row stride ldx,
// w is (k, n) and y (Rows, n), both row-major.
template <int Rows>
void Group(const float* __restrict x, const float* __restrict w, float* __restrict y,
           int64_t k, int64_t ldx, int64_t n, int64_t c0, int64_t c1) {
  constexpr int V = Rows <= 2 ? specjax::kWide : specjax::kNarrow;
  for (int m = 0; m < Rows; ++m) std::memset(y + m * n + c0, 0, sizeof(float) * (c1 - c0));
  float xs[Rows * kChunk];
  for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
    const int depth = static_cast<int>(std::min<int64_t>(kChunk, k - k0));
    for (int m = 0; m < Rows; ++m)
      for (int r = 0; r < depth; ++r) xs[m * kChunk + r] = x[m * ldx + k0 + r];
    const float* wk = w + k0 * n;
    int64_t j = c0;
    for (; j + V * kLanes <= c1; j += V * kLanes) Columns<Rows, V>(xs, depth, wk + j, n, y, n, j);
    for (; j + kLanes <= c1; j += kLanes) Columns<Rows, 1>(xs, depth, wk + j, n, y, n, j);
    for (; j < c1; ++j)
      for (int m = 0; m < Rows; ++m) {
        float sum = y[m * n + j];
        for (int r = 0; r < depth; ++r) sum = specjax::FmaScalar(xs[m * kChunk + r], wk[r * n + j], sum);
        y[m * n + j] = sum;
      }
  }
}

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

}  // namespace

std::string specjax::RowMatmul(int64_t threads, Floats x, Floats w, Floats y) {
  return RunFloatProduct("row_matmul", threads, x, w, y, Product);
}
