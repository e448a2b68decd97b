// Decode-sized matrix products against weight-only quantised matrices, as XLA FFI handlers for
// the CPU (marjax/kernels/cpu_kernels.py builds and registers them). One call computes one or more
// products that share x (a layer's q, k and v), each with its own weights and result:
//
//   y (m, out) float32 = x (m, in) float32 . W^T,  W (out, in) output-major, as QWeight stores it
//
//   marjax_q8_matmul    W int8, one float16 scale per `group` consecutive weights along `in`
//                       (scale (out, in / group, 1)); y = sum_g scale[o, g] * sum_k q[o, k] x[k];
//                       for groups of 32 with x rounded to int16 per group as for q4 (q8_tile)
//   marjax_q4_matmul    W 4-bit, groups of 32 along `in` (as llama.cpp's Q4_1): w = scale * q + zero,
//                       q in [0, 15]; byte j of a group's 16 holds q_j (low nibble) and q_{j+16}
//                       (high); scale and zero (out, in / 32, 1) float16. The activations are
//                       rounded to int16 per group of 32 (relative error <= 2^-16 of the group's
//                       max |x|), split exactly into bytes for VNNI's byte dot product (q4_tile)
//   marjax_bf16_matmul  W bfloat16
//
// Why: in a one-token decode step every weight is read once; XLA:CPU's fused dequantising
// matrix-vector loop runs single-threaded at about 6 GB/s of int8 (measured). (On the dev VM a
// q4 SmolLM2, 92 MB, stays in its 300 MB L3 between tokens, so these loops are bound by their
// instructions as much as by memory.) Two builds (parallel.h's MARJAX_AVX512): AVX-512 (F, BW,
// VNNI) and F16C, or AVX2, FMA and F16C (VPMADDWD on int16 activations for int8 and q4, the same
// int16 rounding, exact int32 group sums either way); bf16, and int8 in groups other than 32, keep
// float32 activations, so the result equals the float32 product with the
// dequantised matrix up to summation order. Output rows are split over XLA's intra-op thread pool
// (parallel.h).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;
using marjax::parallel_rows;
using marjax::hsum8;

namespace {

constexpr int kRowTile = 4;   // activation rows per pass over the weights (registers: R*M*2 <= 32)
constexpr int kPrefetch = 4096;
// weights x rows below which one thread runs a product: small products (a GQA layer's k and v:
// 110 K weights, ~7 us) cost more to hand off than to compute (SmolLM2 q4 decode 73 -> 81 tok/s
// in alternating runs with them kept on the calling thread)
constexpr int64_t kMinParallelWork = int64_t{1} << 18;

// f(std::integral_constant<int, M>, r0) for the activation rows [r0, r0 + M) of m, kRowTile at a
// time: M is the tiles' compile-time height (they keep R * M accumulators in registers)
template <typename F>
static void row_blocks(int64_t m, F f) {
  for (int64_t r0 = 0; r0 < m; r0 += kRowTile) {
    switch (m - r0 >= kRowTile ? kRowTile : m - r0) {
      case 1: f(std::integral_constant<int, 1>{}, r0); break;
      case 2: f(std::integral_constant<int, 2>{}, r0); break;
      case 3: f(std::integral_constant<int, 3>{}, r0); break;
      default: f(std::integral_constant<int, 4>{}, r0); break;
    }
  }
}

// tile(std::integral_constant<int, R>, o) over the output rows [o0, o1) for M activation rows: R
// rows a tile (8 for one activation row, 4 for two, else 2: R * M accumulators in registers), then
// pairs, then single rows
template <int M, typename Tile>
static inline void tiled_rows(int64_t o0, int64_t o1, Tile tile) {
  constexpr int R = M == 1 ? 8 : (M <= 2 ? 4 : 2);
  int64_t o = o0;
  for (; o + R <= o1; o += R) tile(std::integral_constant<int, R>{}, o);
  for (; o + 2 <= o1; o += 2) tile(std::integral_constant<int, 2>{}, o);
  for (; o < o1; ++o) tile(std::integral_constant<int, 1>{}, o);
}

// One group of 32 float32 activations as int16, q[k] = round(v[k] / scale) with scale = max |v| /
// 32767 (each value off by at most half a step); returns the scale. The q4 and int8 kernels both
// round their activations here (quantize_x16, quantize_x16_split; the AVX2 build's quantize_acts16).
static inline float round_group16(const float* v, int* q, float* sum = nullptr) {
  float amax = 0.f;
  for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(v[k]));
  const float scale = amax > 0.f ? amax / 32767.f : 1.f;
  for (int k = 0; k < 32; ++k) q[k] = static_cast<int>(std::nearbyint(v[k] / scale));   // in [-32767, 32767]
  if (sum != nullptr) {   // the group's float32 sum, in order (q4's zero term)
    *sum = 0.f;
    for (int k = 0; k < 32; ++k) *sum += v[k];
  }
  return scale;
}

