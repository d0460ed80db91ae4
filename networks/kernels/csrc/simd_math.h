// Copyright MedAttnSlicer contributors. Apache-2.0.
//
// Small helpers of the per-ISA translation units. Include this header only from an ISA TU, AFTER its
// `#pragma GCC push_options` / `#pragma GCC target(...)` and after defining MEDATTN_SIMD_AVX2 or MEDATTN_SIMD_AVX512:
// everything here is in an anonymous namespace, so each TU gets its own copy compiled for its own ISA and no
// function with external linkage (which the linker could share with a baseline TU) is created.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

namespace medattn {
namespace {

// A zero-initialised, 64-byte aligned array owned by a row worker (std::vector would instantiate shared template
// code inside an ISA TU).
template <typename T>
class ScratchBuffer {
 public:
  ScratchBuffer() = default;
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ~ScratchBuffer() { std::free(data_); }

  void allocate(int64_t count) {
    std::free(data_);
    data_ = nullptr;
    size_ = count;
    const size_t bytes = (static_cast<size_t>(count > 0 ? count : 1) * sizeof(T) + 63) / 64 * 64;
    void* p = nullptr;
    if (posix_memalign(&p, 64, bytes) != 0) throw std::bad_alloc();
    std::memset(p, 0, bytes);
    data_ = static_cast<T*>(p);
  }
  void fill(T value) {
    for (int64_t i = 0; i < size_; ++i) data_[i] = value;
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }
  int64_t size() const { return size_; }

 private:
  T* data_ = nullptr;
  int64_t size_ = 0;
};

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

#if defined(MEDATTN_SIMD_AVX512)
namespace simd {

constexpr int kLanes = 16;  // floats / int32 per zmm register

// exp(x) for the softmax, where x = logit - max <= 0. Range reduction x = n ln2 + r, |r| <= ln2/2, a degree-7
// polynomial for e^r (relative error ~2e-7, i.e. about one float ulp) and 2^n applied with scalef. Inputs below
// -87 are clamped (their exp is < 2e-38 and only ever added to a sum that contains exp(0) = 1).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 split in a part exact in float and a correction, so x - n ln2 loses no bits
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Lanes i of a 16-pixel tile starting at x0 whose pixel x0 + i lies in [0, width) and whose neighbour at
// x0 + i + shift lies in [0, width) too.
inline __mmask16 tile_mask(int64_t x0, int64_t shift, int64_t width) {
  int64_t lo = -(x0 + shift);
  if (lo < 0) lo = 0;
  int64_t hi = width - x0;
  if (width - x0 - shift < hi) hi = width - x0 - shift;
  if (hi > kLanes) hi = kLanes;
  if (hi <= lo) return 0;
  const uint32_t upto = (hi >= 32) ? 0xFFFFFFFFu : ((1u << hi) - 1u);
  return static_cast<__mmask16>(upto & ~((1u << lo) - 1u));
}

}  // namespace simd
#endif  // MEDATTN_SIMD_AVX512

#if defined(MEDATTN_SIMD_AVX2)
namespace simd {

constexpr int kLanes = 8;  // floats / int32 per ymm register

// exp(x) for x = logit - max <= 0: the same range reduction and polynomial as the AVX-512 version; AVX2 has no
// scalef, so 2^n is built from its exponent bits. x >= -87 gives n >= -126, a normal float's exponent.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
}

// All-ones lanes i < count (count clamped to [0, 8]): the store mask of a tile's first `count` pixels.
inline __m256i lane_mask(int64_t count) {
  const int32_t c = static_cast<int32_t>(count < 0 ? 0 : (count > kLanes ? kLanes : count));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// In-register transpose of an 8 x 8 matrix of dwords: r[i] lane j -> r[j] lane i.
inline void transpose8x8_epi32(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int a = 0; a < 2; ++a) {
    u[4 * a + 0] = _mm256_unpacklo_epi64(t[4 * a], t[4 * a + 2]);
    u[4 * a + 1] = _mm256_unpackhi_epi64(t[4 * a], t[4 * a + 2]);
    u[4 * a + 2] = _mm256_unpacklo_epi64(t[4 * a + 1], t[4 * a + 3]);
    u[4 * a + 3] = _mm256_unpackhi_epi64(t[4 * a + 1], t[4 * a + 3]);
  }
  // u[4a + e], 128-bit lane L, holds column 4L + e of rows 4a .. 4a + 3
  for (int e = 0; e < 4; ++e) {
    r[e] = _mm256_permute2x128_si256(u[e], u[4 + e], 0x20);
    r[4 + e] = _mm256_permute2x128_si256(u[e], u[4 + e], 0x31);
  }
}

}  // namespace simd
#endif  // MEDATTN_SIMD_AVX2

}  // namespace
}  // namespace medattn
