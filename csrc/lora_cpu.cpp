// Segmented multi-LoRA kernel for the CPU.
//
// y[t, :] += (x[t, :] @ A_u) @ B_u   for every token t of segment (start, end, u)
//
//   y:      [T, out]  float32 or bfloat16, rows may be strided (a column slice of a fused output)
//   x:      [T, in]   same dtype as y, contiguous rows
//   segs:   [G, 3]    int64 rows (start, end, adapter index into A/B)
//   A[u]:   [in, r_u] contiguous, same dtype (r_u == 0: adapter has no weights here, skipped)
//   B[u]:   [r_u, out] contiguous, scaling already folded in
//   pad_rank: 0 computes each adapter at its own rank (MBGMV: cost follows the sum of ranks);
//             R > 0 zero-pads every adapter to rank R and computes the padded product
//             (BGMV: cost follows tokens x max rank).
//
// Short segments (decode tokens) are dealt to the threads by their weights' bytes; each reads its
// adapter's weights once per 4 tokens. In bf16 (rank <= 64, AVX512-BF16) they run on bf16 pair
// dot products that round x @ A and the delta as the long path does, the weights prefetched
// ahead of use (a step's adapters read at about 20 GB/s instead of 12 with float FMAs,
// docs/engine_performance.md round 6); otherwise in a fused float32 loop that rounds only the sum.
// Long segments (prefill) compute x @ A, round it to the model dtype, multiply by B and round the
// delta before adding it: in bf16 on the pair GEMMs of dot_gemm.h (torch's batch-reduce GEMM with
// AMX, else bf16 pair dot products, which take an even input and a multiple of 16 outputs) over
// 32-row blocks of every long segment at once, with A and B put in bf16 pairs per call; elsewhere
// through BLAS (at::mm), segment by segment. at::mm costs ~100 us per segment and projection in
// bf16, most of it per-call overhead (docs/engine_performance.md, rounds 5 and 9).
// long_delta and short_delta give one segment's rounded delta alone (services/cpu_prefill/lora_slice.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <vector>

#include "dot_gemm.h"

namespace {

// Segments at least this long take the two-GEMM path (shared/native_ops.py BLAS_SEGMENT_TOKENS);
// bf16 segments that the batch-reduce GEMM takes, from kPairedThreshold tokens (PAIRED_SEGMENT_TOKENS):
// above about 12 tokens it beats the pair dot products, which read the weights once per 4 tokens.
constexpr int64_t kBlasThreshold = 32;
constexpr int64_t kPairedThreshold = 16;

struct Item {
  int64_t start;
  int64_t end;
  int64_t adapter;
};

// ---- element access: bf16 and fp32 loaded as fp32 ----------------------------------------
inline float load1(const float* p) { return *p; }
inline float load1(const at::BFloat16* p) { return static_cast<float>(*p); }
inline void store_add1(float* p, float v) { *p += v; }
inline void store_add1(at::BFloat16* p, float v) { *p = static_cast<at::BFloat16>(static_cast<float>(*p) + v); }

#ifdef __AVX512F__
constexpr int64_t kLanes = 16;
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void add_store16(float* p, __m512 v) { _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), v)); }
inline void add_store16(at::BFloat16* p, __m512 v) {
  __m512 sum = _mm512_add_ps(load16(p), v);
  // round to nearest even, as c10::BFloat16 does
  __m512i bits = _mm512_castps_si512(sum);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}
#endif

#ifdef __AVX512F__
// Lanes [k0, k0 + 16) of a row, zero at and beyond `valid` (rank padding reads no memory).
inline __m512 load16_masked(const float* row, int64_t k0, int64_t valid) {
  const int64_t n = std::clamp<int64_t>(valid - k0, 0, kLanes);
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), row + k0);
}
inline __m512 load16_masked(const at::BFloat16* row, int64_t k0, int64_t valid) {
  const int64_t n = std::clamp<int64_t>(valid - k0, 0, kLanes);
  __m256i raw = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1u), row + k0);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