#if MARJAX_AVX512

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

// 4-bit weights: R output rows against M activation rows, four groups of 32 (64 bytes) per
// iteration, with VNNI's byte dot product (vpdpbusd: u8 x s8, four products into each int32 lane).
// The activations are int16 per group, split exactly into a signed high byte and an unsigned low
// byte (x = 256 xh + xl), so w . x = 256 (w . xh) + (w . xl) in int32: the nibbles 0-15 serve as
// the unsigned operand against xh and as the signed one against xl. The four groups' bytes unpack
// with one mask (low nibbles: weights 0-15 of each group) and one shift (high: 16-31), and the x
// bytes are stored in that order (xq: 256 bytes per four groups: xh of weights 0-15 of each group,
// xh of 16-31, then xl likewise), so int32 lanes 4j..4j+3 hold group j's sums; they are scaled
// (weight scale x activation scale) by a lane permute of the 16-group scale vector. (The previous
// loop widened the nibbles to int16 for vpdpwssd, two groups an iteration: twice the instructions
// a weight; see RESULTS.md, "Decode on the AMD EPYC VM".) The zero term is sum_g zero[o, g] *
// (float32 sum of x over group g), from `xs` (M, ng).
template <int R, int M>
static inline void q4_tile(const uint8_t* w, const uint16_t* sc, const uint16_t* zr, const int8_t* xq,
                           const float* xsc, const float* xs, float* y, int64_t in, int64_t out, int64_t o) {
  const int64_t ng = in / 32, half = in / 2, xstride = (ng + 3) / 4 * 256;   // bytes
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i quad = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc[R][M], accz[R][M];
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r) acc[i][r] = _mm512_setzero_ps(), accz[i][r] = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < ng; g0 += 16) {
    const int64_t n = ng - g0 < 16 ? ng - g0 : 16;
    const __mmask16 msk = (__mmask16)((1u << n) - 1u);
    __m512 comb[R][M];
    for (int i = 0; i < R; ++i) {
      // the scales and zeros stream at 1/8 of the weights' bytes: prefetch as far ahead in them
      _mm_prefetch(reinterpret_cast<const char*>(sc + (o + i) * ng + g0) + kPrefetch / 8, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(zr + (o + i) * ng + g0) + kPrefetch / 8, _MM_HINT_T0);
      const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(msk, sc + (o + i) * ng + g0));
      const __m512 zv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(msk, zr + (o + i) * ng + g0));
      for (int r = 0; r < M; ++r) {
        comb[i][r] = _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(msk, xsc + r * ng + g0));
        accz[i][r] = _mm512_fmadd_ps(zv, _mm512_maskz_loadu_ps(msk, xs + r * ng + g0), accz[i][r]);
      }
    }
    for (int64_t j = 0; j < n; j += 4) {
      const int64_t g = g0 + j;   // a multiple of 4
      const int64_t left = n - j;
      // the bytes of the groups left (a multiple of 16); lanes past them dot zeros and scale by
      // comb's zero lanes
      const __mmask64 bmask = left >= 4 ? ~(__mmask64)0 : (((__mmask64)1 << (left * 16)) - 1);
      const __m512i lane = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j)), quad);
      __m512i xhl[M], xhh[M], xll[M], xlh[M];
      for (int r = 0; r < M; ++r) {
        const int8_t* xp = xq + r * xstride + g / 4 * 256;
        xhl[r] = _mm512_loadu_si512(xp), xhh[r] = _mm512_loadu_si512(xp + 64);
        xll[r] = _mm512_loadu_si512(xp + 128), xlh[r] = _mm512_loadu_si512(xp + 192);
      }
      for (int i = 0; i < R; ++i) {
        const uint8_t* wg = w + (o + i) * half + g * 16;
        _mm_prefetch(reinterpret_cast<const char*>(wg) + kPrefetch, _MM_HINT_T0);
        const __m512i b = _mm512_maskz_loadu_epi8(bmask, wg);
        const __m512i lo = _mm512_and_si512(b, low4), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
        for (int r = 0; r < M; ++r) {
          const __m512i dh = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xhl[r]), hi, xhh[r]);
          const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(dh, 8), xll[r], lo), xlh[r], hi);
          acc[i][r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(lane, comb[i][r]), _mm512_cvtepi32_ps(d), acc[i][r]);
        }
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r)
      y[r * out + o + i] = _mm512_reduce_add_ps(acc[i][r]) + _mm512_reduce_add_ps(accz[i][r]);
}

