// GEMMs whose right-hand operand is in bf16 pairs along K ([K / 2, N, 2]: the layout of torch's
// batch-reduce GEMM and of the bf16 dot-product instruction), for the kernels in this folder:
// the paged attention's prefill, the LoRA kernel's long segments and the decode-sized dense GEMMs.
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

// Whether torch's batch-reduce GEMM runs bf16 on this CPU (AMX): pair_gemm's ``units``.
inline bool matrix_units() { return at::native::cpublas::could_pack(at::kBFloat16); }

// Rows per dot_gemm block: 24 sums, 4 right-hand vectors and a broadcast fit the 32 vector registers.
constexpr int64_t kDotRows = 6;

#if defined(__AVX512BF16__)
// C[M, N] = A[M, K] @ B, for bf16 A (rows ``lda`` apart), B in pairs along K ([K / 2, N, 2], pair rows
// ``ldb`` columns apart) and float32 C (rows ``ldc`` apart): the batch-reduce GEMM's product, on the
// bf16 dot-product instruction for CPUs without AMX. Blocks of up to kDotRows rows by up to 64
// columns, their sums in registers; each B load feeds every row of its block. N % 16 == 0 and K even.
template <int kRows>
void dot_block(int64_t cols, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, const at::BFloat16* a,
               const at::BFloat16* b, float* c) {
  __m512 acc[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k / 2; ++p) {
    __m512bh w[4];
    for (int j = 0; j < 4; ++j)
      if (j < cols) w[j] = (__m512bh)_mm512_loadu_si512(b + (p * ldb + 16 * j) * 2);
    for (int r = 0; r < kRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * p, sizeof(pair));
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < 4; ++j)
        if (j < cols) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], x, w[j]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < 4; ++j)
      if (j < cols) _mm512_storeu_ps(c + r * ldc + 16 * j, acc[r][j]);
}

void dot_gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, const at::BFloat16* a,
              const at::BFloat16* b, float* c) {
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int64_t cols = std::min<int64_t>(64, n - j0) / 16;
    int64_t i = 0;
    for (; i + kDotRows <= m; i += kDotRows)
      dot_block<kDotRows>(cols, k, lda, ldb, ldc, a + i * lda, b + j0 * 2, c + i * ldc + j0);
    const at::BFloat16* rest = a + i * lda;
    float* out = c + i * ldc + j0;
    static_assert(kDotRows == 6, "the tail below takes 1 to 5 rows");
    switch (m - i) {  // the last rows in one block, so that each right-hand load still feeds them all
      case 5: dot_block<5>(cols, k, lda, ldb, ldc, rest, b + j0 * 2, out); break;
      case 4: dot_block<4>(cols, k, lda, ldb, ldc, rest, b + j0 * 2, out); break;
      case 3: dot_block<3>(cols, k, lda, ldb, ldc, rest, b + j0 * 2, out); break;
      case 2: dot_block<2>(cols, k, lda, ldb, ldc, rest, b + j0 * 2, out); break;
      case 1: dot_block<1>(cols, k, lda, ldb, ldc, rest, b + j0 * 2, out); break;
      default: break;
    }
  }
}

#endif

// C = A @ B as above: torch's batch-reduce GEMM where it packs bf16 (``units``: matrix_units(), AMX),
// else dot_gemm (then N % 16 == 0 and K even; callers take this path only where AVX512-BF16 is built).
void pair_gemm(bool units, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
               const at::BFloat16* a, const at::BFloat16* b, float* c) {
  if (units) {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, false, a, b, c);
    return;
  }
#if defined(__AVX512BF16__)
  dot_gemm(m, n, k, lda, ldb, ldc, a, b, c);
#else
  TORCH_CHECK(false, "pair_gemm without matrix units needs AVX512-BF16");
#endif
}

}  // namespace
