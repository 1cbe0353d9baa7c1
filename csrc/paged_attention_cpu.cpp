// Paged attention on the CPU, read straight from the block-tile KV cache (no gathered copy, no
// padding mask): decode (one query token per sequence against its cached context), the cache
// write, and prefill (a step's prompts, causally; see prefill_attention below).
//
// The cache is [num_blocks, KVH, block_size, D] per layer (services/gpu_worker/kv_cache.py), so one
// KV head of one block is a contiguous tile. Where this CPU has the bf16 dot-product instruction
// and the cache is bf16 with 16-token blocks and a head_dim of 64 or 128, the K tiles hold their
// [16, D] values as bf16 pairs along D, [D / 2, 16, 2] (services/gpu_worker/attention.py:pair_k_tiles
// is the plain-torch definition): one 64-byte row then holds one pair of dimensions for all 16
// tokens, and the 16 scores of a query head are 32 dot-product instructions with no transposing
// sum. write_kv_ stores K in that order; V tiles stay [16, D].
//
// A decode task is one (sequence, KV head): it reads each tile of that head once, for the G = H / KVH
// query heads that share it, and runs an online softmax for them; the exponentials use a
// branch-free polynomial the compiler vectorizes (fast_exp.h).
//
// The plain-torch references are services/gpu_worker/attention.py:gathered_decode_attention (decode)
// and causal SDPA (prefill); tests/unit/gpu_worker/test_paged_attention_cpu.py checks both kernels.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "bf16.h"
#include "dot_gemm.h"
#include "fast_exp.h"

namespace {

#if defined(__AVX512F__)
// Lane t of the result is the sum of the 16 lanes of v[t]: a transposing tree of adds (45
// instructions) instead of 16 separate horizontal sums.
inline __m512 transpose_sum16(const __m512 v[16]) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int j = 0; j < 4; ++j)
    x[j] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * j], w[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * j], w[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z0, z1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Scores of 16 consecutive rows of ``k`` ([16, d] float32) against ``q`` ([d]), into ``out``.
inline void score16(const float* q, const float* k, int64_t d, float* out) {
  __m512 partial[16];
  for (int t = 0; t < 16; ++t) partial[t] = _mm512_setzero_ps();
  for (int64_t i0 = 0; i0 < d; i0 += 16) {
    const __m512 qv = _mm512_loadu_ps(q + i0);
    for (int t = 0; t < 16; ++t) partial[t] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + t * d + i0), partial[t]);
  }
  _mm512_storeu_ps(out, transpose_sum16(partial));
}
#endif

// Inner loops run over kLanes floats held in a local array, which the compiler keeps in one vector
// register (an accumulator in memory would chain every FMA through a store and a reload).
constexpr int64_t kLanes = 16;

// Rows of a cache write per thread, at least: a decode step's 192 rows (64 sequences, 3 KV heads)
// are split over two threads, a prefill step's thousands over all.
constexpr int64_t kWriteGrain = 64;

// Whether ``cache_k``'s tiles hold K as bf16 pairs along D (see the top of this file).
bool paired_k(const torch::Tensor& cache_k) {
#if defined(__AVX512BF16__)
  return cache_k.scalar_type() == torch::kBFloat16 && cache_k.dim() == 4 && cache_k.size(2) == 16 &&
         (cache_k.size(3) == 64 || cache_k.size(3) == 128);
#else
  return false;
#endif
}

// Element (t, i) of a [16, D] K tile stored as bf16 pairs along D.
inline int64_t paired_index(int64_t t, int64_t i) { return ((i / 2) * 16 + t) * 2 + i % 2; }

// One (sequence, KV head) task in float32, for any dtype and shape: the online-softmax state of
// its G query heads, and one K and V tile converted to float32 ([block, D] each).
template <typename T>
struct FloatTask {
  int64_t group, block, dim;
  float scale;
  std::vector<float> q, acc, max, sum, scores, k_tile, v_tile;

  bool paired;  // K tiles hold bf16 pairs along D

  FloatTask(int64_t g, int64_t bs, int64_t d, bool paired_tiles)
      : group(g), block(bs), dim(d), scale(1.0f / std::sqrt(static_cast<float>(d))), q(g * d), acc(g * d),
        max(g), sum(g), scores(bs), k_tile(bs * d), v_tile(bs * d), paired(paired_tiles) {}

