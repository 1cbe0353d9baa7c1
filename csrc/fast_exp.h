// exp(x) in float32 without a library call, so loops that use it vectorize (the kernels in this
// folder include it). Relative error about 2e-7: x = k ln2 + r with |r| <= ln2 / 2, exp(r) by
// Cephes' degree-6 polynomial, 2^k from the exponent bits. Below -87 it gives about 1e-38 (not
// 0), above 88.7 it gives +inf, as expf overflows.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

inline float fast_exp(float x) {
  const bool overflow = x > 88.72283935546875f;
  x = std::min(std::max(x, -87.0f), 88.0f);
  // k = round(x / ln2) by the 1.5 * 2^23 trick (std::floor would not vectorize)
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return overflow ? std::numeric_limits<float>::infinity() : e * scale;
}