#ifdef __AVX512F__
// v[t, k0:k0+16] for NB tokens at once: every A load feeds NB tokens, and even/odd input
// rows accumulate separately so 2*NB FMA chains run in parallel.
template <int NB, typename scalar_t>
void shrink_block(const float* xf, int64_t in, const scalar_t* A, int64_t r, int64_t k0, float* v, int64_t R) {
  __m512 even[NB], odd[NB];
  for (int b = 0; b < NB; ++b) even[b] = odd[b] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 1 < in; i += 2) {
    const __m512 a0 = load16_masked(A + i * r, k0, r);
    const __m512 a1 = load16_masked(A + (i + 1) * r, k0, r);
    for (int b = 0; b < NB; ++b) {
      even[b] = _mm512_fmadd_ps(_mm512_set1_ps(xf[b * in + i]), a0, even[b]);
      odd[b] = _mm512_fmadd_ps(_mm512_set1_ps(xf[b * in + i + 1]), a1, odd[b]);
    }
  }
  if (i < in) {
    const __m512 a0 = load16_masked(A + i * r, k0, r);
    for (int b = 0; b < NB; ++b) even[b] = _mm512_fmadd_ps(_mm512_set1_ps(xf[b * in + i]), a0, even[b]);
  }
  const int64_t lanes = std::min<int64_t>(kLanes, R - k0);
  for (int b = 0; b < NB; ++b) {
    alignas(64) float buf[kLanes];
    _mm512_store_ps(buf, _mm512_add_ps(even[b], odd[b]));
    std::copy(buf, buf + lanes, v + b * R + k0);
  }
}

// y[t, o0:o0+64] += v[t] @ B[:, o0:o0+64] for NB tokens; padded rows [r, R) multiply zero lanes.
template <int NB, typename scalar_t>
void expand_block(const float* v, int64_t R, const scalar_t* B, int64_t r, int64_t out, int64_t o0, scalar_t* y,
                  int64_t y_stride) {
  __m512 c[NB][4];
  for (int b = 0; b < NB; ++b)
    for (int j = 0; j < 4; ++j) c[b][j] = _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t k = 0; k < R; ++k) {
    __m512 w[4];
    for (int j = 0; j < 4; ++j) w[j] = k < r ? load16(B + k * out + o0 + j * kLanes) : zero;
    for (int b = 0; b < NB; ++b) {
      const __m512 vk = _mm512_set1_ps(v[b * R + k]);
      for (int j = 0; j < 4; ++j) c[b][j] = _mm512_fmadd_ps(vk, w[j], c[b][j]);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int j = 0; j < 4; ++j) add_store16(y + b * y_stride + o0 + j * kLanes, c[b][j]);
}

template <typename F>
void for_token_blocks(int64_t n, F&& f) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) f(t, std::integral_constant<int, 4>{});
  if (n - t == 3) f(t, std::integral_constant<int, 3>{});
  if (n - t == 2) f(t, std::integral_constant<int, 2>{});
  if (n - t == 1) f(t, std::integral_constant<int, 1>{});
}
#endif

// v[t, 0:R] = x[t, :] @ A[:, 0:r], zero in the padded columns [r, R), for a segment's n tokens.
// The padded columns are computed (multiplied by zero lanes), so BGMV pays for its padding.
template <typename scalar_t>
void shrink(const scalar_t* x, int64_t x_stride, int64_t n, const scalar_t* A, int64_t in, int64_t r,
            int64_t R, float* v) {
  std::vector<float> xf(n * in);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < in; ++i) xf[t * in + i] = load1(x + t * x_stride + i);
#ifdef __AVX512F__
  for_token_blocks(n, [&](int64_t t0, auto nb) {
    for (int64_t k0 = 0; k0 < R; k0 += kLanes)
      shrink_block<decltype(nb)::value>(xf.data() + t0 * in, in, A, r, k0, v + t0 * R, R);
  });
#else
  std::fill(v, v + n * R, 0.f);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < in; ++i)
      for (int64_t k = 0; k < R; ++k) v[t * R + k] += xf[t * in + i] * (k < r ? load1(A + i * r + k) : 0.f);
#endif
}

// y[t, :] += v[t, 0:R] @ B[0:R, :] (B zero in the padded rows [r, R)) for a segment's n tokens.
template <typename scalar_t>
void expand(const float* v, int64_t R, int64_t n, const scalar_t* B, int64_t r, int64_t out, scalar_t* y,
            int64_t y_stride) {
  int64_t o0 = 0;
#ifdef __AVX512F__
  for (; o0 + 4 * kLanes <= out; o0 += 4 * kLanes)
    for_token_blocks(n, [&](int64_t t0, auto nb) {
      expand_block<decltype(nb)::value>(v + t0 * R, R, B, r, out, o0, y + t0 * y_stride, y_stride);
    });
#endif
  for (int64_t t = 0; t < n; ++t) {
    const float* vt = v + t * R;
    for (int64_t o = o0; o < out; ++o) {
      float acc = 0.f;
      for (int64_t k = 0; k < R; ++k) acc += vt[k] * (k < r ? load1(B + k * out + o) : 0.f);
      store_add1(y + t * y_stride + o, acc);
    }
  }
}

