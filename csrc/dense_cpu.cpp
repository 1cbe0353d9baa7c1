// Decode-sized GEMMs on oneDNN's packed bf16 weights, through torch's batch-reduce GEMM (AMX).
//
// services/gpu_worker/dense.py packs each bf16 base weight once with oneDNN. On this CPU oneDNN
// lays a [N, K] weight out as AB16b32a2b: blocks of 32 output columns, each block the K inputs as
// bf16 pairs, [N / 32, K / 2, 32, 2] -- the pair layout the batch-reduce GEMM reads as its B
// operand (dense.py:vnni_blocks is the plain-torch definition, and DenseWeight checks every packed
// weight against it before it uses this op). oneDNN's own matmul on that buffer is the fastest at
// prefill sizes, but not at decode sizes: SmolLM2-135M's 30 layers of projections and its LM head,
// weights out of cache, same run: 8 tokens 11.2 -> 8.7 ms with this op, 32 tokens 13.8 -> 11.4 ms;
// from 40 tokens up oneDNN is faster (12.8 vs 15.9 ms), see docs/engine_performance.md round 5.
//
// small_batch_linear deals the 32-column blocks out to the threads; each block is one GEMM per
// 32 rows of x into a float tile, rounded to bf16 into its columns of the output.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <optional>

namespace at::native {
// Exported by libtorch_cpu (used by torch's ahead-of-time inductor); ATen does not install the header.
TORCH_API void* data_ptr_from_mkldnn(const at::Tensor& mkldnn_tensor);
TORCH_API int64_t nbytes_from_mkldnn(const at::Tensor& mkldnn_tensor);
}  // namespace at::native

namespace {

constexpr int64_t kBlock = 32;  // output columns per packed block
constexpr int64_t kRows = 32;   // rows of x per GEMM

// Whether the batch-reduce GEMM runs bf16 on this CPU.
bool available() { return at::native::cpublas::could_pack(torch::kBFloat16); }

// oneDNN's packed buffer of an [N, K] bf16 weight as a [N / 32, K * 32] bf16 tensor that shares
// it (and keeps the packed tensor alive); nullopt when the buffer is not N * K values.
std::optional<torch::Tensor> packed_blocks(const torch::Tensor& packed, int64_t n, int64_t k) {
  TORCH_CHECK(packed.is_mkldnn(), "packed must be an oneDNN tensor");
  if (n % kBlock != 0 || k % 2 != 0 || at::native::nbytes_from_mkldnn(packed) != n * k * 2) return std::nullopt;
  return torch::from_blob(at::native::data_ptr_from_mkldnn(packed), {n / kBlock, k * kBlock},
                          [keep = packed](void*) mutable { keep.reset(); },
                          torch::TensorOptions().dtype(torch::kBFloat16));
}

// rows x 32 floats (contiguous) -> rows of out, ``stride`` apart, rounded to nearest even.
void store_bf16(const float* c, int64_t rows, at::BFloat16* out, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
#if defined(__AVX512BF16__)
    for (int64_t e = 0; e < kBlock; e += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * stride + e),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(c + r * kBlock + e)));
#else
    for (int64_t e = 0; e < kBlock; ++e) out[r * stride + e] = at::BFloat16(c[r * kBlock + e]);
#endif
  }
}

// x: [M, K] bf16 with contiguous rows; blocks: [N / 32, K * 32] bf16 (dense.py:vnni_blocks of W).
// Returns x @ W.T, [M, N] bf16 (float accumulation, one rounding).
torch::Tensor small_batch_linear(const torch::Tensor& x, const torch::Tensor& blocks) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.stride(1) == 1,
              "x must be bf16 [M, K] with contiguous rows");
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == torch::kBFloat16 && blocks.is_contiguous(),
              "blocks must be contiguous bf16 [N / 32, K * 32]");
  const int64_t m = x.size(0), k = x.size(1), count = blocks.size(0), n = count * kBlock, lda = x.stride(0);
  TORCH_CHECK(k % 2 == 0 && blocks.size(1) == k * kBlock, "blocks do not hold ", k, " inputs per column");
  auto out = torch::empty({m, n}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (m == 0 || n == 0) return out;
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* bp = blocks.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    float c[kRows * kBlock];
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t first = 0; first < m; first += kRows) {
        const int64_t rows = std::min(kRows, m - first);
        at::native::cpublas::brgemm(rows, kBlock, k, lda, kBlock, kBlock, false, xp + first * lda,
                                    bp + j * k * kBlock, c);
        store_bf16(c, rows, op + first * n + j * kBlock, n);
      }
    }
    at::native::cpublas::brgemm_release();
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "Whether the batch-reduce GEMM runs bf16 on this CPU");
  m.def("packed_blocks", &packed_blocks, "oneDNN's packed weight buffer as [N / 32, K * 32] bf16 (shared)");
  m.def("small_batch_linear", &small_batch_linear, "x @ W.T from W's 32-column bf16-pair blocks");
}
