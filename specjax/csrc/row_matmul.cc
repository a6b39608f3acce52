// A float32 product y = x @ w for a few rows of x, as an XLA FFI handler for the CPU backend.
//
// Decoding multiplies 1 to K + 1 rows by each weight matrix. XLA's CPU dot ran such
// products at 10 to 30 GFLOP/s, so a verify forward of 5 rows cost nearly twice a
// 1-row forward although both read the same weights. This kernel reads each weight
// row once per group of up to 6 input rows, keeps the running sums of a block of
// columns in vector registers, and splits the contraction over XLA's threads.
//
// Every output element is summed in the same order whatever the number of rows, so
// row i of a many-row product equals the 1-row product of row i bit for bit: a verify
// forward computes the products that plain decoding would.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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
constexpr int64_t kMinSplit = 1 << 16;  // weight elements worth a second thread

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

using GroupFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                        int64_t);
constexpr GroupFn kGroups[kMaxGroup + 1] = {nullptr,  Group<1>, Group<2>, Group<3>,
                                            Group<4>, Group<5>, Group<6>};

// y = x[:, k0:k1] @ w[k0:k1, c0:c1] for all rows of x, whose row stride is ldx.
void Product(const float* x, const float* w, float* y, int64_t rows, int64_t ldx, int64_t n,
             int64_t k0, int64_t k1, int64_t c0, int64_t c1) {
  for (int64_t r = 0; r < rows; r += kMaxGroup) {
    int64_t group = std::min<int64_t>(kMaxGroup, rows - r);
    kGroups[group](x + r * ldx + k0, w + k0 * n, y + r * n, k1 - k0, ldx, n, c0, c1);
  }
}

// The parts of one product, taken by whichever threads come first. Part p sums the
// weight rows from p * depth to (p + 1) * depth, or to k for the last part, into y for
// p = 0 and into a buffer after.
// Splitting the contraction, rather than the columns, gives each thread a contiguous
// stretch of the weights, which made 1- and 5-row products faster.
struct Parts {
  const float* x;
  const float* w;
  float* y;
  int64_t rows, k, n, count, depth;
  std::unique_ptr<float[]> partial;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    for (int64_t p; (p = next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      float* out = p == 0 ? y : partial.get() + (p - 1) * rows * n;
      int64_t k1 = p == count - 1 ? k : (p + 1) * depth;  // the last part takes the rest
      Product(x, w, out, rows, k, n, p * depth, k1, 0, n);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error RowMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("row_matmul expects x (rows, k) and w (k, n)");
  int64_t rows = xd[0], k = wd[0], n = wd[1];
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t count = k * n >= kMinSplit ? std::min<int64_t>(threads, k / kChunk) : 1;
  if (count <= 1) {
    Product(x.typed_data(), w.typed_data(), y->typed_data(), rows, k, n, 0, k, 0, n);
    return ffi::Error::Success();
  }
  auto parts = std::make_shared<Parts>();
  parts->x = x.typed_data();
  parts->w = w.typed_data();
  parts->y = y->typed_data();
  parts->rows = rows, parts->k = k, parts->n = n, parts->count = count;
  parts->depth = (k / kChunk + count - 1) / count * kChunk;
  parts->partial.reset(new float[(count - 1) * rows * n]);
  // The caller takes parts too, and waits only for parts that another thread has
  // started: a helper that XLA runs late, after every part is taken, finds none left
  // and returns. So no wait depends on a task that is still queued.
  for (int64_t i = 1; i < count; ++i) pool.Schedule([parts] { parts->Work(); });
  parts->Work();
  while (parts->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
  // The parts add up in an order set by the shapes alone, the same for any row count.
  float* out = y->typed_data();
  for (int64_t p = 1; p < count; ++p) {
    const float* part = parts->partial.get() + (p - 1) * rows * n;
    for (int64_t i = 0; i < rows * n; ++i) out[i] += part[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecjaxRowMatmul, RowMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