static void q4_rows(const uint8_t* w, const uint16_t* sc, const uint16_t* zr, const int8_t* xq, const float* xsc,
                    const float* xs, float* y, int64_t m, int64_t in, int64_t out, int64_t o0, int64_t o1) {
  const int64_t ng = in / 32, xstride = (ng + 3) / 4 * 256;
  row_blocks(m, [&](auto mc, int64_t r0) {
    constexpr int M = decltype(mc)::value;
    tiled_rows<M>(o0, o1, [&](auto rc, int64_t o) {
      q4_tile<decltype(rc)::value, M>(w, sc, zr, xq + r0 * xstride, xsc + r0 * ng, xs + r0 * ng, y + r0 * out, in,
                                      out, o);
    });
  });
}

// x (m, in) float32 -> int16 per group of 32 (scale = max |x| / 32767: each value off by at most
// 2^-16 of its group's max |x|), stored as q4_tile reads it: per four groups 256 bytes, the high
// bytes (signed) of weights 0-15 of each group, of 16-31, then the low bytes (unsigned) likewise;
// zeros past the last group. Also the scales and the float32 group sums.
static void quantize_x16(const float* x, int64_t m, int64_t in, std::vector<int8_t>& xq, std::vector<float>& xsc,
                         std::vector<float>& xs) {
  const int64_t ng = in / 32, xstride = (ng + 3) / 4 * 256;
  xq.assign(m * xstride, 0);
  int q[32];
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < ng; ++g) {
      const float* v = x + r * in + g * 32;
      xsc[r * ng + g] = round_group16(v, q, &xs[r * ng + g]);
      int8_t* dst = xq.data() + r * xstride + g / 4 * 256 + (g % 4) * 16;
      for (int k = 0; k < 32; ++k) {
        const int at = (k < 16 ? k : 64 + k - 16);
        dst[at] = static_cast<int8_t>(q[k] >> 8);              // arithmetic shift: floor(q / 256)
        dst[at + 128] = static_cast<int8_t>(static_cast<uint8_t>(q[k] & 255));
      }
    }
}

// int8 weights in groups of 32 (the default QWeight group): R output rows against M activation
// rows, 64 weights (two groups) an iteration, with VNNI's byte dot product on the int16
// activations split exactly into bytes (x = 256 xh + xl, as q4_tile). The weights are signed, so
// the high part takes them biased to unsigned (w + 128) against the signed xh and `xb` (per four
// weights, 32768 * their sum of xh) removes the bias: d = 256 (w + 128) . xh + w . xl - xb =
// w . x in int32, exactly. int32 lanes 0-7 hold the first group's sums, 8-15 the second's,
// scaled by a lane permute of the 16-group (weight scale x activation scale) vector. Fewer than
// half the instructions a weight of the float32 loop (`tile`), which is bound by them on a CPU
// with double-pumped AVX-512 (the AMD VM: SmolLM2's 28 MB int8 head, repeated from cache, 46 GB/s
// with `tile`, 77-87 GB/s with this; RESULTS.md, "Decode, fourteenth session").
template <int R, int M>
static inline void q8_tile(const int8_t* w, const uint16_t* sc, const int8_t* xh, const uint8_t* xl,
                           const int32_t* xb, const float* xsc, float* y, int64_t in, int64_t out, int64_t o) {
  const int64_t ng = in / 32;
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[R][M];
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < ng; g0 += 16) {
    const int64_t n = ng - g0 < 16 ? ng - g0 : 16;
    const __mmask16 msk = (__mmask16)((1u << n) - 1u);
    __m512 comb[R][M];
    for (int i = 0; i < R; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(sc + (o + i) * ng + g0) + kPrefetch / 16, _MM_HINT_T0);
      const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(msk, sc + (o + i) * ng + g0));
      for (int r = 0; r < M; ++r) comb[i][r] = _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(msk, xsc + r * ng + g0));
    }
    for (int64_t j = 0; j < n; j += 2) {
      const int64_t k = (g0 + j) * 32;
      const bool two = n - j >= 2;   // else one group left: 32 bytes, lanes 8-15 dot zeros
      const __mmask64 bm = two ? ~(__mmask64)0 : (__mmask64)0xFFFFFFFFull;
      const __mmask16 lm = two ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
      const __m512i lane = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j)), pair);
      __m512i vh[M], vl[M], vb[M];
      for (int r = 0; r < M; ++r) {
        vh[r] = _mm512_maskz_loadu_epi8(bm, xh + r * in + k);
        vl[r] = _mm512_maskz_loadu_epi8(bm, xl + r * in + k);
        vb[r] = _mm512_maskz_loadu_epi32(lm, xb + (r * in + k) / 4);
      }
      for (int i = 0; i < R; ++i) {
        const int8_t* wk = w + (o + i) * in + k;
        _mm_prefetch(reinterpret_cast<const char*>(wk) + kPrefetch, _MM_HINT_T0);
        const __m512i wv = _mm512_maskz_loadu_epi8(bm, wk);
        const __m512i wu = _mm512_xor_si512(wv, bias);   // w + 128 as unsigned bytes
        for (int r = 0; r < M; ++r) {
          const __m512i dh = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, vh[r]);
          const __m512i d = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(dh, 8), vl[r], wv), vb[r]);
          acc[i][r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(lane, comb[i][r]), _mm512_cvtepi32_ps(d), acc[i][r]);
        }
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r) y[r * out + o + i] = _mm512_reduce_add_ps(acc[i][r]);
}

