// Greedy choices over rows of logits, for the CPU backend: the first index of each row's
// largest logit, and the softmax probability of that logit.
//
// XLA's CPU backend reduces a row in a chain of windowed reductions (4096 to 128 to 4 to
// 1) that it does not vectorize, and the index and the probability each take another
// pass. On a 2-core Intel Xeon, the greedy choice over a verify forward's 7 rows of 4096
// logits took about 40 µs in those operations, and a draft's choice and its probability
// about 10 operations per drafted token.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels.h"
#include "rows.h"
#include "vector16.h"

namespace {

using namespace specjax::v16;

// Writes the first index of the largest of `count` logits and its softmax probability.
// A row with a NaN gets index count - 1 and probability NaN, as `jnp.max` and the
// comparisons of specjax.sampling.greedy_tokens give.
void Row(const float* logits, int64_t count, int32_t* token, float* top) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  float largest = -std::numeric_limits<float>::infinity();
  bool has_nan = false;

  int64_t i = 0;
  if (count >= kLanes) {
    Vec maxima = Load(logits);
    IntVec nans = IntVec{} + 0;
    for (; i + kLanes <= count; i += kLanes) {
      Vec v = Load(logits + i);
      nans |= v != v;
      maxima = v > maxima ? v : maxima;
    }
    for (int lane = 0; lane < kLanes; ++lane) {
      largest = std::fmax(largest, maxima[lane]);
      has_nan |= nans[lane] != 0;
    }
  }
  for (; i < count; ++i) {
    has_nan |= std::isnan(logits[i]);
    largest = std::fmax(largest, logits[i]);
  }

  if (has_nan || count == 0) {
    *token = static_cast<int32_t>(count - 1);
    *top = nan;
    return;
  }
  int64_t first = 0;
  while (logits[first] != largest) ++first;
  *token = static_cast<int32_t>(first);

  // Every term exp(logit - largest) is at most 1, and the largest logit's term is 1.
  Vec sums = Vec{} + 0.0f;
  for (i = 0; i + kLanes <= count; i += kLanes) sums += Exp(Load(logits + i) - largest);
  float sum = Sum(sums);
  for (; i < count; ++i) sum += std::exp(logits[i] - largest);
  *top = 1.0f / sum;
}

}  // namespace

std::string specjax::Greedy(int64_t threads, Floats logits, Words tokens, Floats top) {
  auto ld = logits.dimensions();
  if (ld.size() != 2 || tokens.dimensions().size() != 1 || top.dimensions().size() != 1 ||
      tokens.dimensions()[0] != ld[0] || top.dimensions()[0] != ld[0])
    return "greedy expects logits (rows, V), tokens (rows,) and top (rows,)";
  int64_t rows = ld[0], count = ld[1];
  const float* from = logits.typed_data();
  int32_t* to = tokens.typed_data();
  float* probability = top.typed_data();
  // Rows are independent, so splitting them over threads leaves every result the same.
  constexpr int64_t kRowsPerPart = 8;
  auto part = [&](int64_t index) {
    for (int64_t r = index * kRowsPerPart; r < std::min(rows, (index + 1) * kRowsPerPart); ++r)
      Row(from + r * count, count, to + r, probability + r);
  };
  RunParts(threads, (rows + kRowsPerPart - 1) / kRowsPerPart, part);
  return "";
}