  // Begin a task with its G query heads ``qb: [G, D]``.
  void start(const T* qb) {
    for (int64_t i = 0; i < group * dim; ++i) q[i] = to_float(qb[i]) * scale;
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(max.begin(), max.end(), -std::numeric_limits<float>::infinity());
    std::fill(sum.begin(), sum.end(), 0.0f);
  }

  // Fold the first ``n`` tokens of one K and one V tile into every query head.
  void fold(const T* k, const T* v, int64_t n) {
    load(k, v, n);
    for (int64_t g = 0; g < group; ++g) fold_head(g, n);
  }

  // Write the G heads' attention outputs ``ob: [G, D]``.
  void finish(T* ob) const {
    for (int64_t g = 0; g < group; ++g)
      for (int64_t i = 0; i < dim; ++i) ob[g * dim + i] = static_cast<T>(acc[g * dim + i] / sum[g]);
  }

  // Convert the first ``n`` rows of one K and one V tile; rows past ``n`` are never read.
  void load(const T* k, const T* v, int64_t n) {
    const int64_t count = n * dim;
    float* kt = k_tile.data();
    float* vt = v_tile.data();
    if (paired) {
      for (int64_t t = 0; t < n; ++t)
        for (int64_t i = 0; i < dim; ++i) kt[t * dim + i] = to_float(k[paired_index(t, i)]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) kt[i] = to_float(k[i]);
    }
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) vt[i] = to_float(v[i]);
  }

  // q_g . k_t for the ``n`` loaded tokens, into ``scores`` (AVX-512: 16 rows at a time, where the
  // rows past ``n`` of a full 16 hold earlier, finite values whose scores are never read).
  void score(const float* qg, int64_t n) {
    int64_t t = 0;
#if defined(__AVX512F__)
    for (; t + 16 <= block && t < n; t += 16) score16(qg, k_tile.data() + t * dim, dim, scores.data() + t);
#endif
    for (; t < n; ++t) {
      const float* kr = k_tile.data() + t * dim;
      float part[kLanes] = {};
      for (int64_t i0 = 0; i0 < dim; i0 += kLanes)
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) part[l] += qg[i0 + l] * kr[i0 + l];
      float total = 0.0f;
#pragma omp simd reduction(+ : total)
      for (int64_t l = 0; l < kLanes; ++l) total += part[l];
      scores[t] = total;
    }
  }

  // acc_g = acc_g * correction + sum_t p_t v_t over the ``n`` loaded tokens (p in ``scores``).
  void accumulate(float* ag, float correction, int64_t n) {
    for (int64_t i0 = 0; i0 < dim; i0 += kLanes) {
      float a[kLanes];
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) a[l] = ag[i0 + l] * correction;
      for (int64_t t = 0; t < n; ++t) {
        const float p = scores[t];
        const float* vr = v_tile.data() + t * dim + i0;
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) a[l] += p * vr[l];
      }
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) ag[i0 + l] = a[l];
    }
  }

  // Fold the loaded tile's ``n`` tokens into query head ``g``.
  void fold_head(int64_t g, int64_t n) {
    score(q.data() + g * dim, n);
    float tile_max = max[g];
    for (int64_t t = 0; t < n; ++t) tile_max = std::max(tile_max, scores[t]);
    const float correction = fast_exp(max[g] - tile_max);
    float tile_sum = 0.0f;
    float* s = scores.data();
#pragma omp simd reduction(+ : tile_sum)
    for (int64_t t = 0; t < n; ++t) {
      s[t] = fast_exp(s[t] - tile_max);
      tile_sum += s[t];
    }
    accumulate(acc.data() + g * dim, correction, n);
    sum[g] = sum[g] * correction + tile_sum;
    max[g] = tile_max;
  }
};

#if defined(__AVX512BF16__)
// One (sequence, KV head) task reading bf16 tiles of 16 tokens in place: q.k with the bf16
// dot-product instruction (products of pairs summed in float32), V widened to float32 in
// registers. ``kChunks`` = head_dim / 16; at most kMaxGroup query heads per KV head.
template <int kChunks>
struct Bf16Task {
  static constexpr int kDim = 16 * kChunks;
  static constexpr int64_t kMaxGroup = 8;
  int64_t group;
  float scale;
  alignas(64) int32_t q[kMaxGroup][kDim / 2];  // each query head as bf16 pairs, one pair per word
  __m512 acc[kMaxGroup][kChunks];
  float max[kMaxGroup], sum[kMaxGroup];
  alignas(64) float p[kMaxGroup][16];