// ---- short bf16 segments on bf16 pair dot products (vdpbf16ps) ----------------------------
// A decode token's delta is bf16(bf16(x @ A) @ B), rounded as the long path and PEFT's two bf16
// linears round it. Each sum runs over pairs of inputs: the pair (row i, row i + 1) of A or B is
// built in registers from two adjacent rows, so the weights are read once, where they lie.

constexpr int64_t kMaxDotRank = 64;  // ranks (or pad ranks) above this take the float loop

#if defined(__AVX512BF16__)
constexpr int64_t kPrefetchAhead = 4096;  // bytes of A requested ahead of the rows in use

inline __mmask32 first_lanes(int64_t n) {
  return n >= 32 ? ~__mmask32{0} : n <= 0 ? __mmask32{0} : static_cast<__mmask32>((1u << n) - 1u);
}

// Lanes [c0, c0 + 32) of rows `even` and `even + ld` (the odd row absent when !has_odd; lanes at
// and beyond `valid` zero) as two vectors of 16 bf16 pairs, interleaved within 128-bit lanes:
// `lo` holds lanes {0-3, 8-11, 16-19, 24-27}, `hi` {4-7, 12-15, 20-23, 28-31} (see in_order).
inline void load_pairs(const uint16_t* even, int64_t ld, bool has_odd, int64_t c0, int64_t valid, __m512i& lo,
                       __m512i& hi) {
  const __mmask32 m = first_lanes(valid - c0);
  const __m512i e = _mm512_maskz_loadu_epi16(m, even + c0);
  const __m512i o = has_odd ? _mm512_maskz_loadu_epi16(m, even + ld + c0) : _mm512_setzero_si512();
  lo = _mm512_unpacklo_epi16(e, o);
  hi = _mm512_unpackhi_epi16(e, o);
}

// Sums over load_pairs' `lo` and `hi` vectors back in lane order: lanes 0-15, then 16-31.
inline void in_order(__m512 lo, __m512 hi, __m512& first, __m512& second) {
  static const __m512i kFirst = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  static const __m512i kSecond = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  first = _mm512_permutex2var_ps(lo, kFirst, hi);
  second = _mm512_permutex2var_ps(lo, kSecond, hi);
}

// The bf16 pair (p[0], p[1]) broadcast to every lane (one 32-bit load).
inline __m512i pair_at(const uint16_t* p) {
  int32_t both;
  std::memcpy(&both, p, sizeof(both));
  return _mm512_set1_epi32(both);
}

inline __m512 dot_pairs(__m512 acc, __m512i w, __m512i x) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(w), reinterpret_cast<__m512bh>(x));
}

// vb[t, 0:Re] = bf16(x[t] @ A[:, 0:R]) for NB tokens (zero in the padded columns [r, Re)),
// A [in, r] streamed once. R <= 64: two blocks of 32 ranks per token.
template <int NB>
void shrink_dot(const uint16_t* x, int64_t ldx, const uint16_t* A, int64_t in, int64_t r, int64_t R, int64_t Re,
                uint16_t* vb) {
  __m512 acc[NB][4];
  for (int b = 0; b < NB; ++b)
    for (int c = 0; c < 4; ++c) acc[b][c] = _mm512_setzero_ps();
  const int64_t blocks = (R + 2 * kLanes - 1) / (2 * kLanes);
  auto pass = [&](int64_t i, bool has_odd, const __m512i* xp) {
    for (int64_t blk = 0; blk < blocks; ++blk) {
      __m512i lo, hi;
      load_pairs(A + i * r, r, has_odd, blk * 2 * kLanes, r, lo, hi);
      for (int b = 0; b < NB; ++b) {
        acc[b][2 * blk] = dot_pairs(acc[b][2 * blk], lo, xp[b]);
        acc[b][2 * blk + 1] = dot_pairs(acc[b][2 * blk + 1], hi, xp[b]);
      }
    }
  };
  const char* bytes = reinterpret_cast<const char*>(A);
  int64_t fetched = 0;  // bytes of A prefetched so far
  int64_t i = 0;
  for (; i + 1 < in; i += 2) {
    for (const int64_t want = std::min(in * r * 2, (i + 2) * r * 2 + kPrefetchAhead); fetched < want; fetched += 64)
      _mm_prefetch(bytes + fetched, _MM_HINT_T0);
    __m512i xp[NB];
    for (int b = 0; b < NB; ++b) xp[b] = pair_at(x + b * ldx + i);
    pass(i, true, xp);
  }
  if (i < in) {  // odd input count: the last row pairs with zero
    __m512i xp[NB];
    for (int b = 0; b < NB; ++b) xp[b] = _mm512_set1_epi32(x[b * ldx + i]);
    pass(i, false, xp);
  }
  for (int b = 0; b < NB; ++b) {
    alignas(64) uint16_t row[4 * kLanes];
    for (int64_t blk = 0; blk < 2; ++blk) {
      __m512 first, second;
      in_order(acc[b][2 * blk], acc[b][2 * blk + 1], first, second);
      _mm256_store_si256(reinterpret_cast<__m256i*>(row + 2 * blk * kLanes), (__m256i)_mm512_cvtneps_pbh(first));
      _mm256_store_si256(reinterpret_cast<__m256i*>(row + (2 * blk + 1) * kLanes), (__m256i)_mm512_cvtneps_pbh(second));
    }
    std::copy(row, row + Re, vb + b * Re);  // lanes [R, Re) are zero: A's lanes beyond r read as zero
  }
}

