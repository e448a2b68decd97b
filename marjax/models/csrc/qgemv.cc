// Decode-sized matrix products against weight-only quantised matrices, as XLA FFI handlers for
// the CPU (marjax/models/cpu_kernels.py builds and registers them):
//
//   y (m, out) float32 = x (m, in) float32 . W^T,  W (out, in) output-major, as QWeight stores it
//
//   marjax_q8_matmul    W int8, one float16 scale per `group` consecutive weights along `in`
//                       (scale (out, in / group, 1)); y = sum_g scale[o, g] * sum_k q[o, k] x[k]
//   marjax_bf16_matmul  W bfloat16
//
// Why: in a one-token decode step every weight is read once; XLA:CPU's fused dequantising
// matrix-vector loop runs single-threaded at about 6 GB/s of int8 (measured), these run at
// memory speed. AVX-512 (F, BW) and F16C; activations stay float32, so the result equals the
// float32 product with the dequantised matrix up to summation order. Output rows are split over
// XLA's intra-op thread pool.
#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRowTile = 4;   // activation rows per pass over the weights (registers: R*M*2 <= 32)
constexpr int kPrefetch = 4096;

// 16 weights from `w` (masked) as float32
static inline __m512 load_w(const int8_t* w, __mmask16 msk) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(msk, w)));
}
static inline __m512 load_w(const uint16_t* w, __mmask16 msk) {   // bfloat16: the high half of a float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(msk, w)), 16));
}