  Bf16Task(int64_t g, int64_t, int64_t d, bool) : group(g), scale(1.0f / std::sqrt(static_cast<float>(d))) {}

  static __m512 widen(const at::BFloat16* x) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }

  void start(const at::BFloat16* qb) {
    for (int64_t g = 0; g < group; ++g) {
      std::memcpy(q[g], qb + g * kDim, kDim * sizeof(at::BFloat16));
      for (int c = 0; c < kChunks; ++c) acc[g][c] = _mm512_setzero_ps();
      max[g] = -std::numeric_limits<float>::infinity();
      sum[g] = 0.0f;
    }
  }

  // Scores of the tile's 16 tokens for every query head, scaled, -inf past ``n``: ``k`` is a paired
  // tile (row ``j``, 32 bf16, holds dimensions 2j and 2j + 1 of all 16 tokens, so lane t sums
  // q . k_t). All heads run in one pass over the tile, two accumulators each, so 2G independent
  // dot-product chains hide the instruction's latency and each row is loaded once.
  void score(const at::BFloat16* k, int64_t n, __m512* s) const {
    __m512 even[kMaxGroup], odd[kMaxGroup];
    for (int64_t g = 0; g < group; ++g) even[g] = odd[g] = _mm512_setzero_ps();
    for (int j = 0; j < kDim / 2; j += 2) {
      const __m512bh row0 = (__m512bh)_mm512_loadu_si512(k + 32 * j);
      const __m512bh row1 = (__m512bh)_mm512_loadu_si512(k + 32 * (j + 1));
      for (int64_t g = 0; g < group; ++g) {
        even[g] = _mm512_dpbf16_ps(even[g], (__m512bh)_mm512_set1_epi32(q[g][j]), row0);
        odd[g] = _mm512_dpbf16_ps(odd[g], (__m512bh)_mm512_set1_epi32(q[g][j + 1]), row1);
      }
    }
    const __mmask16 valid = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
    for (int64_t g = 0; g < group; ++g)
      s[g] = _mm512_mask_mul_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), valid,
                                _mm512_add_ps(even[g], odd[g]), _mm512_set1_ps(scale));
  }

  // Softmax weights of head ``g`` from its scores ``s`` into p[g] (0 past ``n``); returns the factor
  // that rescales what the head accumulated so far.
  float weigh(int64_t g, __m512 s, int64_t n) {
    const float tile_max = std::max(max[g], _mm512_reduce_max_ps(s));
    _mm512_store_ps(p[g], s);
    float tile_sum = 0.0f;
#pragma omp simd reduction(+ : tile_sum)
    for (int t = 0; t < 16; ++t) {
      p[g][t] = t < n ? fast_exp(p[g][t] - tile_max) : 0.0f;
      tile_sum += p[g][t];
    }
    const float correction = fast_exp(max[g] - tile_max);
    sum[g] = sum[g] * correction + tile_sum;
    max[g] = tile_max;
    return correction;
  }

  void fold(const at::BFloat16* k, const at::BFloat16* v, int64_t n) {
    __m512 scores[kMaxGroup];
    score(k, n, scores);
    for (int64_t g = 0; g < group; ++g) {
      const __m512 correction = _mm512_set1_ps(weigh(g, scores[g], n));
      for (int c = 0; c < kChunks; ++c) acc[g][c] = _mm512_mul_ps(acc[g][c], correction);
    }
    for (int64_t t = 0; t < n; ++t) {
      __m512 row[kChunks];
      for (int c = 0; c < kChunks; ++c) row[c] = widen(v + t * kDim + 16 * c);
      for (int64_t g = 0; g < group; ++g) {
        const __m512 weight = _mm512_set1_ps(p[g][t]);
        for (int c = 0; c < kChunks; ++c) acc[g][c] = _mm512_fmadd_ps(weight, row[c], acc[g][c]);
      }
    }
  }

  void finish(at::BFloat16* ob) const {
    alignas(64) float out[16];
    for (int64_t g = 0; g < group; ++g)
      for (int c = 0; c < kChunks; ++c) {
        _mm512_store_ps(out, _mm512_div_ps(acc[g][c], _mm512_set1_ps(sum[g])));
        for (int i = 0; i < 16; ++i) ob[g * kDim + 16 * c + i] = static_cast<at::BFloat16>(out[i]);
      }
  }
};
#endif

