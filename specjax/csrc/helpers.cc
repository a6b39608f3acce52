// The helper threads that compute parts of a kernel call alongside its caller, and the
// split of a product's contraction over them. The only source that includes the thread
// headers, which took about 0.2 s of every other source's compile time.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#include "rows.h"

namespace specjax {
namespace {

// Threads that compute parts of a kernel call (a product's contraction, attention's rows
// and heads) alongside its caller. XLA's own pool wakes a sleeping worker for each task:
// on a 2-core VM, a 5-token forward of the shipped target took 1.8 ms with it and 1.45 ms
// with these helpers, about 11 us per product. The helpers wait for the next call by
// spinning for up to kSpinMicros, which covers the gaps between the calls of a forward,
// and then sleep until one arrives.
class Helpers {
 public:
  struct Job {
    PartFunction run = nullptr;
    void* context = nullptr;
    int64_t count = 0;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };

  // The process's helpers, `count` of them, started on first use and never stopped.
  static Helpers& Get(int64_t count) {
    static Helpers* helpers = new Helpers(count);
    return *helpers;
  }

  // Runs parts 0 .. job.count - 1 of `job`, taking parts in the calling thread too,
  // and returns once every part has finished and no helper still reads `job`. A job of
  // one part, or one that arrives while another runs, is computed by its caller alone.
  void Run(Job& job) {
    std::unique_lock<std::mutex> busy;
    if (job.count > 1) busy = std::unique_lock<std::mutex>(busy_, std::try_to_lock);
    if (!busy.owns_lock()) {
      Work(job);
      return;
    }
    job_.store(&job);
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_);
      wake_.notify_all();
    }
    Work(job);
    for (int spins = 1; job.done.load(std::memory_order_acquire) < job.count; ++spins) Pause(spins);
    // A helper that saw this job either entered before the caller looks at `inside_`,
    // and is waited for, or checks the generation after this bump and leaves the job.
    job_.store(nullptr);
    generation_.fetch_add(1);
    for (int spins = 1; inside_.load() > 0; ++spins) Pause(spins);
  }

 private:
  static constexpr int64_t kSpinMicros = 200;

  explicit Helpers(int64_t count) {
    for (int64_t i = 0; i < count; ++i) std::thread([this] { Serve(); }).detach();
  }

  // Waits briefly in a spin loop. Every 64th call yields the core, so that the thread
  // this one waits for gets to run when the machine has more runnable threads than cores.
  static void Pause(int spins) {
    if (spins % 64 == 0) {
      std::this_thread::yield();
      return;
    }
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }

  static void Work(Job& job) {
    for (int64_t p; (p = job.next.fetch_add(1, std::memory_order_relaxed)) < job.count;) {
      job.run(job.context, p);
      job.done.fetch_add(1, std::memory_order_release);
    }
  }

  void Serve() {
    uint64_t seen = generation_.load();
    for (;;) {
      auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      for (int spins = 1; generation_.load(std::memory_order_relaxed) == seen; ++spins) {
        Pause(spins);
        if (spins % 64 == 0 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(sleep_);
          sleepers_.fetch_add(1);
          wake_.wait(lock, [&] { return generation_.load() != seen; });
          sleepers_.fetch_sub(1);
        }
      }
      seen = generation_.load();
      inside_.fetch_add(1);
      Job* job = job_.load();
      if (job != nullptr && generation_.load() == seen) Work(*job);
      inside_.fetch_sub(1);
    }
  }

  std::mutex busy_;  // held by the caller whose job the helpers serve
  std::atomic<Job*> job_{nullptr};
  std::atomic<uint64_t> generation_{0};  // bumped when a job starts and when it ends
  std::atomic<int64_t> inside_{0};  // helpers that may be reading the current job
  std::mutex sleep_;
  std::condition_variable wake_;
  std::atomic<int64_t> sleepers_{0};
};

}  // namespace

void RunParts(int64_t threads, int64_t count, PartFunction part, void* context) {
  Helpers::Job job;
  job.run = part;
  job.context = context;
  job.count = count;
  Helpers::Get(threads - 1).Run(job);
}

void SplitContraction(int64_t threads, int64_t k, int64_t bytes, int64_t size, float* y,
                      ContractionPart part, void* context) {
  int64_t count = bytes >= kMinSplitBytes ? std::min<int64_t>(threads, k / kChunk) : 1;
  if (count <= 1) {
    part(context, 0, k, y);
    return;
  }
  int64_t depth = (k / kChunk + count - 1) / count * kChunk;
  std::unique_ptr<float[]> partial(new float[(count - 1) * size]);
  auto run = [&](int64_t p) {
    // Parts are whole chunks, and the last one takes the rest. With more threads than
    // chunks per thread, the last parts can start at k and stay empty.
    int64_t k0 = std::min(k, p * depth);
    int64_t k1 = p == count - 1 ? k : std::min(k, (p + 1) * depth);
    part(context, k0, k1, p == 0 ? y : partial.get() + (p - 1) * size);
  };
  RunParts(threads, count, run);
  for (int64_t p = 1; p < count; ++p) {
    const float* from = partial.get() + (p - 1) * size;
    for (int64_t i = 0; i < size; ++i) y[i] += from[i];
  }
}

}  // namespace specjax
