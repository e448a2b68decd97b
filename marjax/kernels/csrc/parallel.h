// The work split shared by marjax's CPU kernels (qgemv.cc, attention.cc).
#pragma once

#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <algorithm>

#include "xla/ffi/api/ffi.h"

// The instruction set the kernels compile for, from the compiler's target (-march=native, or
// cpu_kernels.py's forced AVX2 build): AVX-512 F/BW/VNNI loops where the CPU has them, else AVX2
// + FMA + F16C loops (AMD Zen 2/3, Intel before Ice Lake, most cloud VMs without AVX-512).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define MARJAX_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MARJAX_AVX512 0
#else
#error "marjax's CPU kernels need AVX2, FMA and F16C (or AVX-512 F/BW/VNNI)"
#endif

namespace marjax {

// the sum of a vector's 8 lanes (the AVX2 build's reduction in qgemv.cc and attention.cc; ssd.cc's
// 8-wide loops in both builds)
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// fn(i0, i1) over [0, n) in chunks claimed from a shared counter by this thread and, unless
// `serial`, tasks on XLA's intra-op pool (about 4 chunks a thread, each at least `min_chunk` items
// and a multiple of `align`). The caller waits only for chunks already claimed, so a pool that
// runs the tasks late (or never) cannot deadlock it; the state is shared, so a late task finds no
// chunk left and returns without touching a finished call's memory. At most one thread a core in
// all: XLA's pool has a thread per core besides the caller, and a third thread on 2 cores got
// preempted holding a chunk (210 chained q4 products: 13.5 -> 9.0 ms, measured). (Helper threads
// that spin between calls instead, as llama.cpp's, measured no faster here, again on the AMD VM with
// the four-group q4 loop: 11.2 vs 10.7 us a 512 x 576 product, the spinning helper too late for 1 job in 4.)
template <typename Fn>
inline void parallel_rows(xla::ffi::ThreadPool& pool, int64_t n, bool serial, Fn fn, int64_t min_chunk = 16,
                          int64_t align = 4) {
  static const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t threads = serial ? 1 : std::min<int64_t>(pool.num_threads() + 1, cores);
  int64_t chunk = (n + 4 * threads - 1) / (4 * threads);
  chunk = chunk < min_chunk ? min_chunk : (chunk + align - 1) / align * align;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  auto state = std::make_shared<Progress>();
  auto run = [state, nchunks, chunk, n, fn]() {
    for (;;) {
      const int64_t c = state->next.fetch_add(1, std::memory_order_relaxed);
      if (c >= nchunks) return;
      const int64_t i0 = c * chunk, i1 = i0 + chunk < n ? i0 + chunk : n;
      fn(i0, i1);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = threads - 1 < nchunks - 1 ? threads - 1 : nchunks - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([run]() { run(); });
  run();
  while (state->done.load(std::memory_order_acquire) < nchunks) _mm_pause();
}

}  // namespace marjax