// Ask for a tile's cache lines ahead of use, into L2 (an L1 prefetch of a whole tile overflows the
// L1's few line-fill buffers): tiles sit wherever their blocks were allocated, so without this each
// one starts with a full memory latency that the hardware prefetcher cannot hide. A task's last
// tile prefetches the next task's first.
inline void prefetch(const void* tile, int64_t bytes) {
  const char* p = static_cast<const char*>(tile);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
}

template <typename T, typename Task>
void decode_attention(const torch::Tensor& q, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                      const torch::Tensor& tables, const torch::Tensor& lengths, torch::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t kvh = cache_k.size(1), bs = cache_k.size(2), width = tables.size(1);
  const int64_t group = heads / kvh;
  const T* qp = q.data_ptr<T>();
  const T* kp = cache_k.data_ptr<T>();
  const T* vp = cache_v.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();

  at::parallel_for(0, batch * kvh, 1, [&](int64_t begin, int64_t end) {
    Task task(group, bs, d, paired_k(cache_k));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / kvh, h = i % kvh, length = lp[b];
      task.start(qp + (b * heads + h * group) * d);
      for (int64_t j = 0; j * bs < length; ++j) {
        int64_t next = -1;
        if ((j + 1) * bs < length) {
          next = (tp[b * width + j + 1] * kvh + h) * bs * d;
        } else if (i + 1 < end) {  // the next task's first tile
          const int64_t nb = (i + 1) / kvh, nh = (i + 1) % kvh;
          next = (tp[nb * width] * kvh + nh) * bs * d;
        }
        if (next >= 0) {
          prefetch(kp + next, bs * d * sizeof(T));
          prefetch(vp + next, bs * d * sizeof(T));
        }
        const int64_t tile = (tp[b * width + j] * kvh + h) * bs * d;
        task.fold(kp + tile, vp + tile, std::min(bs, length - j * bs));
      }
      task.finish(op + (b * heads + h * group) * d);
    }
  });
}

// The bf16 fast path over paired K tiles with G <= 8, else float32 math (which reads either layout).
void decode_attention_bf16(const torch::Tensor& q, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                           const torch::Tensor& tables, const torch::Tensor& lengths, torch::Tensor& out) {
#if defined(__AVX512BF16__)
  if (paired_k(cache_k) && q.size(1) / cache_k.size(1) <= Bf16Task<4>::kMaxGroup) {
    if (cache_k.size(3) == 64)
      return decode_attention<at::BFloat16, Bf16Task<4>>(q, cache_k, cache_v, tables, lengths, out);
    return decode_attention<at::BFloat16, Bf16Task<8>>(q, cache_k, cache_v, tables, lengths, out);
  }
#endif
  decode_attention<at::BFloat16, FloatTask<at::BFloat16>>(q, cache_k, cache_v, tables, lengths, out);
}

// Each row b's ``lengths[b]`` tokens fit its block table ``tables[b]``, whose blocks are in ``cache``;
// ``what`` names such a length in the error.
void check_block_tables(const torch::Tensor& tables, const torch::Tensor& lengths, const torch::Tensor& cache,
                        const char* what) {
  const int64_t bs = cache.size(2), blocks = cache.size(0), width = tables.size(1);
  const int64_t* lp = lengths.data_ptr<int64_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < tables.size(0); ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= width * bs, "a ", what, " is outside its block table");
    for (int64_t j = 0; j * bs < lp[b]; ++j)
      TORCH_CHECK(tp[b * width + j] >= 0 && tp[b * width + j] < blocks, "a block index is out of range");
  }
}

void check_inputs(const torch::Tensor& q, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                  const torch::Tensor& tables, const torch::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 3 && cache_k.dim() == 4, "q must be [B, H, D] and the cache [blocks, KVH, bs, D]");
  TORCH_CHECK(cache_k.sizes() == cache_v.sizes(), "K and V caches differ in shape");
  TORCH_CHECK(q.scalar_type() == cache_k.scalar_type() && q.scalar_type() == cache_v.scalar_type(),
              "q and the cache must share a dtype");
  TORCH_CHECK(q.size(2) == cache_k.size(3), "q and the cache differ in head_dim");
  TORCH_CHECK(q.size(2) % kLanes == 0, "head_dim must be a multiple of 16");
  TORCH_CHECK(q.size(1) % cache_k.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(q.is_contiguous() && cache_k.is_contiguous() && cache_v.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == q.size(0) && tables.scalar_type() == torch::kInt64 &&
                  tables.is_contiguous(), "tables must be contiguous int64 [B, W]");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == q.size(0) && lengths.scalar_type() == torch::kInt64,
              "lengths must be int64 [B]");
  check_block_tables(tables, lengths, cache_k, "context length");
}

