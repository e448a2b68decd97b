// One-token (decode) attention over a KV cache, as an XLA FFI handler for the CPU
// (marjax/kernels/cpu_kernels.py builds and registers it):
//
//   marjax_attn_decode   q (b, h, d), k and v (b, S, g, d) float32, n (b,) int32
//                        -> out (b, h, d) float32: softmax(q k^T / sqrt(d)) v over the first n[i]
//                        keys of row i (the causal prefix), query head j reading KV head j / (h / g)
//
// Why: XLA:CPU's batched dot wants the cache head-major, so every decode step copied each layer's
// whole K and V buffer into that layout (150 copies a SmolLM2 token, 1.2 ms of an 8.6 ms q4 step,
// profiled), and it scored every slot of the buffer, valid or not. This reads the valid prefix
// once, in place, each K/V row shared by the query heads of its group. Keys are split into chunks
// of kKeyChunk over XLA's intra-op pool; each chunk keeps a running max, sum and weighted V sum,
// merged at the end (as flash-decoding does). Head sizes of 16-128 with up to 6 (d <= 64) or 3
// (d = 128) query heads a group take `chunk_fast` (scores 16 keys at a time, V sums in registers):
// 30 SmolLM2 layers at 8k context, 79 -> 34 ms (2.4x) in one run, the generic `chunk` before it.
// The AVX2 build (parallel.h's MARJAX_AVX512 = 0) has the generic `chunk` only, 8 lanes wide.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using marjax::parallel_rows;
using marjax::hsum8;

namespace {

constexpr int64_t kKeyChunk = 256;
// K/V floats read below which one thread runs the call (a short context costs less than a hand-off)
constexpr int64_t kMinParallelFloats = int64_t{1} << 18;

// 2^f for |f| <= 1/2 by its degree-6 Taylor polynomial, Horner order: ln2^k / k!, k = 6 .. 0
constexpr float kExp2Poly[7] = {1.5403530393381606e-4f, 1.3333558146428443e-3f, 9.6181291076284770e-3f,
                                5.5504108664821580e-2f, 0.24022650695910071f,   0.69314718055994531f, 1.f};

#if MARJAX_AVX512

// e^x for x <= 0 (scores minus their max): 2^(x log2 e) split into 2^n 2^f, |f| <= 1/2, with 2^f
// by its degree-6 Taylor polynomial (relative error about 1e-7)
static inline __m512 exp_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));   // e^-104 is below float32's smallest subnormal
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(kExp2Poly[0]);
  for (int c = 1; c < 7; ++c) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[c]));
  return _mm512_scalef_ps(p, n);
}

static inline __mmask16 tail(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

// Scores sc[0, nk) -> e^(score - max) in place; part[0] = the max, part[1] = the sum of e^(.)
static inline void softmax_in_place(float* sc, int64_t nk, float* part) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t s = 0; s < nk; s += 16) mx = _mm512_mask_max_ps(mx, tail(nk - s), mx, _mm512_maskz_loadu_ps(tail(nk - s), sc + s));
  const float m = _mm512_reduce_max_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t s = 0; s < nk; s += 16) {
    const __mmask16 k = tail(nk - s);
    const __m512 p = _mm512_maskz_mov_ps(k, exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + s), _mm512_set1_ps(m))));
    _mm512_mask_storeu_ps(sc + s, k, p);
    sum = _mm512_add_ps(sum, p);
  }
  part[0] = m;
  part[1] = _mm512_reduce_add_ps(sum);
}

// q . k over d floats (masked tail), and acc[0, d) += p * v[0, d)
static inline float dot_row(const float* q, const float* k, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t e = 0; e < d; e += 16) {
    const __mmask16 m = tail(d - e);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + e), _mm512_maskz_loadu_ps(m, k + e), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
static inline void axpy_row(float p, const float* v, float* acc, int64_t d) {
  const __m512 pv = _mm512_set1_ps(p);
  for (int64_t e = 0; e < d; e += 16) {
    const __mmask16 m = tail(d - e);
    _mm512_mask_storeu_ps(acc + e, m, _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(m, v + e), _mm512_maskz_loadu_ps(m, acc + e)));
  }
}

