// float32 <-> storage type (float or bf16) as plain inline code the compiler vectorizes, for the
// kernels in this folder. round_to rounds as torch does: bf16 to nearest even, NaN kept a NaN.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

inline float to_float(float v) { return v; }

inline float to_float(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T>
inline T round_to(float v);

template <>
inline float round_to<float>(float v) { return v; }

template <>
inline c10::BFloat16 round_to<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  c10::BFloat16 out;
  out.x = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
  return out;
}
