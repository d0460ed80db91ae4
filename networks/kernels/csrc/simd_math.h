// Copyright MedAttnSlicer contributors. Apache-2.0.
//
// Small AVX-512 helpers shared by the FP32 and INT8 kernels.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

#include <cstdint>

namespace medattn {
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
}  // namespace medattn
#endif