static void q8_rows(const int8_t* w, const uint16_t* sc, const int8_t* xh, const uint8_t* xl, const int32_t* xb,
                    const float* xsc, float* y, int64_t m, int64_t in, int64_t out, int64_t o0, int64_t o1) {
  const int64_t ng = in / 32;
  row_blocks(m, [&](auto mc, int64_t r0) {
    constexpr int M = decltype(mc)::value;
    tiled_rows<M>(o0, o1, [&](auto rc, int64_t o) {
      q8_tile<decltype(rc)::value, M>(w, sc, xh + r0 * in, xl + r0 * in, xb + r0 * in / 4, xsc + r0 * ng,
                                      y + r0 * out, in, out, o);
    });
  });
}

// x (m, in) float32 -> int16 per group of 32 (round_group16), in natural order
// for q8_tile: the high bytes (signed), the low bytes (unsigned), per four values 32768 * the sum
// of their high bytes, and the groups' scales
static void quantize_x16_split(const float* x, int64_t m, int64_t in, std::vector<int8_t>& xh,
                               std::vector<uint8_t>& xl, std::vector<int32_t>& xb, std::vector<float>& xsc) {
  const int64_t ng = in / 32;
  xh.assign(m * in, 0), xl.assign(m * in, 0), xb.assign(m * in / 4, 0), xsc.assign(m * ng, 0.f);
  int q[32];
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t at = r * in + g * 32;
      xsc[r * ng + g] = round_group16(x + at, q);
      for (int k = 0; k < 32; ++k) {
        xh[at + k] = static_cast<int8_t>(q[k] >> 8);
        xl[at + k] = static_cast<uint8_t>(q[k] & 255);
        xb[(at + k) / 4] += 32768 * (q[k] >> 8);
      }
    }
}

// output rows [o0, o1) for all m activation rows, kRowTile at a time
template <typename W>
static void rows(const W* w, const uint16_t* sc, const float* x, float* y, int64_t m, int64_t in, int64_t out,
                 int64_t group, int64_t o0, int64_t o1) {
  row_blocks(m, [&](auto mc, int64_t r0) {
    rows_m<W, decltype(mc)::value>(w, sc, x + r0 * in, y + r0 * out, in, out, group, o0, o1);
  });
}

// the activations of one call as q4_tile and q8_tile read them
struct Q4Acts {
  std::vector<int8_t> xq;
  std::vector<float> xsc, xs;
};
static Q4Acts prepare_q4(const float* x, int64_t m, int64_t in) {
  Q4Acts a{{}, std::vector<float>(m * (in / 32)), std::vector<float>(m * (in / 32))};
  quantize_x16(x, m, in, a.xq, a.xsc, a.xs);
  return a;
}
static void q4_rows(const uint8_t* w, const uint16_t* sc, const uint16_t* zr, const Q4Acts& a, float* y, int64_t m,
                    int64_t in, int64_t out, int64_t o0, int64_t o1) {
  q4_rows(w, sc, zr, a.xq.data(), a.xsc.data(), a.xs.data(), y, m, in, out, o0, o1);
}
struct Q8Acts {
  std::vector<int8_t> xh;
  std::vector<uint8_t> xl;
  std::vector<int32_t> xb;
  std::vector<float> xsc;
};
static Q8Acts prepare_q8(const float* x, int64_t m, int64_t in) {
  Q8Acts a;
  quantize_x16_split(x, m, in, a.xh, a.xl, a.xb, a.xsc);
  return a;
}
static void q8_rows(const int8_t* w, const uint16_t* sc, const Q8Acts& a, float* y, int64_t m, int64_t in, int64_t out,
                    int64_t o0, int64_t o1) {
  q8_rows(w, sc, a.xh.data(), a.xl.data(), a.xb.data(), a.xsc.data(), y, m, in, out, o0, o1);
}


