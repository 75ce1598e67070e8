// Storage dtypes and host-side float <-> half / bfloat16 conversion (round to nearest even).
// Host-only helpers: kernels use cuda_fp16.h / cuda_bf16.h intrinsics instead.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace trimkv {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline size_t dtype_size(DType t) { return t == DType::kF32 ? 4 : 2; }

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32:
      return "fp32";
    case DType::kF16:
      return "fp16";
    case DType::kBF16:
      return "bf16";
  }
  return "?";
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  // Round to nearest, ties to even.
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_fp16(float f) {
  uint32_t x = float_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {  // inf or NaN
    return static_cast<uint16_t>(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
  }
  if (absx >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  int32_t exp = static_cast<int32_t>(absx >> 23) - 127;
  uint32_t mant = absx & 0x7fffffu;
  if (exp >= -14) {  // normal half
    uint32_t h = (static_cast<uint32_t>(exp + 15) << 10) | (mant >> 13);
    uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;  // may carry into exponent: fine
    return static_cast<uint16_t>(sign | h);
  }
  if (exp < -25) return static_cast<uint16_t>(sign);  // underflows to zero
  // Subnormal half: value = mant_full * 2^(exp-23), unit 2^-24.
  uint32_t mant_full = mant | 0x800000u;
  const int shift = -exp - 1;  // drop bits so that the unit becomes 2^-24
  uint32_t h = mant_full >> shift;
  uint32_t rest = mant_full & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1);
  if (rest > half || (rest == half && (h & 1u))) h += 1;
  return static_cast<uint16_t>(sign | h);
}

/// Branch-free half -> float: the exponent is rebased by a multiply (which also handles inf
/// and NaN), subnormal halves go through a magic-number subtraction. Exact for every input.
inline float fp16_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;  // drops the sign
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t sub = 0u - static_cast<uint32_t>(two_w < (1u << 27));  // all ones for subnormals
  const uint32_t mag = (float_bits(denormalized) & sub) | (float_bits(normalized) & ~sub);
  return bits_float(sign | mag);
}

/// Reads element i of a buffer of dtype t as float.
inline float load_as_float(const void* p, DType t, size_t i) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(p)[i];
    case DType::kF16:
      return fp16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kBF16:
      return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
  return 0.f;
}

/// Writes element i of a buffer of dtype t from a float (rounded to nearest even).
inline void store_from_float(void* p, DType t, size_t i, float v) {
  switch (t) {
    case DType::kF32:
      static_cast<float*>(p)[i] = v;
      break;
    case DType::kF16:
      static_cast<uint16_t*>(p)[i] = float_to_fp16(v);
      break;
    case DType::kBF16:
      static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
      break;
  }
}

/// Converts n elements starting at element `first` of a dtype-t buffer to float: the switch
/// sits outside the loop so each loop is a plain, vectorisable conversion.
inline void to_float_n(const void* p, DType t, size_t first, size_t n, float* dst) {
  switch (t) {
    case DType::kF32:
      std::memcpy(dst, static_cast<const float*>(p) + first, n * 4);
      break;
    case DType::kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(p) + first;
      for (size_t i = 0; i < n; ++i) dst[i] = fp16_to_float(s[i]);
      break;
    }
    case DType::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(p) + first;
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
      break;
    }
  }
}

}  // namespace trimkv
