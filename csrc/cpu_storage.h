// Storage <-> fp32 for the CPU kernels, one element (load / store) or kLanes of them (load_lanes / store_lanes:
// one register of the widest vector unit the file is compiled for), with the same bits either way. Raw is the
// element as the loops read and write it.
//   bfloat16: the raw bits with integer ops; store rounds to nearest even, a NaN keeps its top bits and is made
//     quiet (bit 6 set). The lane version is the same integer ops on vector lanes (with AVX2 the widening and the
//     packing as intrinsics: GCC's generic vector conversions cost a few shuffles more).
//   float16: c10's conversion, which is F16C's vcvtps2ph (round to nearest even) / vcvtph2ps when the target has
//     F16C; the lane version issues those instructions on a whole register (AVX-512F: its 16-lane forms), and
//     without F16C converts lane by lane with c10's portable code. (AVX512-BF16's vcvtneps2bf16 is not used: it
//     flushes subnormals.)
// The scalar conversions do not vectorize well (float16: not at all, _cvtss_sh is a one-lane intrinsic), so the
// loops are written on lanes.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace diffsampler {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float LanesF __attribute__((vector_size(4 * kLanes)));
typedef uint32_t LanesU __attribute__((vector_size(4 * kLanes)));
typedef int32_t LanesI __attribute__((vector_size(4 * kLanes)));
typedef uint16_t LanesU16 __attribute__((vector_size(2 * kLanes)));

struct F32 {
  using Raw = float;
  static float load(Raw v) { return v; }
  static Raw store(float v) { return v; }
  static LanesF load_lanes(const Raw* p) {
    LanesF v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store_lanes(Raw* p, LanesF v) { std::memcpy(p, &v, sizeof v); }
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
  static LanesF load_lanes(const Raw* p) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return __builtin_bit_cast(LanesF, _mm256_slli_epi32(wide, 16));
#else
    LanesU16 raw;
    std::memcpy(&raw, p, sizeof raw);
    return __builtin_bit_cast(LanesF, __builtin_convertvector(raw, LanesU) << 16);
#endif
  }
  // store()'s result in the top half of each lane (the quiet NaN as (u | 0x400000) >> 16, the NaN test as a
  // signed compare: both sides are below 2^31), then the halves packed.
  static void store_lanes(Raw* p, LanesF v) {
    const LanesU u = __builtin_bit_cast(LanesU, v);
    const LanesU rounded = u + 0x7FFFu + ((u >> 16) & 1u);
    const LanesI is_nan = __builtin_bit_cast(LanesI, u & 0x7FFFFFFFu) > 0x7F800000;
    const LanesU top = (is_nan ? u | 0x400000u : rounded) >> 16;
#if defined(__AVX2__) && !defined(__AVX512F__)
    const __m256i packed = _mm256_packus_epi32(__builtin_bit_cast(__m256i, top), __builtin_bit_cast(__m256i, top));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0xD8)));
#else
    const LanesU16 raw = __builtin_convertvector(top, LanesU16);
    std::memcpy(p, &raw, sizeof raw);
#endif
  }
};

struct F16 {
  using Raw = at::Half;
  static float load(Raw v) { return static_cast<float>(v); }
  static Raw store(float v) { return static_cast<Raw>(v); }
  static LanesF load_lanes(const Raw* p) {
#if defined(__AVX512F__)
    return __builtin_bit_cast(LanesF, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)
    return __builtin_bit_cast(LanesF, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    LanesF v;
    for (int l = 0; l < kLanes; ++l) v[l] = load(p[l]);
    return v;
#endif
  }
  static void store_lanes(Raw* p, LanesF v) {
#if defined(__AVX512F__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(__builtin_bit_cast(__m512, v), _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(__builtin_bit_cast(__m256, v), _MM_FROUND_TO_NEAREST_INT));
#else
    for (int l = 0; l < kLanes; ++l) p[l] = store(v[l]);
#endif
  }
};

// n < kLanes elements from p as lanes, zeros after them; store the first n lanes to p.
template <typename S>
inline LanesF load_partial_lanes(const typename S::Raw* p, int64_t n) {
  typename S::Raw buf[kLanes] = {};
  std::memcpy(buf, p, n * sizeof buf[0]);
  return S::load_lanes(buf);
}
template <typename S>
inline void store_partial_lanes(typename S::Raw* p, LanesF v, int64_t n) {
  typename S::Raw buf[kLanes];
  S::store_lanes(buf, v);
  std::memcpy(p, buf, n * sizeof buf[0]);
}

// The storage whose Raw is T.
template <typename T>
struct storage_of;
template <>
struct storage_of<float> {
  using type = F32;
};
template <>
struct storage_of<uint16_t> {
  using type = BF16;
};
template <>
struct storage_of<at::Half> {
  using type = F16;
};
template <typename T>
using StorageOf = typename storage_of<std::remove_const_t<T>>::type;

// fn(i, load, store) for i = begin, begin + kLanes, ... below end: load(p) gives the kLanes elements at p as fp32
// lanes and store(p, lanes) writes them, converting as p's element type (a Raw) says; the last, partial step's
// go through a zero-padded buffer, with the same conversions.
template <typename Fn>
inline void for_lanes(int64_t begin, int64_t end, Fn&& fn) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    fn(i, [](const auto* p) { return StorageOf<std::remove_pointer_t<decltype(p)>>::load_lanes(p); },
       [](auto* p, LanesF v) { StorageOf<std::remove_pointer_t<decltype(p)>>::store_lanes(p, v); });
  }
  if (i < end) {
    const int64_t n = end - i;
    fn(i, [n](const auto* p) { return load_partial_lanes<StorageOf<std::remove_pointer_t<decltype(p)>>>(p, n); },
       [n](auto* p, LanesF v) { store_partial_lanes<StorageOf<std::remove_pointer_t<decltype(p)>>>(p, v, n); });
  }
}

}  // namespace diffsampler
