// The decoder layer's elementwise ops on the CPU, each one pass over its rows: RMSNorm (with the
// residual add folded in), SiLU(gate) * up, and the rotary embedding of q and k. In eager torch each is five to seven passes over
// bf16 tensors with float32 temporaries; at prefill sizes they cost as much as a GEMM.
//
// The results follow eager torch's rounding step by step (float32 math, bf16 rounding where torch
// rounds), so they match the plain-torch references in services/gpu_worker/layer_ops.py up to the
// order of one float32 sum; tests/unit/gpu_worker/test_layer_ops.py checks them.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "fast_exp.h"

namespace {

constexpr int64_t kRowGrain = 8;

// out = w * round(x * rsqrt(mean(x^2) + eps)), one row of ``h`` values.
template <typename T>
void norm_row(const T* x, const T* w, T* out, int64_t h, float eps) {
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < h; ++i) {
    const float v = to_float(x[i]);
    squares += v * v;
  }
  const float inv = 1.0f / std::sqrt(squares / static_cast<float>(h) + eps);
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) out[i] = round_to<T>(to_float(w[i]) * to_float(round_to<T>(to_float(x[i]) * inv)));
}

template <typename T>
void add_row(T* x, const T* delta, int64_t h) {
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) x[i] = round_to<T>(to_float(x[i]) + to_float(delta[i]));
}

// out = round(round(silu(gate)) * up) over one row; gate and up are the halves of a fused row.
template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = to_float(gate[i]);
    const float silu = to_float(round_to<T>(g / (1.0f + fast_exp(-g))));
    out[i] = round_to<T>(silu * to_float(up[i]));
  }
}

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " must be [T, H] with contiguous rows");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32,
              name, " must be float32 or bfloat16");
}

template <typename Fn>
void dispatch(const torch::Tensor& x, Fn&& fn) {
  if (x.scalar_type() == torch::kBFloat16) {
    fn(at::BFloat16{});
  } else {
    fn(float{});
  }
}

// x: [T, H], weight: [H] -> RMSNorm(x) [T, H].
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(), "weight must be contiguous [H] of x's dtype");
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  const int64_t h = x.size(1), stride = x.stride(0);
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, x.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) norm_row(xp + r * stride, wp, op + r * h, h, static_cast<float>(eps));
    });
  });
  return out;
}

// x += delta (in place, x: [T, H] contiguous), then RMSNorm(x) [T, H].
torch::Tensor add_rms_norm_(torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& weight,
                            double eps) {
  check_rows(x, "x");
  check_rows(delta, "delta");
  TORCH_CHECK(x.is_contiguous() && x.sizes() == delta.sizes() && x.scalar_type() == delta.scalar_type(),
              "x must be contiguous and delta of its shape and dtype");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(), "weight must be contiguous [H] of x's dtype");
  auto out = torch::empty_like(x);
  const int64_t h = x.size(1), dstride = delta.stride(0);
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    T* xp = x.data_ptr<T>();
    const T* dp = delta.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, x.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        add_row(xp + r * h, dp + r * dstride, h);
        norm_row(xp + r * h, wp, op + r * h, h, static_cast<float>(eps));
      }
    });
  });
  return out;
}

// gate_up: [T, 2I] (gate | up) -> SiLU(gate) * up [T, I].
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even width");
  const int64_t n = gate_up.size(1) / 2, stride = gate_up.stride(0);
  auto out = torch::empty({gate_up.size(0), n}, gate_up.options());
  dispatch(gate_up, [&](auto tag) {
    using T = decltype(tag);
    const T* gp = gate_up.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, gate_up.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_mul_row(gp + r * stride, gp + r * stride + n, op + r * n, n);
    });
  });
  return out;
}

// out = round(round(x * cos) + round(rotate_half(x) * sin)) for one head of ``d`` values, where
// rotate_half(x) = (-x[half:], x[:half]); one loop per half so each is a plain vector loop.
template <typename T>
void rope_half(const T* x, const T* rotated, float sign, const T* cos, const T* sin, T* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float a = to_float(round_to<T>(to_float(x[i]) * to_float(cos[i])));
    const float b = to_float(round_to<T>(sign * to_float(rotated[i]) * to_float(sin[i])));
    out[i] = round_to<T>(a + b);
  }
}

template <typename T>
void rope_head(const T* x, const T* cos, const T* sin, T* out, int64_t d) {
  const int64_t half = d / 2;
  rope_half(x, x + half, -1.0f, cos, sin, out, half);
  rope_half(x + half, x, 1.0f, cos + half, sin + half, out + half, half);
}

// x: [T, H, D] (rows may be strided, heads contiguous), cos/sin: [P, D], positions: [T] int64
// -> rotated x [T, H, D] contiguous.
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                   const torch::Tensor& positions) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "x must be [T, H, D] with contiguous heads");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32, "x must be float32 or bfloat16");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == x.size(2) && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "cos and sin must be contiguous [P, D] tables of x's dtype");
  TORCH_CHECK(x.size(2) % 2 == 0, "head_dim must be even");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == x.size(0) && positions.scalar_type() == torch::kInt64,
              "positions must be int64 [T]");
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2), stride = x.stride(0);
  const int64_t* pp = positions.contiguous().data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(pp[t] >= 0 && pp[t] < cos.size(0), "a position is out of range");
  auto out = torch::empty({tokens, heads, d}, x.options());
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* cp = cos.data_ptr<T>();
    const T* sp = sin.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, tokens, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t h = 0; h < heads; ++h)
          rope_head(xp + t * stride + h * d, cp + pp[t] * d, sp + pp[t] * d, op + (t * heads + h) * d, d);
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (HF Llama rounding)");
  m.def("add_rms_norm_", &add_rms_norm_, "x += delta in place, then RMSNorm of each row");
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up of a fused [T, 2I] gate|up");
  m.def("rope", &rope, "Rotary embedding (rotate_half form) of [T, H, D] at positions");
}