// For NB tokens, sink(t, col, lanes, delta) with delta = bf16(vb[t] @ B[0:Re, col:col + lanes]) as
// floats, 16 columns at a time (lanes < 16 only at the end of a row); B [r, out] streamed in
// 64-column blocks, its padded rows [r, Re) read as zero.
template <int NB, typename Sink>
void expand_dot(const uint16_t* vb, int64_t Re, const uint16_t* B, int64_t r, int64_t out, Sink&& sink) {
  for (int64_t o0 = 0; o0 < out; o0 += 4 * kLanes) {
    __m512 acc[NB][4];
    for (int b = 0; b < NB; ++b)
      for (int c = 0; c < 4; ++c) acc[b][c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < Re; k += 2) {
      __m512i w[4];
      const uint16_t* row = B + k * out + o0;
      const int64_t valid = k < r ? out - o0 : 0;
      for (int64_t pair = 0; pair < 2 && k + pair < r && o0 + 4 * kLanes < out; ++pair)  // the next block's rows
        for (int64_t half = 0; half < 2; ++half)
          _mm_prefetch(reinterpret_cast<const char*>(row + pair * out + (4 + 2 * half) * kLanes), _MM_HINT_T0);
      load_pairs(row, out, k + 1 < r, 0, valid, w[0], w[1]);
      load_pairs(row, out, k + 1 < r, 2 * kLanes, valid, w[2], w[3]);
      for (int b = 0; b < NB; ++b) {
        const __m512i vp = pair_at(vb + b * Re + k);
        for (int c = 0; c < 4; ++c) acc[b][c] = dot_pairs(acc[b][c], w[c], vp);
      }
    }
    for (int b = 0; b < NB; ++b) {
      __m512 sums[4];
      in_order(acc[b][0], acc[b][1], sums[0], sums[1]);
      in_order(acc[b][2], acc[b][3], sums[2], sums[3]);
      for (int c = 0; c < 4 && o0 + c * kLanes < out; ++c) {
        const int64_t col = o0 + c * kLanes;
        sink(b, col, std::min<int64_t>(kLanes, out - col), _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(sums[c])));
      }
    }
  }
}

// For every token of rows [0, n) (x rows ``ldx`` apart), sink(t, col, lanes, delta) with the
// token's rounded delta bf16(bf16(x[t] @ A) @ B) (see expand_dot); R: the rank the sums run to
// (BGMV's pad rank, else A's), <= 64. Each token's sums do not depend on the tokens beside it.
template <typename Sink>
void short_rows_dot(const uint16_t* x, int64_t ldx, int64_t n, int64_t in, const uint16_t* A, const uint16_t* B,
                    int64_t r, int64_t R, int64_t out, Sink&& sink) {
  const int64_t Re = (R + 1) / 2 * 2;
  uint16_t vb[4 * kMaxDotRank];
  for_token_blocks(n, [&](int64_t t0, auto nb) {
    constexpr int NB = decltype(nb)::value;
    shrink_dot<NB>(x + t0 * ldx, ldx, A, in, r, R, Re, vb);
    expand_dot<NB>(vb, Re, B, r, out, [&](int b, int64_t col, int64_t lanes, __m512 delta) {
      sink(t0 + b, col, lanes, delta);
    });
  });
}