// q: [B, H, D]; cache_k, cache_v: [num_blocks, KVH, block_size, D]; tables: [B, W] int64 block ids;
// lengths: [B] int64 context lengths (the current token included). Returns [B, H, D].
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& cache_k,
                                     const torch::Tensor& cache_v, const torch::Tensor& tables,
                                     const torch::Tensor& lengths) {
  check_inputs(q, cache_k, cache_v, tables, lengths);
  auto out = torch::empty_like(q);
  if (q.scalar_type() == torch::kBFloat16) {
    decode_attention_bf16(q, cache_k, cache_v, tables, lengths, out);
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kFloat32, "paged_decode_attention supports float32 and bfloat16");
    decode_attention<float, FloatTask<float>>(q, cache_k, cache_v, tables, lengths, out);
  }
  return out;
}

// The cache write of a step: row ``rows[t * KVH + h]`` of each cache, viewed as [num_blocks * KVH *
// block_size, D], takes k[t, h] (and v[t, h]). k, v: [T, KVH, D] with contiguous heads (rows may be
// strided, as the column slices of the fused q|k|v output are). The reference is index_copy_,
// followed by pair_k_tiles where the K tiles are paired. Rows are written in parallel (each row's
// bytes are its own; rows of one tile share cache lines, not words).
void write_kv_(torch::Tensor& cache_k, torch::Tensor& cache_v, const torch::Tensor& k, const torch::Tensor& v,
               const torch::Tensor& rows) {
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.sizes() == cache_v.sizes() && cache_k.is_contiguous() &&
                  cache_v.is_contiguous(), "the caches must be contiguous [blocks, KVH, bs, D] of one shape");
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.size(1) == cache_k.size(1) && k.size(2) == cache_k.size(3),
              "k and v must be [T, KVH, D] matching the cache");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(1) == v.size(2),
              "each token's K/V heads must be contiguous");
  TORCH_CHECK(k.scalar_type() == cache_k.scalar_type() && v.scalar_type() == cache_k.scalar_type(),
              "k, v and the cache must share a dtype");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == torch::kInt64 && rows.is_contiguous() &&
                  rows.size(0) == k.size(0) * k.size(1), "rows must be contiguous int64 [T * KVH]");
  const int64_t heads = k.size(1), row_bytes = k.size(2) * k.element_size();
  const int64_t limit = cache_k.numel() / cache_k.size(3);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.size(0); ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] < limit, "a cache row is out of range");
  auto* kc = static_cast<char*>(cache_k.data_ptr());
  auto* vc = static_cast<char*>(cache_v.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks = k.stride(0) * k.element_size(), vs = v.stride(0) * v.element_size();
  const bool paired = paired_k(cache_k);
  const int64_t bs = cache_k.size(2), pairs = k.size(2) / 2;
  at::parallel_for(0, rows.size(0), kWriteGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / heads, h = i % heads;
      const char* src = kp + t * ks + h * row_bytes;
      if (paired) {  // token slot ``rp % bs`` of its tile: word j of the row goes to word j * bs + slot
        auto* tile = reinterpret_cast<int32_t*>(kc + (rp[i] - rp[i] % bs) * row_bytes);
        const auto* words = reinterpret_cast<const int32_t*>(src);
        for (int64_t j = 0; j < pairs; ++j) tile[j * bs + rp[i] % bs] = words[j];
      } else {
        std::memcpy(kc + rp[i] * row_bytes, src, row_bytes);
      }
      std::memcpy(vc + rp[i] * row_bytes, vp + t * vs + h * row_bytes, row_bytes);
    }
  });
}

// Whether K tiles of this cache are stored as bf16 pairs along D (for the Python side and tests).
bool paired_k_tiles(const torch::Tensor& cache_k) { return paired_k(cache_k); }