#else   // AVX2 + FMA + F16C: 8-wide float32, VPMADDWD (int16 x int16 pairs into int32) for int8 and q4

// 8 weights from `w` as float32, and one
static inline __m256 load_w8(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}
static inline __m256 load_w8(const uint16_t* w) {   // bfloat16: the high half of a float32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))), 16));
}
static inline float w_scalar(int8_t w) { return static_cast<float>(w); }
static inline float w_scalar(uint16_t w) { return _mm_cvtss_f32(_mm_castsi128_ps(_mm_cvtsi32_si128(static_cast<int>(w) << 16))); }

// float32 activations (bf16, and int8 in groups other than 32): R output rows against M activation
// rows, each group's 8-wide partial sums scaled into the accumulators; contraction tails (group
// not a multiple of 8) summed in scalars
template <typename W, int R, int M>
static inline void tile(const W* w, const uint16_t* sc, const float* x, float* y, int64_t in, int64_t out,
                        int64_t group, int64_t o) {
  const int64_t ng = in / group, full = group / 8 * 8;
  __m256 acc[R][M];
  float tacc[R][M];
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r) acc[i][r] = _mm256_setzero_ps(), tacc[i][r] = 0.f;
  for (int64_t g = 0; g < ng; ++g) {
    __m256 gs[R][M];
    float ts[R][M];
    for (int i = 0; i < R; ++i)
      for (int r = 0; r < M; ++r) gs[i][r] = _mm256_setzero_ps(), ts[i][r] = 0.f;
    const int64_t base = g * group;
    for (int64_t k = 0; k < full; k += 8) {
      __m256 xv[M];
      for (int r = 0; r < M; ++r) xv[r] = _mm256_loadu_ps(x + r * in + base + k);
      for (int i = 0; i < R; ++i) {
        const W* wk = w + (o + i) * in + base + k;
        if (((k * sizeof(W)) & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(wk) + kPrefetch, _MM_HINT_T0);
        const __m256 wv = load_w8(wk);
        for (int r = 0; r < M; ++r) gs[i][r] = _mm256_fmadd_ps(wv, xv[r], gs[i][r]);
      }
    }
    for (int64_t k = full; k < group; ++k)
      for (int i = 0; i < R; ++i)
        for (int r = 0; r < M; ++r) ts[i][r] += w_scalar(w[(o + i) * in + base + k]) * x[r * in + base + k];
    for (int i = 0; i < R; ++i) {
      const float s = sc == nullptr ? 1.f : _cvtsh_ss(sc[(o + i) * ng + g]);
      for (int r = 0; r < M; ++r) {
        acc[i][r] = _mm256_fmadd_ps(_mm256_set1_ps(s), gs[i][r], acc[i][r]);
        tacc[i][r] += s * ts[i][r];
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r) y[r * out + o + i] = hsum8(acc[i][r]) + tacc[i][r];
}

template <typename W>
static void rows(const W* w, const uint16_t* sc, const float* x, float* y, int64_t m, int64_t in, int64_t out,
                 int64_t group, int64_t o0, int64_t o1) {
  row_blocks(m, [&](auto mc, int64_t r0) {
    constexpr int M = decltype(mc)::value;
    tiled_rows<M>(o0, o1, [&](auto rc, int64_t o) {
      tile<W, decltype(rc)::value, M>(w, sc, x + r0 * in, y + r0 * out, in, out, group, o);
    });
  });
}

// x (m, in) float32 -> int16 per group of 32 (round_group16) in natural order, the groups' scales
// and, with `sums` (q4's zero term), their float32 sums; `in` a multiple of 32
struct Acts16 {
  std::vector<int16_t> xq;
  std::vector<float> xsc, xs;
};
static Acts16 quantize_acts16(const float* x, int64_t m, int64_t in, bool sums) {
  const int64_t ng = in / 32;
  Acts16 a{std::vector<int16_t>(m * in), std::vector<float>(m * ng), std::vector<float>(sums ? m * ng : 0)};
  int q[32];
  for (int64_t r = 0; r < m; ++r)
    for (int64_t g = 0; g < ng; ++g) {
      a.xsc[r * ng + g] = round_group16(x + r * in + g * 32, q, sums ? &a.xs[r * ng + g] : nullptr);
      for (int k = 0; k < 32; ++k) a.xq[r * in + g * 32 + k] = static_cast<int16_t>(q[k]);
    }
  return a;
}
using Q4Acts = Acts16;
using Q8Acts = Acts16;
static Q4Acts prepare_q4(const float* x, int64_t m, int64_t in) { return quantize_acts16(x, m, in, true); }
static Q8Acts prepare_q8(const float* x, int64_t m, int64_t in) { return quantize_acts16(x, m, in, false); }

// One group of 32 weights as two vectors of 16 int16 (weights 0-15, 16-31), against the group's
// int16 activations: 8 int32 lanes of exact partial sums (VPMADDWD; |sum| < 2^24, exact as float32)
static inline __m256i dot_group(__m256i w0, __m256i w1, const int16_t* xg) {
  return _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg))),
                          _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + 16))));
}

