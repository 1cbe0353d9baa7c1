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
//   A[u] and B[u] may also come in the pair layouts that pack_a and pack_b make (see "the pair
//   layouts" below; services/gpu_worker/lora_ops.py kernel_layout); both bf16 pair paths read those
//   in place and put plain weights in them per call; the other paths unpack them.
//
// Short segments (decode tokens) are dealt to the threads by their weights' bytes; each reads its
// adapter's weights once per 4 tokens. In bf16 (rank <= 64, even in, AVX512-BF16) they run on bf16
// pair dot products that round x @ A and the delta as the long path does, the weights streamed
// front to back and prefetched ahead of use (docs/engine_performance.md rounds 6 and 10);
// otherwise in a fused float32 loop that rounds only the sum.
// Long segments (prefill) compute x @ A, round it to the model dtype, multiply by B and round the
// delta before adding it: in bf16 on the pair GEMMs of dot_gemm.h (torch's batch-reduce GEMM with
// AMX, else bf16 pair dot products, which take an even input and a multiple of 16 outputs) over
// 32-row blocks of every long segment at once, A and B read in their pair layouts; elsewhere
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

// ---- the pair layouts of A and B ---------------------------------------------------------------
// Both bf16 pair paths read A [in, r] in pairs, [in / 2, r, 2]: row pair (i, i + 1) as r bf16 pairs;
// and B [r, out] in blocked pairs: for each block of 64 output columns, its row pairs (k, k + 1)
// one after another, each as 64 bf16 pairs, zero past row r and column out: [ceil(out / 64),
// pairs, 64, 2]. pack_a and pack_b make them once per adapter load (lora_ops.kernel_layout), so a
// decode step streams both front to back; plain weights are put in them per call.

constexpr int64_t kBlockColumns = 64;

int64_t column_blocks(int64_t out) { return (out + kBlockColumns - 1) / kBlockColumns; }

bool is_blocked(const at::Tensor& B) { return B.dim() == 4; }
bool is_paired(const at::Tensor& A) { return A.dim() == 3; }