// The sum of each of 16 vectors, as one vector (lane s = the sum of a[s]): three levels of
// interleave-and-add inside 128-bit blocks, then two across them, about 3 operations a key where
// a horizontal reduction per key costs 8 and a serial dependency.
static inline __m512 transpose_sum16(__m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)   // per block: key 2i at lanes 0, 2; key 2i + 1 at 1, 3
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per block: keys 4i .. 4i + 3, one lane each
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// q * k row elementwise, summed over the D16 16-float blocks: 16 partial sums of q . k
template <int D16>
static inline __m512 row_products(const __m512* qv, const float* ks) {
  __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(ks));
  for (int e = 1; e < D16; ++e) acc = _mm512_fmadd_ps(qv[e], _mm512_loadu_ps(ks + 16 * e), acc);
  return acc;
}

// `chunk` for R query heads of D16 * 16 dims, with everything in registers: scores 16 keys at a
// time (each K row of the block read from L1 for the R heads), and the R x D16 weighted V sums
// kept in zmm accumulators across the chunk's keys (the generic `chunk` keeps them in memory:
// a load and a store per fma). The generic version read K and V at about 5 GB/s (SmolLM2 at 8k
// context; an XLA reduction streams 20-35 GB/s on the same machine).
template <int R, int D16>
static void chunk_fast(const float* q, const float* k, const float* v, int64_t stride, int64_t s0, int64_t s1,
                       float scale, float* sc, float* part) {
  constexpr int64_t d = 16 * D16;
  const int64_t nk = s1 - s0, full = nk / 16 * 16;
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int j = 0; j < R; ++j) {
    __m512 qv[D16];
    for (int e = 0; e < D16; ++e) qv[e] = _mm512_loadu_ps(q + j * d + 16 * e);
    float* scj = sc + j * kKeyChunk;
    for (int64_t s = 0; s < full; s += 16) {
      __m512 a[16];
      for (int t = 0; t < 16; ++t) a[t] = row_products<D16>(qv, k + (s0 + s + t) * stride);
      _mm512_storeu_ps(scj + s, _mm512_mul_ps(transpose_sum16(a), vscale));
    }
    for (int64_t s = full; s < nk; ++s)
      scj[s] = _mm512_reduce_add_ps(row_products<D16>(qv, k + (s0 + s) * stride)) * scale;
    float* pj = part + j * (d + 2);
    softmax_in_place(scj, nk, pj);
  }
  __m512 acc[R][D16];
  for (int j = 0; j < R; ++j)
    for (int e = 0; e < D16; ++e) acc[j][e] = _mm512_setzero_ps();
  for (int64_t s = 0; s < nk; ++s) {
    const float* vs = v + (s0 + s) * stride;
    __m512 vv[D16];
    for (int e = 0; e < D16; ++e) vv[e] = _mm512_loadu_ps(vs + 16 * e);
    for (int j = 0; j < R; ++j) {
      const __m512 p = _mm512_set1_ps(sc[j * kKeyChunk + s]);
      for (int e = 0; e < D16; ++e) acc[j][e] = _mm512_fmadd_ps(p, vv[e], acc[j][e]);
    }
  }
  for (int j = 0; j < R; ++j)
    for (int e = 0; e < D16; ++e) _mm512_storeu_ps(part + j * (d + 2) + 2 + 16 * e, acc[j][e]);
}

using ChunkFast = void (*)(const float*, const float*, const float*, int64_t, int64_t, int64_t, float, float*, float*);

// the register version for (r query heads a KV head, d dims) where it fits in the 32 zmm
// registers (R x D16 accumulators + D16 V rows), else nullptr (the generic `chunk`)
static ChunkFast fast_chunk_for(int64_t r, int64_t d) {
#define MARJAX_FAST(R, D16) if (r == R && d == 16 * D16) return &chunk_fast<R, D16>;
  MARJAX_FAST(1, 1) MARJAX_FAST(2, 1) MARJAX_FAST(3, 1) MARJAX_FAST(4, 1)
  MARJAX_FAST(1, 2) MARJAX_FAST(2, 2) MARJAX_FAST(3, 2) MARJAX_FAST(4, 2)
  MARJAX_FAST(1, 4) MARJAX_FAST(2, 4) MARJAX_FAST(3, 4) MARJAX_FAST(4, 4) MARJAX_FAST(5, 4) MARJAX_FAST(6, 4)
  MARJAX_FAST(1, 8) MARJAX_FAST(2, 8) MARJAX_FAST(3, 8)
#undef MARJAX_FAST
  return nullptr;
}

