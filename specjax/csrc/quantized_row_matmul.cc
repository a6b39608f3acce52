// y = x @ W for a few float32 rows of x and an int4 or int8 weight W in the packed
// layout of specjax.kernels.formats, for the CPU backend.
//
// XLA's lowering writes each dequantized tile as float32 and reads it back for the
// dot, so on a 2-core Intel Xeon int4 decoding ran at half the speed of float32. This
// kernel decodes each word in registers, right before the multiply-adds that use it,
// and so reads only the packed codes, the scales and the offsets from memory.
//
// W[k, c] = code[k, c] * scale[g, c] - offset[g, c] for g = k / group, where the caller
// passes offset = zero point * scale. As in row_matmul.cc, every output element is
// summed in the same order whatever the number of rows.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "rows.h"

namespace {

using specjax::kChunk;
using specjax::kMaxGroup;

// Half the float kernel's block: the decoded weights, scales and offsets of a block
// need registers too.
constexpr int64_t kQBlock = specjax::kBlock / 2;

template <int Bits>
inline float Decode(int32_t word, int code, float scale, float offset) {
  constexpr int32_t kMask = (1 << Bits) - 1;
  return static_cast<float>((word >> (code * Bits)) & kMask) * scale - offset;
}

// y[:, :] = x[:, k0:k1] @ W[k0:k1, :] for `Rows` rows of x (row stride ldx). k0 is a
// multiple of kChunk, and a group of rows shares one scale, so each pass of kChunk
// rows reads one row of scales and offsets.
template <int Rows, int Bits>
void Group(const float* __restrict x, int64_t ldx, const int32_t* __restrict packed,
           const float* __restrict scales, const float* __restrict offsets,
           float* __restrict y, int64_t k0, int64_t k1, int64_t n, int64_t group) {
  constexpr int kCodes = 32 / Bits;  // codes per int32 word
  for (int m = 0; m < Rows; ++m) std::memset(y + m * n, 0, sizeof(float) * n);
  for (int64_t kb = k0; kb < k1; kb += kChunk) {
    const int words = static_cast<int>((std::min(k1, kb + kChunk) - kb) / kCodes);
    float xs[Rows][kChunk];
    for (int m = 0; m < Rows; ++m)
      for (int r = 0; r < words * kCodes; ++r) xs[m][r] = x[m * ldx + kb + r];
    const int32_t* chunk_words = packed + (kb / kCodes) * n;
    const float* scale = scales + (kb / group) * n;
    const float* offset = offsets + (kb / group) * n;
    int64_t j = 0;
    for (; j + kQBlock <= n; j += kQBlock) {
      float acc[Rows][kQBlock];
      for (int m = 0; m < Rows; ++m)
        for (int t = 0; t < kQBlock; ++t) acc[m][t] = y[m * n + j + t];
      for (int w = 0; w < words; ++w) {
        const int32_t* word = chunk_words + w * n + j;
        for (int c = 0; c < kCodes; ++c) {
          float weight[kQBlock];
          for (int t = 0; t < kQBlock; ++t)
            weight[t] = Decode<Bits>(word[t], c, scale[j + t], offset[j + t]);
          for (int m = 0; m < Rows; ++m)
            for (int t = 0; t < kQBlock; ++t) acc[m][t] += xs[m][w * kCodes + c] * weight[t];
        }
      }
      for (int m = 0; m < Rows; ++m)
        for (int t = 0; t < kQBlock; ++t) y[m * n + j + t] = acc[m][t];
    }
    for (; j < n; ++j)
      for (int m = 0; m < Rows; ++m) {
        float sum = y[m * n + j];
        for (int w = 0; w < words; ++w)
          for (int c = 0; c < kCodes; ++c) {
            float weight = Decode<Bits>(chunk_words[w * n + j], c, scale[j], offset[j]);
            sum += xs[m][w * kCodes + c] * weight;
          }
        y[m * n + j] = sum;
      }
  }
}

template <int Bits>
void Product(const float* x, const int32_t* packed, const float* scales, const float* offsets,
             float* y, int64_t rows, int64_t k, int64_t n, int64_t group, int64_t k0, int64_t k1) {
  using GroupFn = void (*)(const float*, int64_t, const int32_t*, const float*, const float*,
                           float*, int64_t, int64_t, int64_t, int64_t);
  constexpr GroupFn kGroups[kMaxGroup + 1] = {
      nullptr, Group<1, Bits>, Group<2, Bits>, Group<3, Bits>,
      Group<4, Bits>, Group<5, Bits>, Group<6, Bits>};
  for (int64_t r = 0; r < rows; r += kMaxGroup) {
    int64_t size = std::min<int64_t>(kMaxGroup, rows - r);
    kGroups[size](x + r * k, k, packed, scales, offsets, y + r * n, k0, k1, n, group);
  }
}

}  // namespace

std::string specjax::QuantizedRowMatmul(int64_t threads, Floats x, Words packed, Floats scales,
                                        Floats offsets, int64_t bits, int64_t group, Floats y) {
  auto xd = x.dimensions(), pd = packed.dimensions(), sd = scales.dimensions();
  if (bits != 4 && bits != 8) return std::string("bits must be 4 or 8");
  if (xd.size() != 2 || pd.size() != 2 || sd.size() != 2)
    return std::string("quantized_row_matmul expects 2-D operands");
  int64_t rows = xd[0], k = xd[1], n = pd[1];
  if (group <= 0 || k % group || (group % kChunk && group != k) || pd[0] * (32 / bits) != k ||
      sd[0] != k / group || sd[1] != n || offsets.dimensions().size() != 2 ||
      offsets.dimensions()[0] != sd[0] || offsets.dimensions()[1] != n)
    return std::string("quantized_row_matmul: operand shapes do not match");
  const float* xs = x.typed_data();
  const int32_t* codes = packed.typed_data();
  const float* scale = scales.typed_data();
  const float* offset = offsets.typed_data();
  auto part = [=](int64_t k0, int64_t k1, float* out) {
    if (bits == 4)
      Product<4>(xs, codes, scale, offset, out, rows, k, n, group, k0, k1);
    else
      Product<8>(xs, codes, scale, offset, out, rows, k, n, group, k0, k1);
  };
  // Decoding, not reading, sets the pace here, so the split counts the decoded floats.
  specjax::SplitContraction(threads, k, k * n * 4, rows * n, y.typed_data(), part);
  return "";
}