// The (weight scale x activation scale) of groups [g0, g0 + n) for R rows and M activation rows,
// n <= 8, into comb[i][r][0, 8) (zeros past n), and the zero term's zero * (sum of x) lanes into
// zacc (q4). A full block of 8 loads directly; the last, partial one through zero-padded copies.
template <int R, int M>
static inline void group_scales(const uint16_t* sc, const uint16_t* zr, const Acts16& a, int64_t ng, int64_t o,
                                int64_t g0, int64_t n, int64_t r0, float (*comb)[M][8], __m256 (*zacc)[M]) {
  auto half8 = [n](const uint16_t* p) {   // 8 float16 values as float32, zeros past n
    if (n == 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    alignas(16) uint16_t buf[8] = {0};
    for (int64_t j = 0; j < n; ++j) buf[j] = p[j];
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  };
  auto float8 = [n](const float* p) {
    if (n == 8) return _mm256_loadu_ps(p);
    alignas(32) float buf[8] = {0};
    for (int64_t j = 0; j < n; ++j) buf[j] = p[j];
    return _mm256_load_ps(buf);
  };
  __m256 xsc[M], xs[M];
  for (int r = 0; r < M; ++r) {
    xsc[r] = float8(a.xsc.data() + (r0 + r) * ng + g0);
    if (zr != nullptr) xs[r] = float8(a.xs.data() + (r0 + r) * ng + g0);
  }
  for (int i = 0; i < R; ++i) {
    const __m256 sv = half8(sc + (o + i) * ng + g0);
    for (int r = 0; r < M; ++r) _mm256_storeu_ps(comb[i][r], _mm256_mul_ps(sv, xsc[r]));
    if (zr != nullptr) {
      const __m256 zv = half8(zr + (o + i) * ng + g0);
      for (int r = 0; r < M; ++r) zacc[i][r] = _mm256_fmadd_ps(zv, xs[r], zacc[i][r]);
    }
  }
}

// 4-bit weights (a group's 16 bytes: q_j low nibble, q_{j+16} high) or int8 weights in groups of
// 32: R output rows against M activation rows [r0, r0 + M), one group an iteration, scales fetched
// 8 groups at a time. For q4 the zero term is added from the exact float32 group sums of x.
template <bool Q4, int R, int M>
static inline void int_tile(const void* wv, const uint16_t* sc, const uint16_t* zr, const Acts16& a, int64_t r0,
                            float* y, int64_t in, int64_t out, int64_t o) {
  const int64_t ng = in / 32, wrow = Q4 ? in / 2 : in;   // bytes a weight row
  const uint8_t* w = static_cast<const uint8_t*>(wv);
  const __m256i low4 = _mm256_set1_epi16(0x0F);
  __m256 acc[R][M], zacc[R][M];
  float comb[R][M][8];
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r) acc[i][r] = _mm256_setzero_ps(), zacc[i][r] = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < ng; g0 += 8) {
    const int64_t n = std::min<int64_t>(8, ng - g0);
    group_scales<R, M>(sc, Q4 ? zr : nullptr, a, ng, o, g0, n, r0, comb, zacc);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t g = g0 + j;
      for (int i = 0; i < R; ++i) {
        const uint8_t* wg = w + (o + i) * wrow + g * (Q4 ? 16 : 32);
        _mm_prefetch(reinterpret_cast<const char*>(wg) + kPrefetch, _MM_HINT_T0);
        __m256i w0, w1;
        if constexpr (Q4) {
          const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg)));
          w0 = _mm256_and_si256(b, low4), w1 = _mm256_srli_epi16(b, 4);
        } else {
          w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg)));
          w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + 16)));
        }
        for (int r = 0; r < M; ++r) {
          const __m256i d = dot_group(w0, w1, a.xq.data() + (r0 + r) * in + g * 32);
          acc[i][r] = _mm256_fmadd_ps(_mm256_set1_ps(comb[i][r][j]), _mm256_cvtepi32_ps(d), acc[i][r]);
        }
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < M; ++r) y[(r0 + r) * out + o + i] = hsum8(acc[i][r]) + hsum8(zacc[i][r]);
}

