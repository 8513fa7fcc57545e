// IEEE half <-> float conversions for the portable CPU code (header-only, no ISA assumptions).
#pragma once
#include <cstdint>
#include <cstring>

namespace lola {

// Round to nearest even with subnormals, as torch's .to(float16) does; NaN stays NaN.
inline uint16_t float_to_half(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t sign = (bits >> 16) & 0x8000u;
  uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) return static_cast<uint16_t>(sign | (magnitude > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (magnitude < 0x38800000u) {
    // Subnormal half: adding 0.5 puts the half's last mantissa bit at the float's, so the FPU
    // rounds (to nearest even) exactly where the half does.
    float shifted;
    std::memcpy(&shifted, &magnitude, sizeof(shifted));
    shifted += 0.5f;
    uint32_t shifted_bits;
    std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
    return static_cast<uint16_t>(sign | (shifted_bits - 0x3f000000u));
  }
  const uint32_t odd = (magnitude >> 13) & 1u;
  magnitude += 0xc8000fffu + odd;  // exponent rebias (-112) plus round-to-nearest-even
  return static_cast<uint16_t>(sign | (magnitude >> 13));
}

}  // namespace lola
