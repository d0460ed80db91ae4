// Copyright MedAttnSlicer contributors. Apache-2.0.
//
// Interface between the baseline-compiled code (op registration, plan building, at::parallel_for, dispatch) and the
// per-ISA translation units (*_avx2.cpp, *_avx512.cpp). Those TUs compile their code with `#pragma GCC target`, so
// anything they define with external linkage may contain AVX2 / AVX-512 instructions; if such a function were an
// inline or template function also emitted by a baseline TU (std::vector, ATen, a member function of a shared
// struct, ...), the linker would keep one copy for all TUs and a portable machine could execute AVX-512 code. Hence
// this header holds only plain structs without member functions and the one exported entry point per kernel and ISA;
// everything else in the ISA TUs lives in anonymous namespaces.
#pragma once

#include <cstdint>

namespace medattn {

// Code paths, in increasing order of the CPU features they need.
enum class Isa : int {
  kPortable = 0,    // baseline x86-64 (SSE2) C++
  kAvx2 = 1,        // AVX2 + FMA, 8 lanes
  kAvx512Vnni = 2,  // AVX-512 F/BW/DQ/VL + VNNI + VBMI, 16 lanes
};

// Geometry of one call with every derived quantity precomputed (AttentionGeometry's member functions are inline
// functions and must not be compiled inside an ISA TU).
struct GeometryView {
  int64_t batch, channels, heads, depth, height, width, kernel_size;
  int64_t volumetric;  // 1: 3 spatial dims, the window also spans depth
  int64_t radius, window_depth, window_rows, neighbours, head_channels, pixels;
};

// FP32 call: contiguous (B, C, D, H, W) q, k, v and out, (K, C) rel.
struct Fp32View {
  GeometryView g;
  const float* q;
  const float* k;
  const float* v;
  const float* rel;
};

// INT8 call: channels-last uint8 q, k, v with their quantisation, and the plan built by local_attention_int8.cpp.
struct Int8PlanView {
  GeometryView g;
  const uint8_t* q;
  const uint8_t* k;
  const uint8_t* v;
  float q_scale, k_scale, v_scale;
  int32_t q_zero, k_zero, v_zero;
  const float* rel_scale;   // K: real rel = rel_scale[n] * rel16
  const float* rel_sum;     // K x heads: sum of rel16 over the head's channels (float, as the portable path uses it)
  const int64_t* rel_sum16; // K x heads: the same sum, exact
  // AVX-512 VNNI: rel16 = 256 hi + lo as signed bytes, 4 channels per dword
  int64_t head_groups, groups;  // ceil(Ch / 4), heads * head_groups
  const int32_t* rel_hi;        // K x groups
  const int32_t* rel_lo;        // K x groups
  // AVX2: rel16 as int16, 2 channels per dword
  int64_t head_pairs, pairs;    // ceil(Ch / 2), heads * head_pairs
  const int32_t* rel_pairs;     // K x pairs
  const float* out_scale;       // C (1 when absent)
  const float* out_shift;       // C (0 when absent)
  int32_t relu;
};

// Row-range workers: image rows [row_begin, row_end) (row = (b, z, y)). Call only when the CPU has the ISA.
namespace avx2 {
void fp32_rows(const Fp32View& view, float* out, int64_t row_begin, int64_t row_end);
void int8_rows(const Int8PlanView& plan, float* out, int64_t row_begin, int64_t row_end);
}  // namespace avx2
namespace avx512 {
void fp32_rows(const Fp32View& view, float* out, int64_t row_begin, int64_t row_end);
void int8_rows(const Int8PlanView& plan, float* out, int64_t row_begin, int64_t row_end);
}  // namespace avx512

}  // namespace medattn
