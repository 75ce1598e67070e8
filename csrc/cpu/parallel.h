// A small fixed pool of worker threads for the CPU backend: parallel_for over independent
// (sequence, KV head) tasks. Results do not depend on the number of threads.
#pragma once

#include <functional>

namespace trimkv::cpu {

/// Threads the pool uses: TRIMKV_CPU_THREADS when set (>= 1), else the hardware's count.
int thread_count();

/// Runs fn(i) for i in [0, n) across the pool and the calling thread; returns when all are
/// done. The first exception a task throws is rethrown here (the other tasks still finish).
void parallel_for(int n, const std::function<void(int)>& fn);

}  // namespace trimkv::cpu
