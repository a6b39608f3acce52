// Shared by the kernels: register blocking constants, and the functions that split a
// call's work over threads (defined in helpers.cc, the only source with the thread headers).

#ifndef SPECJAX_CSRC_ROWS_H_
#define SPECJAX_CSRC_ROWS_H_

#include <cstdint>

namespace specjax {

// Output columns whose sums stay in registers, and input rows that share one read of
// the weights: their product is kept below the 32 (AVX-512) or 16 (AVX2) vector
// registers, with room for the weights and the broadcast input.
#if defined(__AVX512F__)
constexpr int64_t kBlock = 64;
#else
constexpr int64_t kBlock = 16;
#endif
constexpr int kMaxGroup = 6;
constexpr int kChunk = 16;  // weight rows read per pass over a column block
// Weight bytes worth a second thread. With the spinning helpers of helpers.cc, splitting from
// 16 KiB made a 1-token draft forward (matrices of 128 x 384) 0.16 to 0.12 ms.
constexpr int64_t kMinSplitBytes = 1 << 14;

// Runs part(context, p) for p = 0 .. count - 1 on the caller's thread and up to
// threads - 1 helper threads (helpers.cc), and returns once every part has finished.
using PartFunction = void (*)(void* context, int64_t part);
void RunParts(int64_t threads, int64_t count, PartFunction part, void* context);

// RunParts for a callable part(p), such as a lambda.
template <typename Part>
void RunParts(int64_t threads, int64_t count, const Part& part) {
  RunParts(threads, count, [](void* context, int64_t p) { (*static_cast<const Part*>(context))(p); },
           const_cast<void*>(static_cast<const void*>(&part)));
}

// Computes part(context, k0, k1, out), the product over weight rows [k0, k1) written to
// `out` (`size` floats), for contiguous parts of the contraction on the caller's thread
// and the helpers, and adds the parts into y (helpers.cc). `k` is the contraction's
// length, `bytes` the size of the weights it reads and `threads` the most threads it may
// use. Splitting the contraction, rather than the columns, gives each thread a contiguous
// stretch of the weights, which made 1- and 5-row products faster. The parts and the
// order of their sum depend on the shapes and the number of threads alone, so every row
// is summed the same way whatever the number of rows, and whichever thread computes a part.
using ContractionPart = void (*)(void* context, int64_t k0, int64_t k1, float* out);
void SplitContraction(int64_t threads, int64_t k, int64_t bytes, int64_t size, float* y,
                      ContractionPart part, void* context);

// SplitContraction for a callable part(k0, k1, out), such as a lambda.
template <typename Part>
void SplitContraction(int64_t threads, int64_t k, int64_t bytes, int64_t size, float* y,
                      const Part& part) {
  SplitContraction(threads, k, bytes, size, y,
                   [](void* context, int64_t k0, int64_t k1, float* out) {
                     (*static_cast<const Part*>(context))(k0, k1, out);
                   },
                   const_cast<void*>(static_cast<const void*>(&part)));
}

}  // namespace specjax

#endif  // SPECJAX_CSRC_ROWS_H_