template <bool Q4>
static void int_rows(const void* w, const uint16_t* sc, const uint16_t* zr, const Acts16& a, float* y, int64_t m,
                     int64_t in, int64_t out, int64_t o0, int64_t o1) {
  row_blocks(m, [&](auto mc, int64_t r0) {
    constexpr int M = decltype(mc)::value;
    tiled_rows<M>(o0, o1, [&](auto rc, int64_t o) { int_tile<Q4, decltype(rc)::value, M>(w, sc, zr, a, r0, y, in, out, o); });
  });
}
static void q4_rows(const uint8_t* w, const uint16_t* sc, const uint16_t* zr, const Q4Acts& a, float* y, int64_t m,
                    int64_t in, int64_t out, int64_t o0, int64_t o1) {
  int_rows<true>(w, sc, zr, a, y, m, in, out, o0, o1);
}
static void q8_rows(const int8_t* w, const uint16_t* sc, const Q8Acts& a, float* y, int64_t m, int64_t in, int64_t out,
                    int64_t o0, int64_t o1) {
  int_rows<false>(w, sc, nullptr, a, y, m, in, out, o0, o1);
}

#endif  // MARJAX_AVX512

// One product of a call: its weights (and scales, zeros), its output (m, out) and group count.
struct Mat {
  const void* w;
  const uint16_t* sc;
  const uint16_t* zr;
  float* y;
  int64_t out;
  int64_t ng;
};

// fn(mat, o0, o1) over the output rows of every product of a call, split over the pool as one
// row range (the products share x: q, k and v, or gate and up, are one hand-off, not three)
template <typename Fn>
static void parallel_mats(ffi::ThreadPool& pool, const std::vector<Mat>& mats, int64_t m, int64_t in, Fn fn) {
  std::vector<int64_t> start(mats.size() + 1, 0);
  for (size_t j = 0; j < mats.size(); ++j) start[j + 1] = start[j] + mats[j].out;
  const int64_t total = start.back(), nm = static_cast<int64_t>(mats.size());
  const Mat* mp = mats.data();
  const int64_t* sp = start.data();   // both live until every claimed chunk is done (parallel_rows)
  parallel_rows(pool, total, m * in * total < kMinParallelWork, [=](int64_t i0, int64_t i1) {
    for (int64_t j = 0; j < nm; ++j) {
      const int64_t lo = std::max(i0, sp[j]), hi = std::min(i1, sp[j + 1]);
      if (lo < hi) fn(mp[j], lo - sp[j], hi - sp[j]);
    }
  });
}

// The products of a call: x (m, in) and, per product, `per` operands (weights first) and one
// result. `packed`: weights hold two values a byte (q4). Checks every shape against x.
template <ffi::DataType T>
static ffi::Error unpack(ffi::Buffer<ffi::F32>& x, ffi::RemainingArgs& args, ffi::RemainingRets& rets, size_t per,
                         bool packed, const char* name, std::vector<Mat>& mats) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || rets.size() == 0 || args.size() != per * rets.size())
    return ffi::Error::InvalidArgument(std::string(name) + ": expected x (m, in) and, per product, its operands and one result");
  const int64_t m = xd[0], in = xd[1];
  for (size_t j = 0; j < rets.size(); ++j) {
    auto w = args.get<ffi::Buffer<T>>(per * j);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(j);
    if (w.has_error()) return w.error();
    if (y.has_error()) return y.error();
    auto wd = w->dimensions(), yd = (*y)->dimensions();
    if (wd.size() != 2 || wd[1] * (packed ? 2 : 1) != in || yd.size() != 2 || yd[0] != m || yd[1] != wd[0])
      return ffi::Error::InvalidArgument(std::string(name) + ": expected x (m, in), w (out, in" + (packed ? " / 2" : "") +
                                         "), y (m, out)");
    Mat mat{w->untyped_data(), nullptr, nullptr, (*y)->typed_data(), wd[0], 1};
    for (size_t a = 1; a < per; ++a) {
      auto t = args.get<ffi::Buffer<ffi::F16>>(per * j + a);
      if (t.has_error()) return t.error();
      const int64_t n = static_cast<int64_t>(t->element_count());
      if (mat.out > 0 && (n % mat.out != 0 || n == 0 || in % (n / mat.out) != 0))
        return ffi::Error::InvalidArgument(std::string(name) + ": scales must be (out, in / group, 1)");
      if (a == 1) mat.sc = reinterpret_cast<const uint16_t*>(t->untyped_data()), mat.ng = mat.out > 0 ? n / mat.out : 1;
      else if (n != mat.out * mat.ng) return ffi::Error::InvalidArgument(std::string(name) + ": zero must be shaped as scale");
      else mat.zr = reinterpret_cast<const uint16_t*>(t->untyped_data());
    }
    mats.push_back(mat);
  }
  return ffi::Error::Success();
}