#if defined(__AVX512BF16__)
// Causal prefill attention of one sequence's tokens for one KV head, as small GEMMs: on torch's
// batch-reduce GEMM (oneDNN's ukernel) where it runs bf16 (AMX), else on dot_gemm (dot_gemm.h). The context's
// paired K tiles side by side are K^T in the GEMM's pair layout ([D / 2, L, 2]); the V tiles,
// paired along the tokens, are V in it ([L / 2, D, 2]). Per block of up to 64 query tokens and
// query head: S = Q K^T (float32), a causal softmax per row, P rounded to bf16 (as torch's flash
// attention rounds it), O = P V, O / rowsum.
struct PrefillScratch {
  static constexpr int64_t kQueryBlock = 64;
  std::vector<at::BFloat16> k_t, v, p;  // [D / 2, L, 2], [L / 2, D, 2], [64, L]
  std::vector<float> s, o, sums;        // [64, L], [64, D], [64]

  PrefillScratch(int64_t longest, int64_t d)
      : k_t(longest * d), v(longest * d), p(kQueryBlock * longest), s(kQueryBlock * longest),
        o(kQueryBlock * d), sums(kQueryBlock) {}
};

// ``out`` ([8, D, 2]) = the V tile ``v`` ([16, D]) paired along the tokens: dimension e of token t at
// ((t / 2) * D + e) * 2 + t % 2. Tokens from ``n`` on (past the context) are zero.
void pair_v_tile(at::BFloat16* out, const at::BFloat16* v, int64_t d, int64_t n) {
  alignas(64) static const int16_t lo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                             8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const int16_t hi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                             24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i low = _mm512_load_si512(lo), high = _mm512_load_si512(hi);
  for (int64_t t = 0; t < 16; t += 2)
    for (int64_t e = 0; e < d; e += 32) {  // dimensions e .. e + 31 of tokens t and t + 1
      const __m512i a = t < n ? _mm512_loadu_si512(v + t * d + e) : _mm512_setzero_si512();
      const __m512i b = t + 1 < n ? _mm512_loadu_si512(v + (t + 1) * d + e) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + (t / 2 * d + e) * 2, _mm512_permutex2var_epi16(a, low, b));
      _mm512_storeu_si512(out + (t / 2 * d + e + 16) * 2, _mm512_permutex2var_epi16(a, high, b));
    }
}

// k_t = the context's ``tiles`` paired K tiles side by side; v = its V tiles paired along the tokens,
// zero from token ``length`` on (slots past the context may hold anything, inf or NaN included).
void pack_context(PrefillScratch& w, const at::BFloat16* kp, const at::BFloat16* vp, const int64_t* table,
                  int64_t kvh, int64_t h, int64_t d, int64_t length) {
  constexpr int64_t bs = 16;
  const int64_t tiles = (length + bs - 1) / bs, keys = tiles * bs;
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t tile = (table[i] * kvh + h) * bs * d;
    for (int64_t j = 0; j < d / 2; ++j)  // pair row j of the tile: dimensions 2j, 2j + 1 of its 16 tokens
      std::memcpy(w.k_t.data() + (j * keys + i * bs) * 2, kp + tile + j * bs * 2, bs * 2 * sizeof(at::BFloat16));
    pair_v_tile(w.v.data() + i * bs * d, vp + tile, d, std::min(bs, length - i * bs));
  }
}

// Rows i < m of w.s (``keys`` scores each) -> causal softmax weights in w.p (bf16, zero past
// position ``first + i``) and their sums in w.sums.
void causal_softmax(PrefillScratch& w, int64_t m, int64_t keys, int64_t first, float scale) {
  for (int64_t i = 0; i < m; ++i) {
    float* s = w.s.data() + i * keys;
    const int64_t n = first + i + 1;  // keys 0 .. first + i
    __m512 tops = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 lanes = n - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - t)) - 1);
      tops = _mm512_mask_max_ps(tops, lanes, tops, _mm512_maskz_loadu_ps(lanes, s + t));
    }
    const float top = _mm512_reduce_max_ps(tops) * scale;
    at::BFloat16* p = w.p.data() + i * keys;
    __m512 totals = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < n; t0 += 16) {  // 16 keys at a time, in a loop the compiler vectorizes
      alignas(64) float e[16];
      _mm512_store_ps(e, _mm512_loadu_ps(s + t0));
#pragma omp simd
      for (int l = 0; l < 16; ++l) e[l] = t0 + l < n ? fast_exp(e[l] * scale - top) : 0.0f;
      const __m512 weights = _mm512_load_ps(e);
      totals = _mm512_add_ps(totals, weights);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + t0), (__m256i)_mm512_cvtneps_pbh(weights));
    }
    std::fill(p + (n + 15) / 16 * 16, p + keys, at::BFloat16(0.0f));
    w.sums[i] = _mm512_reduce_add_ps(totals);
  }
}