inline const uint16_t* bits_of(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

// One short bf16 segment on the pair dot products: y[t] = bf16(y[t] + delta) (R <= 64, see short_rows_dot).
void run_segment_dot(const Item& it, const at::Tensor& y, const at::Tensor& x, const at::Tensor& A,
                     const at::Tensor& B, int64_t R) {
  const int64_t ldy = y.stride(0);
  at::BFloat16* yp = y.data_ptr<at::BFloat16>() + it.start * ldy;
  short_rows_dot(bits_of(x) + it.start * x.stride(0), x.stride(0), it.end - it.start, x.size(1), bits_of(A),
                 bits_of(B), A.size(1), R, y.size(1), [&](int64_t t, int64_t col, int64_t lanes, __m512 delta) {
                   at::BFloat16* dst = yp + t * ldy + col;
                   const __m512 sum = _mm512_add_ps(load16_masked(dst, 0, lanes), delta);
                   _mm256_mask_storeu_epi16(dst, static_cast<__mmask16>(first_lanes(lanes)),
                                            (__m256i)_mm512_cvtneps_pbh(sum));
                 });
}
#endif

template <typename scalar_t>
void run_segment(const Item& it, const at::Tensor& y, const at::Tensor& x, const at::Tensor& A,
                 const at::Tensor& B, int64_t pad_rank) {
  const int64_t in = x.size(1), out = y.size(1), r = A.size(1);
  const int64_t R = pad_rank > 0 ? pad_rank : r;
  const int64_t n = it.end - it.start;
  std::vector<float> v(n * R);
  shrink(x.data_ptr<scalar_t>() + it.start * x.stride(0), x.stride(0), n, A.data_ptr<scalar_t>(), in, r, R, v.data());
  expand(v.data(), R, n, B.data_ptr<scalar_t>(), r, out, y.data_ptr<scalar_t>() + it.start * y.stride(0), y.stride(0));
}

at::Tensor padded(const at::Tensor& w, int64_t dim, int64_t target) {
  const int64_t have = w.size(dim);
  if (have == target) return w;
  std::vector<int64_t> pad = dim == 1 ? std::vector<int64_t>{0, target - have} : std::vector<int64_t>{0, 0, 0, target - have};
  return at::constant_pad_nd(w, pad, 0);
}

// ---- long segments on the batch-reduce GEMM (bf16) -----------------------------------------

constexpr int64_t kRowBlock = 32;       // rows of x per GEMM
constexpr int64_t kColBlock = 64;       // output columns per expand GEMM
constexpr int64_t kMaxPairedRank = 64;  // larger ranks go to BLAS
constexpr int64_t kDotColumns = 16;     // dot_gemm takes N in multiples of this

int64_t max_rank(const std::vector<Item>& items, const std::vector<at::Tensor>& A) {
  int64_t r = 0;
  for (const auto& it : items) r = std::max(r, A[it.adapter].size(1));
  return r;
}

// Whether torch's batch-reduce GEMM runs bf16 here (on AMX).
bool matrix_units() { return at::native::cpublas::could_pack(at::kBFloat16); }

// Whether long segments of this dtype, at ranks up to ``rank``, with ``in`` inputs and ``out`` outputs,
// run on the pair GEMMs here (dot_gemm.h): the batch-reduce GEMM, or without AMX the bf16
// dot-product GEMM, which takes an even ``in`` and ``out`` a multiple of 16.
bool paired_path(at::ScalarType dtype, int64_t rank, int64_t in, int64_t out) {
  if (dtype != at::kBFloat16 || rank > kMaxPairedRank) return false;
  if (matrix_units()) return true;
#if defined(__AVX512BF16__)
  return in % 2 == 0 && out % kDotColumns == 0;
#else
  return false;
#endif
}

// Whether short segments of this dtype, at ranks (or BGMV's pad rank) up to ``rank``, run on the
// bf16 pair dot products here.
bool dot_path(at::ScalarType dtype, int64_t rank) {
#if defined(__AVX512BF16__)
  return dtype == at::kBFloat16 && rank <= kMaxDotRank;
#else
  return false;
#endif
}

// w: [k, n] bf16 -> [kp / 2, np, 2]: rows in pairs (the GEMM's B layout), zero-padded to kp
// (even) rows and np columns.
std::vector<at::BFloat16> pair_rows(const at::Tensor& w, int64_t kp, int64_t np) {
  const int64_t k = w.size(0), n = w.size(1);
  const auto* src = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  std::vector<at::BFloat16> out(kp * np, at::BFloat16(0.f));
  auto* dst = reinterpret_cast<uint16_t*>(out.data());
  for (int64_t i = 0; i < k; i += 2) {
    const uint16_t* even = src + i * n;
    uint16_t* pair = dst + i * np;  // row pair i / 2: np columns of 2
    if (i + 1 < k) {
      const uint16_t* odd = even + n;
      for (int64_t j = 0; j < n; ++j) {
        pair[2 * j] = even[j];
        pair[2 * j + 1] = odd[j];
      }
    } else {
      for (int64_t j = 0; j < n; ++j) pair[2 * j] = even[j];
    }
  }
  return out;
}

// One long segment's adapter as the GEMMs read it: A [in, R] and B [R, out] in pairs, the rank
// padded to R (BGMV's pad rank, else the adapter's own) and to an even count for B. Without
// matrix units A's columns are zero-padded to a multiple of 16 (``a_cols``), as dot_gemm takes them.
struct PairedAdapter {
  int64_t rank = 0, even_rank = 0, a_cols = 0;
  std::vector<at::BFloat16> a, b;
  PairedAdapter() = default;
  PairedAdapter(const at::Tensor& A, const at::Tensor& B, int64_t R, bool units)
      : rank(R), even_rank((R + 1) / 2 * 2), a_cols(units ? R : (R + kDotColumns - 1) / kDotColumns * kDotColumns),
        a(pair_rows(A, A.size(0), a_cols)), b(pair_rows(B, even_rank, B.size(1))) {}
};

// Rows [i0, i0 + rows) of a long segment (x rows ``lda`` apart): v = bf16(x @ A), then for each
// block of output columns, sink(col, width, c) with c = v @ B[:, col:col + width] in float
// ([rows, width], contiguous). rows <= kRowBlock.
template <typename Sink>
void long_rows(bool units, const at::BFloat16* x, int64_t lda, int64_t rows, int64_t in, int64_t out,
               const PairedAdapter& w, Sink&& sink) {
  float c[kRowBlock * std::max(kColBlock, kMaxPairedRank)];
  at::BFloat16 v[kRowBlock * kMaxPairedRank];
  pair_gemm(units, rows, w.a_cols, in, lda, w.a_cols, w.a_cols, x, w.a.data(), c);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < w.rank; ++j) v[i * w.even_rank + j] = at::BFloat16(c[i * w.a_cols + j]);
    if (w.even_rank > w.rank) v[i * w.even_rank + w.rank] = at::BFloat16(0.f);
  }
  for (int64_t col = 0; col < out; col += kColBlock) {
    const int64_t width = std::min(kColBlock, out - col);
    pair_gemm(units, rows, width, w.even_rank, w.even_rank, out, width, v, w.b.data() + col * 2, c);
    sink(col, width, c);
  }
}

