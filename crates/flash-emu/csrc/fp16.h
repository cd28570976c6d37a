// The 16-bit float formats of both dialect shims (CUDA __half / __nv_bfloat16, MSL half /
// bfloat) as bits: IEEE binary16 and bfloat16 to and from f32, rounding to nearest even (as the
// GPUs' float -> half / bfloat conversions do).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace emu_fp {

inline float bits_to_f32(uint32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
inline uint32_t f32_to_bits(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
}

inline float half_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) {  // zero or subnormal: m * 2^-24
        const float v = std::ldexp((float)m, -24);
        return sign ? -v : v;
    }
    if (e == 31) return bits_to_f32(sign | 0x7f800000u | (m << 13));  // inf, nan
    return bits_to_f32(sign | ((e + 112) << 23) | (m << 13));
}

inline uint16_t f32_to_half(float f) {
    const uint32_t x = f32_to_bits(f);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | (ax > 0x7f800000u ? 0x7e00 : 0x7c00));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);  // rounds past 65504: inf
    if (ax < 0x38800000u)  // below 2^-14: subnormal half, m * 2^-24 (exact scaling, RNE)
        return (uint16_t)(sign | (uint16_t)std::nearbyint(bits_to_f32(ax) * 16777216.0f));
    uint32_t h = (((ax >> 23) - 112) << 10) | ((ax & 0x7fffff) >> 13);
    const uint32_t rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
    return (uint16_t)(sign | h);
}

inline float bf16_to_f32(uint16_t b) { return bits_to_f32((uint32_t)b << 16); }

inline uint16_t f32_to_bf16(float f) {
    uint32_t x = f32_to_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);  // quiet NaN
    x += 0x7fffu + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

}  // namespace emu_fp
