// Copyright MedAttnSlicer contributors. Apache-2.0.
//
// Fused local self-attention cores (inference only). Shared geometry and entry points of the FP32 and INT8
// kernels; the torch op registration lives in medattn_ops.cpp, the run-time choice of the code path (portable, AVX2,
// AVX-512 VNNI, by CPUID and MEDATTN_ISA) in isa.cpp, the per-ISA inner loops in the *_avx2.cpp / *_avx512.cpp
// translation units behind isa_kernels.h. Only baseline-compiled TUs include this header.
//
// Contract (both kernels), for every pixel p and head h (channels [h*C/heads, (h+1)*C/heads)):
//   logit[h, n] = sum_{c in h} q[c, p] * (kpad[c, p + n] + rel[n, c])
//   w = softmax_n(logit)
//   y[c, p] = sum_n w[h(c), n] * vpad[c, p + n]
// Neighbours n enumerate {-r..r}^d row-major (first spatial axis slowest), r = kernel_size / 2; kpad / vpad are
// zero outside the image. No 1/sqrt(d) scaling.
#pragma once

#include <cstdint>
#include <string>

#include "isa_kernels.h"

namespace medattn {

// Shape of one call. 2D inputs are treated as 3D with depth 1 and a window of depth 1.
struct AttentionGeometry {
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t heads = 1;
  int64_t depth = 1;
  int64_t height = 0;
  int64_t width = 0;
  int64_t kernel_size = 1;
  bool volumetric = false;  // true: 3 spatial dims, the window also spans depth

  int64_t radius() const { return kernel_size / 2; }
  int64_t window_depth() const { return volumetric ? kernel_size : 1; }
  // neighbour rows of the window: (dz, dy) pairs, each holding kernel_size taps along x
  int64_t window_rows() const { return window_depth() * kernel_size; }
  int64_t neighbours() const { return window_rows() * kernel_size; }
  int64_t head_channels() const { return channels / heads; }
  int64_t pixels() const { return depth * height * width; }
  int64_t image_rows() const { return batch * depth * height; }
  // offsets of neighbour n along (z, y, x)
  int64_t dz(int64_t n) const { return volumetric ? n / (kernel_size * kernel_size) - radius() : 0; }
  int64_t dy(int64_t n) const { return (n / kernel_size) % kernel_size - radius(); }
  int64_t dx(int64_t n) const { return n % kernel_size - radius(); }
};

// The plain-struct copy of a geometry handed to the ISA TUs.
GeometryView geometry_view(const AttentionGeometry& g);

// Code path selection (isa.cpp). cpu_best_isa: the best path this CPU can run (CPUID, checked once). selected_isa:
// the path the public ops use, chosen once: MEDATTN_ISA (avx512_vnni | avx2 | portable; unset, empty or "native" =
// the best) if set, else the best; raises (c10::Error -> RuntimeError) for an unknown name or an ISA this CPU lacks.
const char* isa_name(Isa isa);
Isa cpu_best_isa();
bool cpu_supports(Isa isa);
Isa selected_isa();
// Parses an ISA name and checks that this CPU can run it (raises otherwise); `what` names the caller in messages.
Isa require_isa(const std::string& name, const char* what);

// FP32. q, k, v, out: contiguous (B, C, D, H, W) float; rel: contiguous (K, C).
void local_attention_fp32(const float* q, const float* k, const float* v, const float* rel, float* out,
                          const AttentionGeometry& geo, Isa isa);

// Per-tensor affine uint8 operand: raw data in channels-last layout (B, D, H, W, C) and its quantisation.
struct QuantizedOperand {
  const uint8_t* data = nullptr;
  float scale = 1.f;
  int32_t zero_point = 0;
};

// Per-channel epilogue of the INT8 core: y[c] = a[c] * attention[c] + b[c], then max(y, 0) if relu. It folds a
// following eval BatchNorm, ReLU and the undoing of value equalisation into the store, so the network does not
// read and write the activation three more times. Null a / b mean 1 / 0.
struct OutputEpilogue {
  const float* scale = nullptr;  // (C,)
  const float* shift = nullptr;  // (C,)
  bool relu = false;
};

// INT8. q, k, v: channels-last uint8; rel: contiguous (K, C) float; out: channels-last (B, D, H, W, C) float, the
// layout the next layer's quantized 1x1 projections read (an NC[D]HW output cost a repack per layer).
void local_attention_int8(const QuantizedOperand& q, const QuantizedOperand& k, const QuantizedOperand& v,
                          const float* rel, float* out, const AttentionGeometry& geo, const OutputEpilogue& epilogue,
                          Isa isa);

}  // namespace medattn