// The (sequence, KV head) tasks of a prefill, task = sequence * KVH + head, shared out over
// ``threads``: largest first, each to the least-loaded thread (a task costs about its length
// squared). A step's few sequences differ in length up to 8x, so equal contiguous ranges of tasks
// would leave one thread idle for much of the call.
std::vector<std::vector<int64_t>> balanced_shares(const torch::Tensor& lengths, int64_t kvh, int64_t threads) {
  const int64_t* lp = lengths.data_ptr<int64_t>();
  std::vector<int64_t> order(lengths.size(0) * kvh);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lp[a / kvh] > lp[b / kvh]; });
  std::vector<std::vector<int64_t>> share(threads);
  std::vector<int64_t> load(threads, 0);
  for (const int64_t task : order) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    share[t].push_back(task);
    load[t] += lp[task / kvh] * lp[task / kvh];
  }
  return share;
}

// Sequence s's tokens are q rows starts[s] .. starts[s] + lengths[s], at positions 0 .. lengths[s] - 1,
// their K/V already in the cache along tables[s]; tasks are (sequence, KV head).
void prefill_attention(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& cache_k,
                       const torch::Tensor& cache_v, const torch::Tensor& tables, const torch::Tensor& starts,
                       const torch::Tensor& lengths) {
  const int64_t heads = q.size(1), d = q.size(2), kvh = cache_k.size(1);
  const int64_t group = heads / kvh, width = tables.size(1), stride = heads * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  const int64_t longest = (*std::max_element(lp, lp + lengths.size(0)) + 15) / 16 * 16;
  const auto* kp = cache_k.data_ptr<at::BFloat16>();
  const auto* vp = cache_v.data_ptr<at::BFloat16>();
  const auto* qp = q.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), lengths.size(0) * kvh);
  const auto share = balanced_shares(lengths, kvh, threads);
  const bool units = matrix_units();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    PrefillScratch w(longest, d);
    std::vector<int64_t> mine;
    for (int64_t t = begin; t < end; ++t) mine.insert(mine.end(), share[t].begin(), share[t].end());
    for (const int64_t task : mine) {
      const int64_t seq = task / kvh, h = task % kvh, length = lp[seq], keys = (length + 15) / 16 * 16;
      pack_context(w, kp, vp, tp + seq * width, kvh, h, d, length);
      for (int64_t first = 0; first < length; first += PrefillScratch::kQueryBlock) {
        const int64_t m = std::min(PrefillScratch::kQueryBlock, length - first);
        const int64_t seen = (first + m + 15) / 16 * 16;  // keys the block's last token sees, in whole tiles
        for (int64_t g = 0; g < group; ++g) {
          const int64_t row0 = (sp[seq] + first) * stride + (h * group + g) * d;
          pair_gemm(units, m, seen, d, stride, keys, seen, qp + row0, w.k_t.data(), w.s.data());
          causal_softmax(w, m, seen, first, scale);
          pair_gemm(units, m, d, seen, seen, d, d, w.p.data(), w.v.data(), w.o.data());
          for (int64_t i = 0; i < m; ++i) {
            const __m512 norm = _mm512_set1_ps(1.0f / w.sums[i]);
            for (int64_t e = 0; e < d; e += 16)
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + row0 + i * stride + e),
                                  (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(w.o.data() + i * d + e), norm)));
          }
        }
      }
    }
    if (units) at::native::cpublas::brgemm_release();
  });
}
#endif

// Whether paged_prefill_attention_ runs for this cache and this many query heads (else the caller
// uses torch's attention): paired tiles (so a CPU with the bf16 dot-product instruction) and whole
// groups of query heads per KV head.
bool prefills(const torch::Tensor& cache_k, int64_t heads) {
  return paired_k(cache_k) && heads % cache_k.size(1) == 0;
}