// R output rows [o, o + R) against M activation rows: R*M independent accumulator chains, each
// weight converted once, each activation load shared by the R rows. `group` = in for bf16 (and
// scale == nullptr: no scaling).
template <typename W, int R, int M>
static inline void tile(const W* w, const uint16_t* sc, const float* x, float* y, int64_t in, int64_t out,
                        int64_t group, int64_t o) {
  const int64_t ng = in / group;
  __m512 acc[R][M], gs[R][M];
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    for (int i = 0; i < R; ++i)
      for (int r = 0; r < M; ++r) gs[i][r] = _mm512_setzero_ps();
    const int64_t base = g * group;
    for (int64_t k = 0; k < group; k += 16) {
      const int64_t left = group - k;
      const __mmask16 msk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
      __m512 xv[M];
      for (int r = 0; r < M; ++r) xv[r] = _mm512_maskz_loadu_ps(msk, x + r * in + base + k);
      for (int i = 0; i < R; ++i) {
        const W* wk = w + (o + i) * in + base + k;
        // the hardware prefetcher does not run far enough ahead of R interleaved row streams:
        // fetch each row's line kPrefetch bytes ahead (2-core VM: 8.5 -> 14 GB/s streaming int8)
        if (((k * sizeof(W)) & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(wk) + kPrefetch, _MM_HINT_T0);
        const __m512 wv = load_w(wk, msk);
        for (int r = 0; r < M; ++r) gs[i][r] = _mm512_fmadd_ps(wv, xv[r], gs[i][r]);
      }
    }
    for (int i = 0; i < R; ++i) {
      if (sc == nullptr) {
        for (int r = 0; r < M; ++r) acc[i][r] = _mm512_add_ps(gs[i][r], acc[i][r]);
      } else {
        const __m512 s = _mm512_set1_ps(_cvtsh_ss(sc[(o + i) * ng + g]));
        for (int r = 0; r < M; ++r) acc[i][r] = _mm512_fmadd_ps(s, gs[i][r], acc[i][r]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r) y[r * out + o + i] = _mm512_reduce_add_ps(acc[i][r]);
}

template <typename W, int M>
static void rows_m(const W* w, const uint16_t* sc, const float* x, float* y, int64_t in, int64_t out,
                   int64_t group, int64_t o0, int64_t o1) {
  constexpr int R = M <= 2 ? 4 : 2;
  int64_t o = o0;
  for (; o + R <= o1; o += R) tile<W, R, M>(w, sc, x, y, in, out, group, o);
  for (; o < o1; ++o) tile<W, 1, M>(w, sc, x, y, in, out, group, o);
}

// output rows [o0, o1) for all m activation rows, kRowTile at a time
template <typename W>
static void rows(const W* w, const uint16_t* sc, const float* x, float* y, int64_t m, int64_t in, int64_t out,
                 int64_t group, int64_t o0, int64_t o1) {
  for (int64_t r0 = 0; r0 < m; r0 += kRowTile) {
    const float* xr = x + r0 * in;
    float* yr = y + r0 * out;
    switch (m - r0 >= kRowTile ? kRowTile : m - r0) {
      case 1: rows_m<W, 1>(w, sc, xr, yr, in, out, group, o0, o1); break;
      case 2: rows_m<W, 2>(w, sc, xr, yr, in, out, group, o0, o1); break;
      case 3: rows_m<W, 3>(w, sc, xr, yr, in, out, group, o0, o1); break;
      default: rows_m<W, 4>(w, sc, xr, yr, in, out, group, o0, o1); break;
    }
  }
}

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// fn(o0, o1) over [0, out) in chunks claimed from a shared counter by this thread and up to
// num_threads pool tasks. The caller waits only for chunks already claimed, so a pool that never
// runs the tasks (or runs them late) cannot deadlock it; the state is shared, so a late task
// finds no chunk left and returns.
template <typename Fn>
static void parallel_rows(ffi::ThreadPool& pool, int64_t out, Fn fn) {
  const int64_t threads = pool.num_threads() + 1;
  int64_t chunk = (out + 4 * threads - 1) / (4 * threads);   // ~4 chunks per thread: balance
  chunk = chunk < 16 ? 16 : (chunk + 3) / 4 * 4;
  const int64_t nchunks = (out + chunk - 1) / chunk;
  auto state = std::make_shared<Progress>();
  auto run = [state, nchunks, chunk, out, fn]() {
    for (;;) {
      const int64_t c = state->next.fetch_add(1, std::memory_order_relaxed);
      if (c >= nchunks) return;
      const int64_t o0 = c * chunk, o1 = o0 + chunk < out ? o0 + chunk : out;
      fn(o0, o1);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = threads - 1 < nchunks - 1 ? threads - 1 : nchunks - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([run]() { run(); });
  run();
  while (state->done.load(std::memory_order_acquire) < nchunks) _mm_pause();
}

static ffi::Error check(ffi::AnyBuffer::Dimensions xd, ffi::AnyBuffer::Dimensions wd, ffi::AnyBuffer::Dimensions yd) {
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[1] || yd[0] != xd[0] || yd[1] != wd[0])
    return ffi::Error::InvalidArgument("marjax qgemv: expected x (m, in), w (out, in), y (m, out)");
  return ffi::Error::Success();
}

ffi::Error Q8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                    ffi::Buffer<ffi::F16> scale, ffi::ResultBuffer<ffi::F32> y) {
  if (ffi::Error e = check(x.dimensions(), w.dimensions(), y->dimensions()); e.failure()) return e;
  const int64_t m = x.dimensions()[0], in = w.dimensions()[1], out = w.dimensions()[0];
  const int64_t ng = out > 0 ? static_cast<int64_t>(scale.element_count()) / out : 1;
  if (ng < 1 || in % ng != 0 || ng * out != static_cast<int64_t>(scale.element_count()))
    return ffi::Error::InvalidArgument("marjax_q8_matmul: scale must be (out, in / group, 1)");
  const int8_t* wp = w.typed_data();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.typed_data());
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  const int64_t group = in / ng;
  parallel_rows(pool, out, [=](int64_t o0, int64_t o1) { rows(wp, sp, xp, yp, m, in, out, group, o0, o1); });
  return ffi::Error::Success();
}

ffi::Error Bf16Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  if (ffi::Error e = check(x.dimensions(), w.dimensions(), y->dimensions()); e.failure()) return e;
  const int64_t m = x.dimensions()[0], in = w.dimensions()[1], out = w.dimensions()[0];
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  parallel_rows(pool, out, [=](int64_t o0, int64_t o1) { rows(wp, nullptr, xp, yp, m, in, out, in, o0, o1); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarjaxQ8Matmul, Q8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarjaxBf16Matmul, Bf16Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
