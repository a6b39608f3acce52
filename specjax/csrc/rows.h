// Shared by the row kernels: register blocking constants and the threaded split of a
// product's contraction.

#ifndef SPECJAX_CSRC_ROWS_H_
#define SPECJAX_CSRC_ROWS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

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
constexpr int64_t kMinSplitBytes = 1 << 18;  // weight bytes worth a second thread

// Computes part(k0, k1, out), the product over weight rows [k0, k1) written to `out`
// (`size` floats), for contiguous parts of the contraction on XLA's threads, and
// adds the parts into y. Splitting the contraction, rather than the columns, gives
// each thread a contiguous stretch of the weights, which made 1- and 5-row products
// faster. The parts and the order of their sum depend on the shapes and the thread
// count alone, so every row is summed the same way whatever the number of rows.
class SplitContraction {
 public:
  using Part = std::function<void(int64_t k0, int64_t k1, float* out)>;

  // `k` is the contraction's length and `bytes` the size of the weights it reads.
  static void Run(xla::ffi::ThreadPool& pool, int64_t k, int64_t bytes, int64_t size, float* y,
                  Part part) {
    int64_t threads = std::max<int64_t>(1, pool.num_threads());
    int64_t count = bytes >= kMinSplitBytes ? std::min<int64_t>(threads, k / kChunk) : 1;
    if (count <= 1) {
      part(0, k, y);
      return;
    }
    auto state = std::make_shared<SplitContraction>();
    state->part_ = std::move(part);
    state->y_ = y;
    state->k_ = k, state->size_ = size, state->count_ = count;
    state->depth_ = (k / kChunk + count - 1) / count * kChunk;
    state->partial_.reset(new float[(count - 1) * size]);
    // The caller takes parts too, and waits only for parts that another thread has
    // started: a helper that XLA runs late, after every part is taken, finds none left
    // and returns. So no wait depends on a task that is still queued.
    for (int64_t i = 1; i < count; ++i) pool.Schedule([state] { state->Work(); });
    state->Work();
    while (state->done_.load(std::memory_order_acquire) < count) std::this_thread::yield();
    for (int64_t p = 1; p < count; ++p) {
      const float* partial = state->partial_.get() + (p - 1) * size;
      for (int64_t i = 0; i < size; ++i) y[i] += partial[i];
    }
  }

 private:
  void Work() {
    for (int64_t p; (p = next_.fetch_add(1, std::memory_order_relaxed)) < count_;) {
      float* out = p == 0 ? y_ : partial_.get() + (p - 1) * size_;
      // Parts are whole chunks, and the last one takes the rest. With more threads
      // than chunks per thread, the last parts can start at k and stay empty.
      int64_t k0 = std::min(k_, p * depth_);
      int64_t k1 = p == count_ - 1 ? k_ : std::min(k_, (p + 1) * depth_);
      part_(k0, k1, out);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  Part part_;
  float* y_ = nullptr;
  int64_t k_ = 0, size_ = 0, count_ = 0, depth_ = 0;
  std::unique_ptr<float[]> partial_;
  std::atomic<int64_t> next_{0};
  std::atomic<int64_t> done_{0};
};

}  // namespace specjax

#endif  // SPECJAX_CSRC_ROWS_H_