inline const uint16_t* bits_of(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

// Weights in one of the pair layouts, as a pair path reads them: a laid-out tensor read in place,
// or a copy laid out for this call (written through ``fill``).
class LaidOut {
 public:
  LaidOut() = default;
  explicit LaidOut(const at::Tensor& laid_out) : borrowed_(bits_of(laid_out)) {}
  explicit LaidOut(int64_t elements) : owned_(elements) {}
  uint16_t* fill() { return owned_.data(); }
  const uint16_t* data() const { return owned_.empty() ? borrowed_ : owned_.data(); }

 private:
  const uint16_t* borrowed_ = nullptr;
  std::vector<uint16_t> owned_;
};

// A's plain [in, r] matrix: A itself, or a paired A unpacked.
at::Tensor plain_a(const at::Tensor& A) {
  if (!is_paired(A)) return A;
  return A.permute({0, 2, 1}).reshape({A.size(0) * 2, A.size(1)}).contiguous();
}

// Whether A is a plain [in, r] matrix or in pairs [in / 2, r, 2] (in even).
bool a_shape_ok(const at::Tensor& A, int64_t in) {
  if (!is_paired(A)) return A.dim() == 2 && A.size(0) == in;
  return in % 2 == 0 && A.size(0) == in / 2 && A.size(2) == 2;
}

// dst [in / 2, cols, 2] = A (plain [in, r] or paired; in even, cols >= r) in pairs, zero past column r.
void pair_columns(const at::Tensor& A, int64_t cols, uint16_t* dst) {
  const at::Tensor a = plain_a(A);
  const int64_t in = a.size(0), r = a.size(1);
  const uint16_t* src = bits_of(a);
  std::fill(dst, dst + in * cols, uint16_t{0});
  for (int64_t i = 0; i < in; ++i)
    for (int64_t c = 0; c < r; ++c) dst[(i / 2 * cols + c) * 2 + i % 2] = src[i * r + c];
}

// A as the pair paths read it, ``cols`` >= r pairs per row pair (zero past r): a paired A that has
// them in place, else a paired copy.
class PairedA {
 public:
  PairedA() = default;
  PairedA(const at::Tensor& A, int64_t cols) : cols(cols) {
    if (is_paired(A) && A.size(1) == cols) {
      w_ = LaidOut(A);
      return;
    }
    w_ = LaidOut((is_paired(A) ? A.size(0) * 2 : A.size(0)) * cols);
    pair_columns(A, cols, w_.fill());
  }
  const uint16_t* data() const { return w_.data(); }
  int64_t cols = 0;

 private:
  LaidOut w_;
};

// B's plain [r, out] matrix: B itself, or a blocked B unpacked (for the paths that read B plain).
at::Tensor plain_b(const at::Tensor& B, int64_t r, int64_t out) {
  if (!is_blocked(B)) return B;
  return B.permute({1, 3, 0, 2}).reshape({B.size(1) * 2, B.size(0) * kBlockColumns}).narrow(0, 0, r)
      .narrow(1, 0, out).contiguous();
}

// dst = plain B [r, out] (bf16, contiguous) in blocked pairs with `pairs` >= ceil(r / 2) row pairs.
void block_pairs(const at::Tensor& B, int64_t pairs, uint16_t* dst) {
  const int64_t r = B.size(0), out = B.size(1);
  const uint16_t* src = bits_of(B);
  std::fill(dst, dst + column_blocks(out) * pairs * 2 * kBlockColumns, uint16_t{0});
  for (int64_t k = 0; k < r; ++k) {
    const uint16_t* row = src + k * out;
    for (int64_t col = 0; col < out; ++col)
      dst[((col / kBlockColumns * pairs + k / 2) * kBlockColumns + col % kBlockColumns) * 2 + k % 2] = row[col];
  }
}

// Whether B is a plain [r, out] matrix or r and out in blocked pairs (as pack_b makes them).
bool b_shape_ok(const at::Tensor& B, int64_t r, int64_t out) {
  if (!is_blocked(B)) return B.dim() == 2 && B.size(0) == r && B.size(1) == out;
  return B.size(0) == column_blocks(out) && B.size(1) == (r + 1) / 2 && B.size(2) == kBlockColumns && B.size(3) == 2;
}

// B as the pair paths read it, with `pairs` row pairs per block: a blocked B that has them in
// place, else a blocked copy.
class BlockedB {
 public:
  BlockedB() = default;
  BlockedB(const at::Tensor& B, int64_t r, int64_t out, int64_t pairs) : pairs(pairs) {
    if (is_blocked(B) && B.size(1) == pairs) {
      w_ = LaidOut(B);
      return;
    }
    w_ = LaidOut(column_blocks(out) * pairs * 2 * kBlockColumns);
    block_pairs(plain_b(B, r, out), pairs, w_.fill());
  }
  const uint16_t* data() const { return w_.data(); }
  // The block that holds column `col`: [pairs, 64, 2].
  const uint16_t* block(int64_t col) const { return data() + col / kBlockColumns * pairs * 2 * kBlockColumns; }
  int64_t pairs = 0;

 private:
  LaidOut w_;
};

// ---- short bf16 segments on bf16 pair dot products (vdpbf16ps) ----------------------------
// A decode token's delta is bf16(bf16(x @ A) @ B), rounded as the long path and PEFT's two bf16
// linears round it. Each sum runs over pairs of inputs, read straight from A and B in their pair
// layouts: every load is 16 whole pairs, the next ones in memory.

constexpr int64_t kMaxDotRank = 64;  // ranks (or pad ranks) above this take the float loop

#if defined(__AVX512BF16__)
constexpr int64_t kPrefetchAhead = 4096;  // bytes of A or B requested ahead of the rows in use

inline __mmask32 first_lanes(int64_t n) {
  return n >= 32 ? ~__mmask32{0} : n <= 0 ? __mmask32{0} : static_cast<__mmask32>((1u << n) - 1u);
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

// vb[t, 0:Re] = bf16(x[t] @ A[:, 0:R]) for NB tokens (zero in the padded columns [r, Re)), C = ceil(R / 16)
// vectors of 16 ranks. A in pairs ([in / 2, r, 2], in even) streamed once, prefetched kPrefetchAhead
// bytes ahead; BGMV's padded columns [r, R) are multiplied as zeros. A row pair's C vectors are read
// with whole loads, their lanes past r zeroed in registers, except in the last row pairs, where
// whole loads would pass A's end (masked loads there). With the masked-load intrinsic in the main
// loop GCC stores every sum to the stack at every step (docs/engine_performance.md, round 10); the
// whole-load form still compiles to a masked load, but after the sums are placed in registers. Not
// inlined (nor is expand_dot): inlined into the segment loop, the same stores come back.
template <int NB, int C>
__attribute__((noinline)) void shrink_vecs(const uint16_t* x, int64_t ldx, const uint16_t* A, int64_t in, int64_t r,
                                           int64_t Re, uint16_t* vb) {
  __m512 acc[NB][C];
  for (int b = 0; b < NB; ++b)
    for (int c = 0; c < C; ++c) acc[b][c] = _mm512_setzero_ps();
  __mmask16 lanes[C];  // each vector's lanes below r
  for (int c = 0; c < C; ++c) lanes[c] = static_cast<__mmask16>(first_lanes(r - c * kLanes));
  auto pass = [&](int64_t i, bool near_end) {
    const uint16_t* row = A + i * r;  // row pair i / 2: r pairs
    __m512i xp[NB];
    for (int b = 0; b < NB; ++b) xp[b] = pair_at(x + b * ldx + i);
    for (int c = 0; c < C; ++c) {
      const uint16_t* at = row + 2 * kLanes * c;
      const __m512i w = near_end ? _mm512_maskz_loadu_epi32(lanes[c], at)
                                 : _mm512_maskz_mov_epi32(lanes[c], _mm512_loadu_si512(at));
      for (int b = 0; b < NB; ++b) acc[b][c] = dot_pairs(acc[b][c], w, xp[b]);
    }
  };
  // whole loads cover 16 C pairs from a row pair's start: inside A up to row pair in / 2 - 16 C / r
  const int64_t whole = std::max<int64_t>(0, in - 2 * ((kLanes * C + r - 1) / r));  // inputs read whole
  const char* bytes = reinterpret_cast<const char*>(A);
  const int64_t total = in * r * 2;
  int64_t fetched = 0;
  int64_t i = 0;
  for (; i < whole; i += 2) {
    for (const int64_t want = std::min(total, (i + 2) * r * 2 + kPrefetchAhead); fetched < want; fetched += 64)
      _mm_prefetch(bytes + fetched, _MM_HINT_T0);
    pass(i, false);
  }
  for (; i < in; i += 2) pass(i, true);
  for (int b = 0; b < NB; ++b)
    for (int c = 0; c < C; ++c)
      _mm256_mask_storeu_epi16(vb + b * Re + c * kLanes, static_cast<__mmask16>(first_lanes(Re - c * kLanes)),
                               (__m256i)_mm512_cvtneps_pbh(acc[b][c]));  // lanes [r, Re) are zero
}

// shrink_vecs for R <= 64.
template <int NB>
void shrink_dot(const uint16_t* x, int64_t ldx, const uint16_t* A, int64_t in, int64_t r, int64_t R, int64_t Re,
                uint16_t* vb) {
  switch ((R + kLanes - 1) / kLanes) {
    case 1: return shrink_vecs<NB, 1>(x, ldx, A, in, r, Re, vb);
    case 2: return shrink_vecs<NB, 2>(x, ldx, A, in, r, Re, vb);
    case 3: return shrink_vecs<NB, 3>(x, ldx, A, in, r, Re, vb);
    default: return shrink_vecs<NB, 4>(x, ldx, A, in, r, Re, vb);
  }
}

// For NB tokens, sink(t, col, lanes, delta) with delta = bf16(vb[t] @ B[0:Re, col:col + lanes]) as
// floats, 16 columns at a time (lanes < 16 only at the end of a row). B in blocked pairs (see
// BlockedB), read front to back and prefetched kPrefetchAhead bytes ahead (prefetches past its end
// do not fault); rows past the stored ones (BGMV's padding) are multiplied as zeros, not read.
template <int NB, typename Sink>
__attribute__((noinline)) void expand_dot(const uint16_t* vb, int64_t Re, const BlockedB& B, int64_t out, Sink&& sink) {
  const int64_t stored = std::min(Re / 2, B.pairs);
  for (int64_t o0 = 0; o0 < out; o0 += kBlockColumns) {
    const uint16_t* block = B.block(o0);
    __m512 acc[NB][4];
    for (int b = 0; b < NB; ++b)
      for (int c = 0; c < 4; ++c) acc[b][c] = _mm512_setzero_ps();
    int64_t p = 0;
    for (; p < stored; ++p) {
      const uint16_t* row = block + p * 2 * kBlockColumns;
      const char* ahead = reinterpret_cast<const char*>(row) + kPrefetchAhead;
      for (int q = 0; q < 4; ++q) _mm_prefetch(ahead + 64 * q, _MM_HINT_T0);
      __m512i w[4];
      for (int c = 0; c < 4; ++c) w[c] = _mm512_loadu_si512(row + 2 * kLanes * c);
      for (int b = 0; b < NB; ++b) {
        const __m512i vp = pair_at(vb + b * Re + 2 * p);
        for (int c = 0; c < 4; ++c) acc[b][c] = dot_pairs(acc[b][c], w[c], vp);
      }
    }
    for (; p < Re / 2; ++p)  // BGMV's padded rows: multiplied as zeros, not read
      for (int b = 0; b < NB; ++b) {
        const __m512i vp = pair_at(vb + b * Re + 2 * p);
        for (int c = 0; c < 4; ++c) acc[b][c] = dot_pairs(acc[b][c], _mm512_setzero_si512(), vp);
      }
    for (int b = 0; b < NB; ++b) {
      __m512 delta[4];  // acc is indexed by constants only, so that it stays in registers
      for (int c = 0; c < 4; ++c) delta[c] = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(acc[b][c]));
      for (int c = 0; c < 4 && o0 + c * kLanes < out; ++c)
        sink(b, o0 + c * kLanes, std::min<int64_t>(kLanes, out - o0 - c * kLanes), delta[c]);
    }
  }
}

// For every token of rows [0, n) (x rows ``ldx`` apart), sink(t, col, lanes, delta) with the
// token's rounded delta bf16(bf16(x[t] @ A) @ B) (see expand_dot); R: the rank the sums run to
// (BGMV's pad rank, else A's), <= 64. Each token's sums do not depend on the tokens beside it.
template <typename Sink>
void short_rows_dot(const uint16_t* x, int64_t ldx, int64_t n, int64_t in, const PairedA& A, const BlockedB& B,
                    int64_t r, int64_t R, int64_t out, Sink&& sink) {
  const int64_t Re = (R + 1) / 2 * 2;
  uint16_t vb[4 * kMaxDotRank];
  for_token_blocks(n, [&](int64_t t0, auto nb) {
    constexpr int NB = decltype(nb)::value;
    shrink_dot<NB>(x + t0 * ldx, ldx, A.data(), in, r, R, Re, vb);
    expand_dot<NB>(vb, Re, B, out, [&](int b, int64_t col, int64_t lanes, __m512 delta) {
      sink(t0 + b, col, lanes, delta);
    });
  });
}

// One short bf16 segment on the pair dot products: y[t] = bf16(y[t] + delta) (R <= 64, see short_rows_dot).
void run_segment_dot(const Item& it, const at::Tensor& y, const at::Tensor& x, const at::Tensor& A,
                     const at::Tensor& B, int64_t R) {
  const int64_t ldy = y.stride(0);
  at::BFloat16* yp = y.data_ptr<at::BFloat16>() + it.start * ldy;
  const int64_t r = A.size(1), out = y.size(1);
  short_rows_dot(bits_of(x) + it.start * x.stride(0), x.stride(0), it.end - it.start, x.size(1), PairedA(A, r),
                 BlockedB(B, r, out, (r + 1) / 2), r, R, out, [&](int64_t t, int64_t col, int64_t lanes, __m512 delta) {
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
constexpr int64_t kMaxPairedRank = 64;  // larger ranks go to BLAS
constexpr int64_t kDotColumns = 16;     // dot_gemm takes N in multiples of this

int64_t max_rank(const std::vector<Item>& items, const std::vector<at::Tensor>& A) {
  int64_t r = 0;
  for (const auto& it : items) r = std::max(r, A[it.adapter].size(1));
  return r;
}

// Whether long segments of this dtype, at ranks up to ``rank``, with ``in`` inputs and ``out`` outputs,
// run on the pair GEMMs here (dot_gemm.h): the batch-reduce GEMM, or without AMX the bf16
// dot-product GEMM, which also takes only ``out`` a multiple of 16. Both take A in pairs: ``in`` even.
bool paired_path(at::ScalarType dtype, int64_t rank, int64_t in, int64_t out) {
  if (dtype != at::kBFloat16 || rank > kMaxPairedRank || in % 2 != 0) return false;
  if (matrix_units()) return true;
#if defined(__AVX512BF16__)
  return out % kDotColumns == 0;
#else
  return false;
#endif
}

// Whether short segments of this dtype, at ranks (or BGMV's pad rank) up to ``rank``, with ``in``
// inputs, run on the bf16 pair dot products here (A in pairs: ``in`` even).
bool dot_path(at::ScalarType dtype, int64_t rank, int64_t in) {
#if defined(__AVX512BF16__)
  return dtype == at::kBFloat16 && 0 < rank && rank <= kMaxDotRank && in % 2 == 0;
#else
  return false;
#endif
}

// One long segment's adapter as the GEMMs read it: A [in, R] in pairs and B [R, out] in blocked
// pairs, the rank padded to R (BGMV's pad rank, else the adapter's own) and to an even count for B.
// Without matrix units A's columns are zero-padded to a multiple of 16 (``a_cols``), as dot_gemm
// takes them.
struct PairedAdapter {
  int64_t rank = 0, even_rank = 0, a_cols = 0;
  PairedA a;
  BlockedB b;
  PairedAdapter() = default;
  PairedAdapter(const at::Tensor& A, const at::Tensor& B, int64_t R, int64_t out, bool units)
      : rank(R), even_rank((R + 1) / 2 * 2), a_cols(units ? R : (R + kDotColumns - 1) / kDotColumns * kDotColumns),
        a(A, a_cols), b(B, A.size(1), out, even_rank / 2) {}
};

// Rows [i0, i0 + rows) of a long segment (x rows ``lda`` apart): v = bf16(x @ A), then for each
// block of output columns, sink(col, width, c) with c = v @ B[:, col:col + width] in float
// ([rows, width], contiguous). rows <= kRowBlock.
template <typename Sink>
void long_rows(bool units, const at::BFloat16* x, int64_t lda, int64_t rows, int64_t in, int64_t out,
               const PairedAdapter& w, Sink&& sink) {
  float c[kRowBlock * std::max(kBlockColumns, kMaxPairedRank)];
  at::BFloat16 v[kRowBlock * kMaxPairedRank];
  pair_gemm(units, rows, w.a_cols, in, lda, w.a_cols, w.a_cols, x, reinterpret_cast<const at::BFloat16*>(w.a.data()), c);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < w.rank; ++j) v[i * w.even_rank + j] = at::BFloat16(c[i * w.a_cols + j]);
    if (w.even_rank > w.rank) v[i * w.even_rank + w.rank] = at::BFloat16(0.f);
  }
  for (int64_t col = 0; col < out; col += kBlockColumns) {
    const int64_t width = std::min(kBlockColumns, out - col);
    const auto* block = reinterpret_cast<const at::BFloat16*>(w.b.block(col));
    pair_gemm(units, rows, width, w.even_rank, w.even_rank, kBlockColumns, width, v, block, c);
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
      paired[s] = PairedAdapter(a, B[large[s].adapter], pad_rank > 0 ? pad_rank : a.size(1), y.size(1), units);
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
    at::Tensor a = plain_a(A[it.adapter]), b = plain_b(B[it.adapter], a.size(1), y.size(1));
    if (pad_rank > 0) {
      a = padded(a, 1, pad_rank);
      b = padded(b, 0, pad_rank);
    }
    y.narrow(0, it.start, it.end - it.start).add_(at::mm(at::mm(x.narrow(0, it.start, it.end - it.start), a), b));
  }
}

// Short segments dealt into `threads` shares of about equal work, largest first, each to the
// share with the least so far. A segment's work: its weights (the rank it computes at) times its
// passes over them (4 tokens each); a thread's share is its adapters' bytes, not its count. Every
// segment has the same input and output counts, so the rank stands for the weights.
std::vector<std::vector<Item>> deal_by_size(const std::vector<Item>& items, const std::vector<at::Tensor>& A,
                                            int64_t pad_rank, int64_t threads) {
  auto work = [&](const Item& it) {
    const int64_t R = pad_rank > 0 ? pad_rank : A[it.adapter].size(1);
    return R * ((it.end - it.start + 3) / 4);
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
    TORCH_CHECK(a_shape_ok(a, x.size(1)) && b_shape_ok(B[it.adapter], a.size(1), y.size(1)), "adapter shape mismatch");
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
  const auto shares = deal_by_size(small, A, pad_rank, at::get_num_threads());
  auto run_all = [&](auto tag) {
    using scalar_t = decltype(tag);
    at::parallel_for(0, (int64_t)shares.size(), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t share = lo; share < hi; ++share)
        for (const Item& it : shares[share]) {
          const at::Tensor& a = A[it.adapter];
#if defined(__AVX512BF16__)
          const int64_t R = pad_rank > 0 ? pad_rank : a.size(1);
          if (dot_path(x.scalar_type(), R, x.size(1))) {
            run_segment_dot(it, y, x, a, B[it.adapter], R);
            continue;
          }
#endif
          run_segment<scalar_t>(it, y, x, plain_a(a), plain_b(B[it.adapter], a.size(1), y.size(1)), pad_rank);
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
  const PairedAdapter w(A, B, A.size(1), out.size(1), units);
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
  TORCH_CHECK(dot_path(x.scalar_type(), A.size(1), x.size(1)), "short_delta needs ranks from 1 up to ", kMaxDotRank,
              ", an even input count and AVX512-BF16");
#if defined(__AVX512BF16__)
  float* op = out.data_ptr<float>();
  const int64_t ldo = out.stride(0);
  const int64_t r = A.size(1);
  short_rows_dot(bits_of(x), x.stride(0), x.size(0), x.size(1), PairedA(A, r), BlockedB(B, r, out.size(1), (r + 1) / 2),
                 r, r, out.size(1), [&](int64_t t, int64_t col, int64_t lanes, __m512 delta) {
                   _mm512_mask_storeu_ps(op + t * ldo + col, static_cast<__mmask16>(first_lanes(lanes)), delta);
                 });
#endif
}

// Whether short_delta runs here for this rank and input count (else lora_segments_ runs short bf16 segments in float32).
bool short_delta_available(int64_t rank, int64_t in) { return dot_path(at::kBFloat16, rank, in); }

// A [in, r] (bf16, contiguous, in even) in pairs: [in / 2, r, 2], the layout lora_segments_ reads in place.
at::Tensor pack_a(at::Tensor A) {
  TORCH_CHECK(A.dim() == 2 && A.is_contiguous() && A.scalar_type() == at::kBFloat16 && A.size(0) % 2 == 0,
              "A [in, r] bf16 contiguous with an even in expected");
  at::Tensor packed = at::empty({A.size(0) / 2, A.size(1), 2}, A.options());
  pair_columns(A, A.size(1), reinterpret_cast<uint16_t*>(packed.data_ptr<at::BFloat16>()));
  return packed;
}

// B [r, out] (bf16, contiguous) in blocked pairs: [ceil(out / 64), ceil(r / 2), 64, 2], the layout
// lora_segments_ reads in place.
at::Tensor pack_b(at::Tensor B) {
  TORCH_CHECK(B.dim() == 2 && B.is_contiguous() && B.scalar_type() == at::kBFloat16, "B [r, out] bf16 contiguous expected");
  const int64_t pairs = (B.size(0) + 1) / 2;
  at::Tensor packed = at::empty({column_blocks(B.size(1)), pairs, kBlockColumns, 2}, B.options());
  block_pairs(B, pairs, reinterpret_cast<uint16_t*>(packed.data_ptr<at::BFloat16>()));
  return packed;
}

// Whether lora_segments_ reads a bf16 adapter of this rank and shape in pairs on both of its pair
// paths (short: the dot products; long: the pair GEMMs), so that storing it packed (pack_a, pack_b) pays.
bool packs(int64_t rank, int64_t in, int64_t out) {
  return dot_path(at::kBFloat16, rank, in) && paired_path(at::kBFloat16, rank, in, out);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_segments_", &lora_segments_, "y[seg] += x[seg] @ A[u] @ B[u] over segments (in place)");
  m.def("long_delta", &long_delta, "A long segment's rounded bf16 delta, for rows on their own, into float32");
  m.def("long_delta_available", &long_delta_available, "Whether long_delta runs here for this rank, in and out");
  m.def("short_delta", &short_delta, "A short segment's rounded bf16 delta, for rows on their own, into float32");
  m.def("short_delta_available", &short_delta_available, "Whether short_delta runs here for this rank and input count");
  m.def("pack_a", &pack_a, "A [in, r] in the pairs lora_segments_ reads in place");
  m.def("pack_b", &pack_b, "B [r, out] in the blocked pairs lora_segments_ reads in place");
  m.def("packs", &packs, "Whether lora_segments_ reads an adapter of this rank, in and out in pairs");
}
