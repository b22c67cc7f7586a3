// Storage <-> fp32 for the CPU kernels; Raw is the element as the loops read and write it. bfloat16 is done on
// the raw bits with integer ops (round to nearest even, NaN kept quiet) so its loops vectorize; float16 uses
// c10's conversion (scalar unless built with F16C).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace diffsampler {

struct F32 {
  using Raw = float;
  static float load(Raw v) { return v; }
  static Raw store(float v) { return v; }
};
struct BF16 {
  using Raw = uint16_t;
  static float load(Raw v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16); }
  static Raw store(float v) {
    const uint32_t u = __builtin_bit_cast(uint32_t, v);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    return static_cast<Raw>((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
  }
};
struct F16 {
  using Raw = at::Half;
  static float load(Raw v) { return static_cast<float>(v); }
  static Raw store(float v) { return static_cast<Raw>(v); }
};

}  // namespace diffsampler
