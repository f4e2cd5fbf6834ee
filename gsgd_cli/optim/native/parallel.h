// Threading helpers shared by the fused CPU kernels (gsgd_step.cpp, path_sgd_step.cpp): how
// many threads a tensor of n elements gets, and a loop split into contiguous ranges.
#pragma once
#include <algorithm>
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace gsgd_native {

constexpr int64_t kParallelMin = 1 << 15;   // elements; smaller layers run on one thread

inline int threads_for(int64_t numel, int nthreads) {
  return numel >= kParallelMin ? nthreads : 1;
}

// body(begin, end) over [0, n) split into nt contiguous ranges; no OpenMP region for nt == 1
// (entering one costs about a microsecond, which matters for small layers)
template <typename F>
void parallel_ranges(int nt, int64_t n, F&& body) {
  if (nt <= 1) {
    body(int64_t(0), n);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
#else
    const int64_t t = 0, k = 1;
#endif
    const int64_t chunk = (n + k - 1) / k;
    const int64_t begin = std::min(n, t * chunk), end = std::min(n, begin + chunk);
    body(begin, end);
  }
}

// One pass over a row of dw (and w): max|dw|, the finiteness of dw, and either the sum of

}  // namespace gsgd_native
