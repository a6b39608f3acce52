// A float32 product y = x @ w for a weight stored in panels, for the CPU backend.
//
// The packed layout stores each block of 16 weight rows by 64 columns contiguously.
// Element (16 c + r, 64 b + t) of a (k, n) weight sits at index
// ((c * n / 64 + b) * 16 + r) * 64 + t. The kernel therefore reads the weights as one
// sequential stream, where in row-major order it reads 16 rows side by side. On 2 cores of an AMD EPYC, the products of the
// shipped target's forward took 1.9 times as long for 5 rows as for 1 row in row-major
// order, as if the loads waited for the arithmetic, and 1.5 times packed. Packed 1-row
// products were about 20 % faster too.
//
// Rows come in groups of up to 6 that share each panel while it is in the L1 cache, so
// a product of many rows still reads the weights from memory once. Every output element
// takes its terms in the order of the row-major kernel, so both give the same bits.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "kernels.h"
#include "rows.h"
#include "simd.h"

namespace {

using specjax::kChunk;
using specjax::kLanes;
using specjax::kMaxGroup;

constexpr int64_t kPanel = 64;  // columns per panel
constexpr int kPanelVectors = static_cast<int>(kPanel / kLanes);

// Adds the products of one chunk (16 weight rows) over panels [b0, b1) into y for
// `Rows` rows, whose 16 inputs each lie at xs + m * kChunk.
template <int Rows>
void Panels(const float* xs, const float* chunk, float* y, int64_t n, int64_t b0, int64_t b1) {
  constexpr int kWant = Rows <= 2 ? specjax::kWide : specjax::kNarrow;
  constexpr int V = kWant < kPanelVectors ? kWant : kPanelVectors;
  for (int64_t b = b0; b < b1; ++b) {
    const float* panel = chunk + b * kChunk * kPanel;
    for (int s = 0; s < kPanelVectors; s += V)
      specjax::Columns<Rows, V, true>(xs, kChunk, panel + s * kLanes, kPanel, y, n,
                                      b * kPanel + s * kLanes);
  }
}

using PanelsFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t);
constexpr PanelsFn kPanels[kMaxGroup + 1] = {nullptr,    Panels<1>, Panels<2>, Panels<3>,
                                             Panels<4>, Panels<5>, Panels<6>};

// y = x[:, k0:k1] @ w[k0:k1, :] for all rows of x (row stride ldx); k0 and k1 are
// multiples of 16.
void Product(const float* x, const float* w, float* y, int64_t rows, int64_t ldx, int64_t n,
             int64_t k0, int64_t k1) {
  std::memset(y, 0, sizeof(float) * rows * n);
  std::unique_ptr<float[]> xs(new float[rows * kChunk]);
  const int64_t panels = n / kPanel;
  for (int64_t c0 = k0; c0 < k1; c0 += kChunk) {
    for (int64_t m = 0; m < rows; ++m)
      for (int r = 0; r < kChunk; ++r) xs[m * kChunk + r] = x[m * ldx + c0 + r];
    const float* chunk = w + c0 * n;
    if (rows <= kMaxGroup) {
      kPanels[rows](xs.get(), chunk, y, n, 0, panels);
      continue;
    }
    for (int64_t b = 0; b < panels; ++b)
      for (int64_t g = 0; g < rows; g += kMaxGroup) {
        int64_t size = std::min<int64_t>(kMaxGroup, rows - g);
        kPanels[size](xs.get() + g * kChunk, chunk, y + g * n, n, b, b + 1);
      }
  }
}

}  // namespace

std::string specjax::PackedMatmul(int64_t threads, Floats x, Floats w, Floats y) {
  return RunFloatProduct("packed_matmul", threads, x, w, y, Product, kChunk, kPanel);
}
