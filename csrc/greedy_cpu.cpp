// Greedy sampling on the CPU: the index of each row's largest logit, one pass per row, rows in
// parallel. torch's argmax runs one row at a time and, with the NaN filter before it, reads a
// [64, 49152] logits tensor three times; at decode sizes that took about 2.5 ms a step.
//
// Rule (services/gpu_worker/sampling.py:greedy_tokens_reference): NaN never wins, +inf beats every
// finite value, ties go to the lowest index, and a row with nothing above -inf gives 0.
// tests/unit/gpu_worker/test_greedy_cpu.py checks the kernel against the reference.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <limits>

namespace {

// The largest non-NaN value of x[0:n] (-inf when there is none); vectorizes (NaN compares false).
float row_max(const float* x, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : best)
  for (int64_t i = 0; i < n; ++i) best = x[i] > best ? x[i] : best;
  return best;
}

int64_t row_argmax(const float* x, int64_t n) {
  const float best = row_max(x, n);
  if (best == -std::numeric_limits<float>::infinity()) return 0;
  for (int64_t i = 0; i < n; ++i)
    if (x[i] == best) return i;
  return 0;
}

// logits: [N, V] float32 with contiguous rows -> [N] int64.
torch::Tensor greedy_tokens(const torch::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32 && logits.stride(1) == 1,
              "logits must be float32 [N, V] with contiguous rows");
  const int64_t rows = logits.size(0), n = logits.size(1), stride = logits.stride(0);
  auto out = torch::empty({rows}, logits.options().dtype(torch::kInt64));
  const float* x = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = row_argmax(x + r * stride, n);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("greedy_tokens", &greedy_tokens, "Index of each row's largest logit (NaN never wins, ties to the lowest)");
}
