#include "cpu/parallel.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace trimkv::cpu {
namespace {

class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { loop(); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void run(int n, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> lock(mu_);
    fn_ = &fn;
    n_ = n;
    pending_ = n;
    error_ = nullptr;
    ++generation_;
    const uint64_t gen = generation_;
    next_.store(gen << 32);
    lock.unlock();
    wake_.notify_all();
    work(gen, &fn, n);  // the caller takes tasks too
    lock.lock();
    done_.wait(lock, [this] { return pending_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      const std::function<void(int)>* fn = fn_;
      const int n = n_;
      lock.unlock();
      work(seen, fn, n);
      lock.lock();
    }
  }

  // Claims the next index of generation `gen`; -1 when that generation has no more tasks.
  // The generation sits in the counter's high bits, so a late worker can never take a task of
  // a later run with the function of an earlier one.
  int claim(uint64_t gen, int n) {
    uint64_t v = next_.load();
    for (;;) {
      if ((v >> 32) != gen || static_cast<int>(v & 0xffffffffu) >= n) return -1;
      if (next_.compare_exchange_weak(v, v + 1)) return static_cast<int>(v & 0xffffffffu);
    }
  }

  void work(uint64_t gen, const std::function<void(int)>* fn, int n) {
    for (int i = claim(gen, n); i >= 0; i = claim(gen, n)) {
      try {
        (*fn)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) done_.notify_all();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* fn_ = nullptr;
  int n_ = 0;
  std::atomic<uint64_t> next_{0};  // generation << 32 | next index
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

Pool& pool() {
  // Leaked on purpose: joining threads from a static destructor at process exit can hang
  // when the process exits from a worker-less state; the OS reclaims them.
  static Pool* p = new Pool(thread_count() - 1);
  return *p;
}

}  // namespace

int thread_count() {
  static const int n = [] {
    if (const char* env = std::getenv("TRIMKV_CPU_THREADS")) {
      const int v = std::atoi(env);
      if (v >= 1) return v;
    }
    const unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : static_cast<int>(hw);
  }();
  return n;
}

void parallel_for(int n, const std::function<void(int)>& fn) {
  if (n <= 0) return;
  if (n == 1 || thread_count() == 1) {
    for (int i = 0; i < n; ++i) fn(i);
    return;
  }
  pool().run(n, fn);
}

}  // namespace trimkv::cpu