// dst[0:n] = bf16(dst + bf16(c)): a delta rounded to bf16, then added, rounded again (as
// ``y += bf16 GEMM output`` rounds).
void add_rounded(at::BFloat16* dst, const float* c, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512BF16__)
  for (; j + 16 <= n; j += 16) {
    const __m512 delta = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(_mm512_loadu_ps(c + j)));
    const __m512 sum = _mm512_add_ps(load16(dst + j), delta);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), (__m256i)_mm512_cvtneps_pbh(sum));
  }
#endif
  for (; j < n; ++j) dst[j] = at::BFloat16(static_cast<float>(dst[j]) + static_cast<float>(at::BFloat16(c[j])));
}

// y[seg] = bf16(y[seg] + bf16(delta)) for every long segment, 32-row blocks dealt to the threads.
void long_segments_paired(at::Tensor& y, const at::Tensor& x, const std::vector<Item>& large,
                          const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& B, int64_t pad_rank) {
  const bool units = matrix_units();
  std::vector<PairedAdapter> paired(large.size());
  at::parallel_for(0, (int64_t)large.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t s = lo; s < hi; ++s) {
      const at::Tensor& a = A[large[s].adapter];
      paired[s] = PairedAdapter(a, B[large[s].adapter], pad_rank > 0 ? pad_rank : a.size(1), units);
    }
  });
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (segment, first row)
  for (size_t s = 0; s < large.size(); ++s)
    for (int64_t row = large[s].start; row < large[s].end; row += kRowBlock) blocks.emplace_back(s, row);
  const int64_t in = x.size(1), out = y.size(1), lda = x.stride(0), ldy = y.stride(0);
  const auto* xp = x.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, (int64_t)blocks.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const auto [s, row] = blocks[k];
      const int64_t rows = std::min(kRowBlock, large[s].end - row);
      long_rows(units, xp + row * lda, lda, rows, in, out, paired[s], [&](int64_t col, int64_t width, const float* c) {
        for (int64_t i = 0; i < rows; ++i) add_rounded(yp + (row + i) * ldy + col, c + i * width, width);
      });
    }
    if (units) at::native::cpublas::brgemm_release();
  });
}

