// Decode-sized GEMMs on oneDNN's packed bf16 weights: torch's batch-reduce GEMM (AMX), or the bf16
// dot-product GEMM of dot_gemm.h on CPUs with AVX512-BF16 but no AMX.
//
// services/gpu_worker/dense.py packs each bf16 base weight once with oneDNN. oneDNN lays a [N, K]
// weight out in blocks of W output columns, each block the K inputs as bf16 pairs, [N / W, K / 2,
// W, 2]: W = 32 (AB16b32a2b) on the AMX Xeon we measured, W = 64 (AB16b64a2b) on the AVX512-BF16
// EPYC. That is the pair layout both GEMMs read as their right-hand operand (dense.py:vnni_blocks
// is the plain-torch definition, and DenseWeight checks every packed weight against it before it
// uses this op). oneDNN's own matmul on that buffer is faster at prefill sizes, not at decode
// sizes. SmolLM2-135M's 30 layers of projections and its LM head, weights out of cache, same run
// (docs/engine_performance.md rounds 5 and 11):
// - AMX Xeon: 8 tokens 11.2 -> 8.7 ms with this op, 32 tokens 13.8 -> 11.4 ms; from 40 tokens up
//   oneDNN is faster (12.8 vs 15.9 ms);
// - AVX512-BF16 EPYC: 1 token 15.5 -> 10.1 ms, 8 tokens 24.0 -> 14.8 ms, 64 tokens 59.0 -> 53.5
//   ms, 128 tokens 94.8 -> 91.4 ms; from 512 tokens within a few percent either way, and at 4,096
//   tokens oneDNN is faster (2.81 against 3.09 s).
//
// small_batch_linear splits x's rows into even groups of at most one GEMM call's rows (32 for an AMX
// tile, kDotRows for the dot products) and deals the (block, group) items out to the threads, a
// block's groups next to each other: each item is one GEMM of its rows against one block into a
// float tile, rounded to bf16 into its columns of the output. The groups keep all threads busy
// where the blocks alone would not divide evenly (a 576-wide projection has 9 blocks of 64).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <optional>

#include "dot_gemm.h"

namespace at::native {
// Exported by libtorch_cpu (used by torch's ahead-of-time inductor); ATen does not install the header.
TORCH_API void* data_ptr_from_mkldnn(const at::Tensor& mkldnn_tensor);
TORCH_API int64_t nbytes_from_mkldnn(const at::Tensor& mkldnn_tensor);
}  // namespace at::native

namespace {

constexpr int64_t kMaxWidth = 64;  // output columns per packed block, at most
constexpr int64_t kTileRows = 32;  // rows of x per batch-reduce GEMM (AMX)

// Whether small_batch_linear runs here: on the batch-reduce GEMM, or on bf16 dot products.
bool available() {
#if defined(__AVX512BF16__)
  return true;
#else
  return matrix_units();
#endif
}

bool known_width(int64_t width) { return width == 16 || width == 32 || width == kMaxWidth; }

// oneDNN's packed buffer of an [N, K] bf16 weight as a [N / width, K * width] bf16 tensor that
// shares it (and keeps the packed tensor alive); nullopt when the buffer is not N * K values.
std::optional<torch::Tensor> packed_blocks(const torch::Tensor& packed, int64_t n, int64_t k, int64_t width) {
  TORCH_CHECK(packed.is_mkldnn(), "packed must be an oneDNN tensor");
  TORCH_CHECK(known_width(width), "block width must be 16, 32 or 64");
  if (n % width != 0 || k % 2 != 0 || at::native::nbytes_from_mkldnn(packed) != n * k * 2) return std::nullopt;
  return torch::from_blob(at::native::data_ptr_from_mkldnn(packed), {n / width, k * width},
                          [keep = packed](void*) mutable { keep.reset(); },
                          torch::TensorOptions().dtype(torch::kBFloat16));
}

// rows x width floats (contiguous) -> rows of out, ``stride`` apart, rounded to nearest even.
void store_bf16(const float* c, int64_t rows, int64_t width, at::BFloat16* out, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
#if defined(__AVX512BF16__)
    for (int64_t e = 0; e < width; e += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * stride + e),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(c + r * width + e)));
#else
    for (int64_t e = 0; e < width; ++e) out[r * stride + e] = at::BFloat16(c[r * width + e]);
#endif
  }
}

// x: [M, K] bf16 with contiguous rows; blocks: [N / W, K * W] bf16 (dense.py:vnni_blocks of W, with
// W = 16, 32 or 64). Returns x @ W.T, [M, N] bf16 (float accumulation, one rounding).
torch::Tensor small_batch_linear(const torch::Tensor& x, const torch::Tensor& blocks) {
  TORCH_CHECK(available(), "small_batch_linear needs AMX or AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.stride(1) == 1,
              "x must be bf16 [M, K] with contiguous rows");
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == torch::kBFloat16 && blocks.is_contiguous(),
              "blocks must be contiguous bf16 [N / W, K * W]");
  const int64_t m = x.size(0), k = x.size(1), count = blocks.size(0), lda = x.stride(0);
  const int64_t width = k > 0 ? blocks.size(1) / k : 0;
  TORCH_CHECK(k % 2 == 0 && known_width(width) && blocks.size(1) == k * width,
              "blocks do not hold ", k, " inputs per column");
  const int64_t n = count * width;
  auto out = torch::empty({m, n}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (m == 0 || n == 0) return out;
  const bool units = matrix_units();
  const int64_t rows_per_call = units ? kTileRows : kDotRows;
  const int64_t groups = (m + rows_per_call - 1) / rows_per_call;
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* bp = blocks.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, count * groups, 1, [&](int64_t begin, int64_t end) {
    float c[kTileRows * kMaxWidth];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t j = item / groups, g = item % groups;
      const int64_t first = g * m / groups, rows = (g + 1) * m / groups - first;
      pair_gemm(units, rows, width, k, lda, width, width, xp + first * lda, bp + j * k * width, c);
      store_bf16(c, rows, width, op + first * n + j * width, n);
    }
    if (units) at::native::cpublas::brgemm_release();
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "Whether small_batch_linear runs on this CPU (AMX or AVX512-BF16)");
  m.def("matrix_units", &matrix_units, "Whether the batch-reduce GEMM runs bf16 on this CPU (AMX)");
  m.def("packed_blocks", &packed_blocks, "oneDNN's packed weight buffer as [N / W, K * W] bf16 (shared)");
  m.def("small_batch_linear", &small_batch_linear, "x @ W.T from W's column blocks of bf16 pairs");
}