// int8 (operands w, scale) or bfloat16 (w): float32 activations through the same row loop, but
// int8 in groups of 32 through the int16-activation loop (q8_rows)
template <ffi::DataType T, typename W>
static ffi::Error FloatActMatmul(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::RemainingArgs& args,
                                 ffi::RemainingRets& rets, const char* name) {
  std::vector<Mat> mats;
  if (ffi::Error e = unpack<T>(x, args, rets, T == ffi::S8 ? 2 : 1, false, name, mats); e.failure()) return e;
  const int64_t m = x.dimensions()[0], in = x.dimensions()[1];
  const float* xp = x.typed_data();
  if constexpr (T == ffi::S8) {
    // groups of 32 (QWeight's default): int16 activations (q8_rows); other groupings keep float32
    if (in % 32 == 0 && std::all_of(mats.begin(), mats.end(), [&](const Mat& a) { return a.ng * 32 == in; })) {
      const Q8Acts acts = prepare_q8(xp, m, in);
      const Q8Acts* ap = &acts;   // lives until every claimed chunk is done (parallel_rows)
      parallel_mats(pool, mats, m, in, [=](const Mat& a, int64_t o0, int64_t o1) {
        q8_rows(static_cast<const int8_t*>(a.w), a.sc, *ap, a.y, m, in, a.out, o0, o1);
      });
      return ffi::Error::Success();
    }
  }
  parallel_mats(pool, mats, m, in, [=](const Mat& a, int64_t o0, int64_t o1) {
    rows(static_cast<const W*>(a.w), a.sc, xp, a.y, m, in, a.out, in / a.ng, o0, o1);   // bf16: no scale, ng 1
  });
  return ffi::Error::Success();
}

ffi::Error Q8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  return FloatActMatmul<ffi::S8, int8_t>(pool, x, args, rets, "marjax_q8_matmul");
}

ffi::Error Bf16Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  return FloatActMatmul<ffi::BF16, uint16_t>(pool, x, args, rets, "marjax_bf16_matmul");
}

ffi::Error Q4Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  std::vector<Mat> mats;
  if (ffi::Error e = unpack<ffi::U8>(x, args, rets, 3, true, "marjax_q4_matmul", mats); e.failure()) return e;
  const int64_t m = x.dimensions()[0], in = x.dimensions()[1], ng = in / 32;
  for (const Mat& a : mats)
    if (in % 32 != 0 || a.ng != ng)
      return ffi::Error::InvalidArgument("marjax_q4_matmul: in must be a multiple of 32, scale and zero (out, in / 32, 1)");
  const Q4Acts acts = prepare_q4(x.typed_data(), m, in);
  const Q4Acts* ap = &acts;
  parallel_mats(pool, mats, m, in, [=](const Mat& a, int64_t o0, int64_t o1) {
    q4_rows(static_cast<const uint8_t*>(a.w), a.sc, a.zr, *ap, a.y, m, in, a.out, o0, o1);
  });
  return ffi::Error::Success();
}

}  // namespace

// each: x, then per product its operands (int8: w, scale; q4: w, scale, zero; bf16: w), one result a product
XLA_FFI_DEFINE_HANDLER_SYMBOL(MarjaxQ8Matmul, Q8Matmul,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().RemainingArgs().RemainingRets());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MarjaxQ4Matmul, Q4Matmul,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().RemainingArgs().RemainingRets());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MarjaxBf16Matmul, Bf16Matmul,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().RemainingArgs().RemainingRets());

// which build this library is (cpu_kernels.status names it): "avx512" (F, BW, VNNI) or "avx2"
extern "C" const char* marjax_kernels_isa() { return MARJAX_AVX512 ? "avx512" : "avx2"; }