void long_segments_blas(at::Tensor& y, const at::Tensor& x, const std::vector<Item>& large,
                        const std::vector<at::Tensor>& A, const std::vector<at::Tensor>& B, int64_t pad_rank) {
  for (const auto& it : large) {
    at::Tensor a = A[it.adapter], b = B[it.adapter];
    if (pad_rank > 0) {
      a = padded(a, 1, pad_rank);
      b = padded(b, 0, pad_rank);
    }
    y.narrow(0, it.start, it.end - it.start).add_(at::mm(at::mm(x.narrow(0, it.start, it.end - it.start), a), b));
  }
}

// Short segments dealt into `threads` shares of about equal work, largest first, each to the
// share with the least so far. A segment's work: its weights (the rank it computes at) times its
// passes over them (4 tokens each); a thread's share is its adapters' bytes, not its count.
std::vector<std::vector<Item>> deal_by_size(const std::vector<Item>& items, const std::vector<at::Tensor>& A,
                                            const std::vector<at::Tensor>& B, int64_t pad_rank, int64_t threads) {
  auto work = [&](const Item& it) {
    const at::Tensor& a = A[it.adapter];
    const int64_t R = pad_rank > 0 ? pad_rank : a.size(1);
    return R * (a.size(0) + B[it.adapter].size(1)) * ((it.end - it.start + 3) / 4);
  };
  std::vector<Item> order(items);
  std::stable_sort(order.begin(), order.end(), [&](const Item& p, const Item& q) { return work(p) > work(q); });
  const int64_t count = std::max<int64_t>(1, std::min<int64_t>(threads, (int64_t)order.size()));
  std::vector<std::vector<Item>> shares(count);
  std::vector<int64_t> load(count, 0);
  for (const Item& it : order) {
    const auto least = std::min_element(load.begin(), load.end()) - load.begin();
    shares[least].push_back(it);
    load[least] += work(it);
  }
  return shares;
}

}  // namespace

void lora_segments_(at::Tensor y, at::Tensor x, at::Tensor segs, std::vector<at::Tensor> A,
                    std::vector<at::Tensor> B, int64_t pad_rank) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "x [T, in] and y [T, out] expected");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "rows of x and y must be contiguous");
  TORCH_CHECK(segs.dim() == 2 && segs.size(1) == 3 && segs.scalar_type() == at::kLong, "segs must be int64 [G, 3]");
  TORCH_CHECK(A.size() == B.size(), "A and B lists differ in length");
  const auto* s = segs.data_ptr<int64_t>();
  std::vector<Item> small;
  std::vector<Item> large;
  for (int64_t g = 0; g < segs.size(0); ++g) {
    Item it{s[3 * g], s[3 * g + 1], s[3 * g + 2]};
    TORCH_CHECK(it.adapter >= 0 && it.adapter < (int64_t)A.size(), "segment adapter index out of range");
    TORCH_CHECK(0 <= it.start && it.start <= it.end && it.end <= x.size(0), "segment out of range");
    const auto& a = A[it.adapter];
    if (a.numel() == 0 || it.end == it.start) continue;
    TORCH_CHECK(a.is_contiguous() && B[it.adapter].is_contiguous(), "adapter weights must be contiguous");
    TORCH_CHECK(a.scalar_type() == x.scalar_type() && B[it.adapter].scalar_type() == x.scalar_type(),
                "adapter dtype must match activations");
    TORCH_CHECK(a.size(0) == x.size(1) && B[it.adapter].size(1) == y.size(1) && B[it.adapter].size(0) == a.size(1),
                "adapter shape mismatch");
    TORCH_CHECK(pad_rank == 0 || pad_rank >= a.size(1), "pad_rank below an adapter's rank");
    const bool paired = paired_path(x.scalar_type(), std::max(pad_rank, a.size(1)), x.size(1), y.size(1));
    if (it.end - it.start >= (paired ? kPairedThreshold : kBlasThreshold)) {
      large.push_back(it);
      continue;
    }
    small.push_back(it);
  }
  if (!large.empty()) {
    if (paired_path(x.scalar_type(), std::max(pad_rank, max_rank(large, A)), x.size(1), y.size(1)))
      long_segments_paired(y, x, large, A, B, pad_rank);
    else
      long_segments_blas(y, x, large, A, B, pad_rank);
  }
  if (small.empty()) return;
  const auto shares = deal_by_size(small, A, B, pad_rank, at::get_num_threads());
  auto run_all = [&](auto tag) {
    using scalar_t = decltype(tag);
    at::parallel_for(0, (int64_t)shares.size(), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t share = lo; share < hi; ++share)
        for (const Item& it : shares[share]) {
          const at::Tensor& a = A[it.adapter];
#if defined(__AVX512BF16__)
          const int64_t R = pad_rank > 0 ? pad_rank : a.size(1);
          if (dot_path(x.scalar_type(), R)) {
            run_segment_dot(it, y, x, a, B[it.adapter], R);
            continue;
          }
#endif
          run_segment<scalar_t>(it, y, x, a, B[it.adapter], pad_rank);
        }
    });
  };
  if (x.scalar_type() == at::kBFloat16) {
    run_all(at::BFloat16{});
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "float32 or bfloat16 activations expected");
    run_all(float{});
  }
}