// out[starts[s] + i] = causal attention of q[starts[s] + i] over the first i + 1 cached tokens of
// sequence s (tables[s]), for i < lengths[s]: the prefill tokens of a step, after write_kv_. q, out:
// [T, H, D] bf16; tables: [S, W] int64; starts, lengths: [S] int64. Other rows of ``out`` are left
// as they are. The plain-torch reference is causal SDPA over each sequence's own q, k, v.
void paged_prefill_attention_(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& cache_k,
                              const torch::Tensor& cache_v, const torch::Tensor& tables,
                              const torch::Tensor& starts, const torch::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes() && q.is_contiguous() && out.is_contiguous() &&
                  q.scalar_type() == torch::kBFloat16 && out.scalar_type() == torch::kBFloat16,
              "q and out must be contiguous bf16 [T, H, D] of one shape");
  TORCH_CHECK(cache_k.sizes() == cache_v.sizes() && cache_v.is_contiguous() && cache_k.is_contiguous() &&
                  cache_v.scalar_type() == torch::kBFloat16 && q.size(2) == cache_k.size(3),
              "the caches must be contiguous bf16 [blocks, KVH, bs, D] matching q");
  TORCH_CHECK(prefills(cache_k, q.size(1)), "this cache or head count has no native prefill path");
  TORCH_CHECK(tables.dim() == 2 && tables.scalar_type() == torch::kInt64 && tables.is_contiguous() &&
                  starts.dim() == 1 && starts.scalar_type() == torch::kInt64 && lengths.dim() == 1 &&
                  lengths.scalar_type() == torch::kInt64 && starts.size(0) == tables.size(0) &&
                  lengths.size(0) == tables.size(0),
              "tables must be contiguous int64 [S, W], starts and lengths int64 [S]");
  check_block_tables(tables, lengths, cache_k, "sequence length");
  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  for (int64_t s = 0; s < tables.size(0); ++s)
    TORCH_CHECK(sp[s] >= 0 && sp[s] + lp[s] <= q.size(0), "a sequence's tokens are outside q");
#if defined(__AVX512BF16__)
  prefill_attention(out, q, cache_k, cache_v, tables, starts, lengths);
#endif
}

}  // namespace

// dot_gemm for tests: ``a: [M, K]`` bf16 (rows may be strided), ``b_pairs: [K / 2, N, 2]`` bf16 ->
// ``a @ b`` as float32 ``[M, N]``. N % 16 == 0 and K even, as the prefill's GEMMs have them.
torch::Tensor dot_gemm_op(const torch::Tensor& a, const torch::Tensor& b_pairs) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(a.dim() == 2 && a.stride(1) == 1 && a.scalar_type() == torch::kBFloat16, "a must be bf16 [M, K] with contiguous rows");
  TORCH_CHECK(b_pairs.dim() == 3 && b_pairs.size(2) == 2 && b_pairs.is_contiguous() && b_pairs.scalar_type() == torch::kBFloat16 &&
                  b_pairs.size(0) * 2 == a.size(1) && b_pairs.size(1) % 16 == 0,
              "b_pairs must be contiguous bf16 [K / 2, N, 2] with N % 16 == 0");
  auto c = torch::empty({a.size(0), b_pairs.size(1)}, a.options().dtype(torch::kFloat32));
  dot_gemm(a.size(0), b_pairs.size(1), a.size(1), a.stride(0), b_pairs.size(1), b_pairs.size(1),
           a.data_ptr<at::BFloat16>(), b_pairs.data_ptr<at::BFloat16>(), c.data_ptr<float>());
  return c;
#else
  TORCH_CHECK(false, "dot_gemm needs a CPU with the bf16 dot-product instruction");
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Decode attention of one query token per sequence over its paged KV context");
  m.def("paged_prefill_attention_", &paged_prefill_attention_,
        "Causal attention of a step's prefill tokens over their paged K/V (into out, in place)");
  m.def("prefills", &prefills, "Whether the native prefill path runs for this cache and query head count");
  m.def("write_kv_", &write_kv_, "Write a step's K/V rows into the paged caches (in place)");
  m.def("paired_k_tiles", &paired_k_tiles, "Whether the kernel keeps this cache's K tiles as bf16 pairs along D");
  m.def("dot_gemm", &dot_gemm_op, "The prefill's GEMM on the bf16 dot-product instruction (CPUs without AMX)");
}