#else   // AVX2 + FMA: the generic chunk, 8 lanes wide; no register path

using ChunkFast = void (*)(const float*, const float*, const float*, int64_t, int64_t, int64_t, float, float*, float*);
static ChunkFast fast_chunk_for(int64_t, int64_t) { return nullptr; }

// e^x for x <= 0 as exp_nonpos above, with 2^n built in the exponent bits (no VSCALEFPS): x is
// clamped at -87 so that n >= -126 stays a normal float (e^-87 ~ 1.6e-38 where e^x underflows to
// 0 in float32 arithmetic: at most that much weight on a key scored 87 below the max)
static inline __m256 exp_nonpos8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[0]);
  for (int c = 1; c < 7; ++c) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[c]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Scores sc[0, nk) -> e^(score - max) in place; part[0] = the max, part[1] = the sum of e^(.)
static inline void softmax_in_place(float* sc, int64_t nk, float* part) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < nk; ++s) m = std::max(m, sc[s]);
  const int64_t full = nk / 8 * 8;
  __m256 sum = _mm256_setzero_ps();
  for (int64_t s = 0; s < full; s += 8) {
    const __m256 p = exp_nonpos8(_mm256_sub_ps(_mm256_loadu_ps(sc + s), _mm256_set1_ps(m)));
    _mm256_storeu_ps(sc + s, p);
    sum = _mm256_add_ps(sum, p);
  }
  float tot = hsum8(sum);
  if (full < nk) {   // the last < 8 scores through one padded vector
    alignas(32) float buf[8];
    std::fill(buf, buf + 8, m);
    std::copy(sc + full, sc + nk, buf);
    _mm256_store_ps(buf, exp_nonpos8(_mm256_sub_ps(_mm256_load_ps(buf), _mm256_set1_ps(m))));
    for (int64_t s = full; s < nk; ++s) sc[s] = buf[s - full], tot += buf[s - full];
  }
  part[0] = m;
  part[1] = tot;
}

// q . k over d floats (the last d % 8 in scalars), and acc[0, d) += p * v[0, d)
static inline float dot_row(const float* q, const float* k, int64_t d) {
  const int64_t d8 = d / 8 * 8;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t e = 0; e < d8; e += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), _mm256_loadu_ps(k + e), acc);
  float t = hsum8(acc);
  for (int64_t e = d8; e < d; ++e) t += q[e] * k[e];
  return t;
}
static inline void axpy_row(float p, const float* v, float* acc, int64_t d) {
  const int64_t d8 = d / 8 * 8;
  const __m256 pv = _mm256_set1_ps(p);
  for (int64_t e = 0; e < d8; e += 8) _mm256_storeu_ps(acc + e, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + e), _mm256_loadu_ps(acc + e)));
  for (int64_t e = d8; e < d; ++e) acc[e] += p * v[e];
}

#endif  // MARJAX_AVX512

// Keys [s0, s1) of one KV head for its r query heads q (r, d): part (r, d + 2) gets, per query
// head, the chunk's max score, its sum of e^(score - max) and the e^(score - max)-weighted sum of
// v rows. `stride` is the distance between consecutive keys (g * d floats); sc scratch (r, kKeyChunk).
// (Either build: dot_row, axpy_row and softmax_in_place are the build's.)
static void chunk(const float* q, const float* k, const float* v, int64_t stride, int64_t s0, int64_t s1, int64_t r,
                  int64_t d, float scale, float* sc, float* part) {
  const int64_t nk = s1 - s0;
  for (int64_t j = 0; j < r; ++j) {
    float* scj = sc + j * kKeyChunk;
    for (int64_t s = 0; s < nk; ++s) scj[s] = dot_row(q + j * d, k + (s0 + s) * stride, d) * scale;
    float* pj = part + j * (d + 2);
    softmax_in_place(scj, nk, pj);
    std::fill(pj + 2, pj + 2 + d, 0.f);
  }
  // the weighted v sums: each v row read from memory once for the r query heads (then from L1)
  for (int64_t s = 0; s < nk; ++s)
    for (int64_t j = 0; j < r; ++j) axpy_row(sc[j * kKeyChunk + s], v + (s0 + s) * stride, part + j * (d + 2) + 2, d);
}