// The operands of long_delta and short_delta: x [n, in] and out [n, out] (float32) with contiguous
// rows, A [in, r] and B [r, out] contiguous, all three in bf16.
void check_delta_operands(const at::Tensor& out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && out.dim() == 2 && out.stride(1) == 1 && out.size(0) == x.size(0),
              "x [n, in] and out [n, out] with contiguous rows expected");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "out must be float32");
  TORCH_CHECK(A.is_contiguous() && B.is_contiguous() && A.size(0) == x.size(1) && B.size(0) == A.size(1) &&
              B.size(1) == out.size(1), "adapter shape mismatch");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && A.scalar_type() == at::kBFloat16 && B.scalar_type() == at::kBFloat16,
              "bf16 operands expected");
}

// out = float(bf16(bf16(x @ A) @ B)): the delta a long segment's rows get from lora_segments_,
// for rows of a segment on their own (x: [n, in] bf16, out: [n, out] float32 with contiguous rows).
void long_delta(at::Tensor out, at::Tensor x, at::Tensor A, at::Tensor B) {
  check_delta_operands(out, x, A, B);
  TORCH_CHECK(A.size(1) <= kMaxPairedRank, "long_delta takes ranks up to ", kMaxPairedRank);
  TORCH_CHECK(paired_path(x.scalar_type(), A.size(1), x.size(1), out.size(1)), "long_delta needs the pair GEMMs");
  const bool units = matrix_units();
  const PairedAdapter w(A, B, A.size(1), units);
  const int64_t n = x.size(0), lda = x.stride(0), ldo = out.stride(0);
  const auto* xp = x.data_ptr<at::BFloat16>();
  float* op = out.data_ptr<float>();
  for (int64_t row = 0; row < n; row += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, n - row);
    long_rows(units, xp + row * lda, lda, rows, x.size(1), out.size(1), w, [&](int64_t col, int64_t width, const float* c) {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < width; ++j)
          op[(row + i) * ldo + col + j] = static_cast<float>(at::BFloat16(c[i * width + j]));
    });
  }
  if (units) at::native::cpublas::brgemm_release();
}

// Whether long_delta runs here for this rank and shape (else lora_segments_ takes long segments to BLAS too).
bool long_delta_available(int64_t rank, int64_t in, int64_t out) { return paired_path(at::kBFloat16, rank, in, out); }

// out = float(bf16(bf16(x @ A) @ B)) as lora_segments_ computes a short bf16 segment's rows, for
// rows of a segment on their own (operands as long_delta's).
void short_delta(at::Tensor out, at::Tensor x, at::Tensor A, at::Tensor B) {
  check_delta_operands(out, x, A, B);
  TORCH_CHECK(dot_path(x.scalar_type(), A.size(1)), "short_delta needs ranks up to ", kMaxDotRank, " and AVX512-BF16");
#if defined(__AVX512BF16__)
  float* op = out.data_ptr<float>();
  const int64_t ldo = out.stride(0);
  short_rows_dot(bits_of(x), x.stride(0), x.size(0), x.size(1), bits_of(A), bits_of(B), A.size(1), A.size(1),
                 out.size(1), [&](int64_t t, int64_t col, int64_t lanes, __m512 delta) {
                   _mm512_mask_storeu_ps(op + t * ldo + col, static_cast<__mmask16>(first_lanes(lanes)), delta);
                 });
#endif
}

// Whether short_delta runs here for this rank (else lora_segments_ runs short bf16 segments in float32).
bool short_delta_available(int64_t rank) { return dot_path(at::kBFloat16, rank); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_segments_", &lora_segments_, "y[seg] += x[seg] @ A[u] @ B[u] over segments (in place)");
  m.def("long_delta", &long_delta, "A long segment's rounded bf16 delta, for rows on their own, into float32");
  m.def("long_delta_available", &long_delta_available, "Whether long_delta runs here for this rank, in and out");
  m.def("short_delta", &short_delta, "A short segment's rounded bf16 delta, for rows on their own, into float32");
  m.def("short_delta_available", &short_delta_available, "Whether short_delta runs here for this rank");
}
