// The SSD recurrence over a whole sequence (prefill / scoring), token by token, one (batch, head)
// pair's (p, n) state at a time in a thread-local buffer that stays in L1/L2:
//     h_t = exp(log_a_t) h_{t-1} + x_t B_t^T,    y_t = h_t C_t
// XLA:CPU runs the same loop as a lax.scan at about 5 GFLOP/s (its state round-trips through memory
// every token) and the chunked matmul form is bound by small batched products; here each state row
// is updated and read out in registers, 8 lanes at a time, the pairs split over the cores.
#include <cmath>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using marjax::hsum8;
using marjax::parallel_rows;

namespace {

// rows [i0, i0 + R) of the state: s = d s + x_i B, y_i = s . C, 8 lanes at a time; R rows at once
// so that R independent FMA chains hide the FMA latency and each B, C load serves R rows
template <int R>
inline void rows8(float* S, const float* xt, const float* Bt, const float* Ct, float* yt, __m256 dv, int64_t i0,
                  int64_t n) {
  __m256 xi[R], acc[R];
  for (int r = 0; r < R; ++r) xi[r] = _mm256_set1_ps(xt[i0 + r]), acc[r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 bv = _mm256_loadu_ps(Bt + j), cv = _mm256_loadu_ps(Ct + j);
    for (int r = 0; r < R; ++r) {
      float* s = S + (i0 + r) * n + j;
      const __m256 v = _mm256_fmadd_ps(xi[r], bv, _mm256_mul_ps(dv, _mm256_loadu_ps(s)));
      _mm256_storeu_ps(s, v);
      acc[r] = _mm256_fmadd_ps(v, cv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) yt[i0 + r] = hsum8(acc[r]);
}

// one pair: x (l, p), B and C (l, n) rows strided by h rows per token (the (b, l, h, .) layout in
// place), log_a strided by h; S the (p, n) state in and out
void scan_pair(const float* x, const float* la, const float* B, const float* C, float* y, float* S, int64_t l,
               int64_t h, int64_t p, int64_t n) {
  const bool wide = n % 8 == 0;
  for (int64_t t = 0; t < l; ++t) {
    const float d = std::exp(la[t * h]);
    const float *xt = x + t * h * p, *Bt = B + t * h * n, *Ct = C + t * h * n;
    float* yt = y + t * h * p;
    int64_t i = 0;
    if (wide) {
      const __m256 dv = _mm256_set1_ps(d);
      for (; i + 4 <= p; i += 4) rows8<4>(S, xt, Bt, Ct, yt, dv, i, n);
      for (; i < p; ++i) rows8<1>(S, xt, Bt, Ct, yt, dv, i, n);
    }
    for (; i < p; ++i) {   // a state width that is no multiple of 8
      float* s = S + i * n;
      float acc = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        s[j] = std::fma(xt[i], Bt[j], d * s[j]);
        acc += s[j] * Ct[j];
      }
      yt[i] = acc;
    }
  }
}

}  // namespace

// x (b, l, h, p), log_a (b, l, h), B and C (b, l, h, n), h0 (b, h, p, n), all float32 ->
// y (b, l, h, p), the final state (b, h, p, n)
ffi::Error SsdScan(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> log_a,
                   ffi::Buffer<ffi::F32> B, ffi::Buffer<ffi::F32> C, ffi::Buffer<ffi::F32> h0,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> final_state) {
  auto xd = x.dimensions(), ad = log_a.dimensions(), bd = B.dimensions(), cd = C.dimensions(),
       hd = h0.dimensions();
  if (xd.size() != 4 || ad.size() != 3 || bd.size() != 4 || cd.size() != 4 || hd.size() != 4 ||
      ad[0] != xd[0] || ad[1] != xd[1] || ad[2] != xd[2] || bd[0] != xd[0] || bd[1] != xd[1] || bd[2] != xd[2] ||
      !std::equal(bd.begin(), bd.end(), cd.begin()) || hd[0] != xd[0] || hd[1] != xd[2] || hd[2] != xd[3] ||
      hd[3] != bd[3])
    return ffi::Error::InvalidArgument(
        "marjax_ssd_scan: expected x (b, l, h, p), log_a (b, l, h), B and C (b, l, h, n), h0 (b, h, p, n)");
  const int64_t b = xd[0], l = xd[1], h = xd[2], p = xd[3], n = bd[3];
  const float *xp = x.typed_data(), *ap = log_a.typed_data(), *Bp = B.typed_data(), *Cp = C.typed_data(),
              *hp = h0.typed_data();
  float *yp = y->typed_data(), *fp = final_state->typed_data();
  // one pair's whole sequence is l p n FMAs: split pairs over the cores unless there is little work
  const bool serial = b * h * l * p * n < (int64_t{1} << 16);
  parallel_rows(pool, b * h, serial, [=](int64_t u0, int64_t u1) {
    std::vector<float> S(p * n);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bi = u / h, hi = u % h;
      std::memcpy(S.data(), hp + u * p * n, sizeof(float) * p * n);
      const int64_t tok = bi * l * h + hi;   // token 0 of this pair, in units of (b, l, h) rows
      scan_pair(xp + tok * p, ap + tok, Bp + tok * n, Cp + tok * n, yp + tok * p, S.data(), l, h, p, n);
      std::memcpy(fp + u * p * n, S.data(), sizeof(float) * p * n);
    }
  }, 1, 1);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarjaxSsdScan, SsdScan,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