ffi::Error AttnDecode(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                      ffi::Buffer<ffi::S32> n, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), od = out->dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || od.size() != 3 || kd[0] != qd[0] || kd[3] != qd[2] ||
      !std::equal(kd.begin(), kd.end(), vd.begin()) || !std::equal(qd.begin(), qd.end(), od.begin()) ||
      kd[2] < 1 || qd[1] % kd[2] != 0 || static_cast<int64_t>(n.element_count()) != qd[0])
    return ffi::Error::InvalidArgument(
        "marjax_attn_decode: expected q (b, h, d), k and v (b, S, g, d) with g dividing h, n (b,), out (b, h, d)");
  const int64_t b = qd[0], h = qd[1], d = qd[2], S = kd[1], g = kd[2], r = h / g;
  const int64_t nch = std::max<int64_t>(1, (S + kKeyChunk - 1) / kKeyChunk);
  const int32_t* np = n.typed_data();
  std::vector<int64_t> valid(b);
  int64_t keys = 0;
  for (int64_t i = 0; i < b; ++i) valid[i] = std::clamp<int64_t>(np[i], 0, S), keys += valid[i];
  const int64_t units = b * g * nch, psize = r * (d + 2);
  std::vector<float> parts(units * psize);
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float* pp = parts.data();
  const int64_t* vl = valid.data();
  const ChunkFast fast = fast_chunk_for(r, d);
  parallel_rows(pool, units, 2 * keys * g * d < kMinParallelFloats, [=](int64_t u0, int64_t u1) {
    std::vector<float> sc(r * kKeyChunk);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t i = u / (g * nch), gi = (u / nch) % g, c = u % nch;
      const int64_t s0 = c * kKeyChunk, s1 = std::min(vl[i], s0 + kKeyChunk);
      float* part = pp + u * psize;
      if (s1 <= s0) {   // past this row's valid keys: an empty chunk
        for (int64_t j = 0; j < r; ++j) part[j * (d + 2)] = -std::numeric_limits<float>::infinity(), part[j * (d + 2) + 1] = 0.f;
        continue;
      }
      const int64_t off = i * S * g * d + gi * d;
      if (fast)
        fast(qp + (i * h + gi * r) * d, kp + off, vp + off, g * d, s0, s1, scale, sc.data(), part);
      else
        chunk(qp + (i * h + gi * r) * d, kp + off, vp + off, g * d, s0, s1, r, d, scale, sc.data(), part);
    }
  }, 1, 1);
  float* op = out->typed_data();
  for (int64_t i = 0; i < b; ++i)
    for (int64_t gi = 0; gi < g; ++gi)
      for (int64_t j = 0; j < r; ++j) {
        float* o = op + (i * h + gi * r + j) * d;
        const float* p0 = pp + ((i * g + gi) * nch) * psize + j * (d + 2);
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < nch; ++c) mx = std::max(mx, p0[c * psize]);
        std::fill(o, o + d, 0.f);
        if (mx == -std::numeric_limits<float>::infinity()) continue;   // no valid key (n = 0): zeros
        float tot = 0.f;
        for (int64_t c = 0; c < nch; ++c) {
          const float* pc = p0 + c * psize;
          if (pc[1] == 0.f) continue;
          const float w = std::exp(pc[0] - mx);
          tot += w * pc[1];
          for (int64_t e = 0; e < d; ++e) o[e] += w * pc[2 + e];
        }
        for (int64_t e = 0; e < d; ++e) o[e] /= tot;
      }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarjaxAttnDecode, AttnDecode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
