// Copyright MedAttnSlicer contributors. Apache-2.0.
//
// INT8 fused local self-attention on per-tensor affine uint8 q, k, v in channels-last layout (B, D, H, W, C), the
// layout FBGEMM's quantized convolutions produce. Output float32, channels-last (B, D, H, W, C) too, with an optional
// per-channel affine + ReLU epilogue (a folded BatchNorm -> ReLU).
//
// This TU builds the per-call plan (fixed-point rel, epilogue), holds the portable per-pixel path and dispatches
// row ranges (at::parallel_for) to the code path chosen by isa.cpp: the portable code below,
// local_attention_int8_avx2.cpp (AVX2, 8 pixels per ymm, vpmaddwd on zero-point-free int16 pairs) or
// local_attention_int8_avx512.cpp (AVX-512 VNNI/VBMI, 16 pixels per zmm, vpdpbusd on raw bytes). All three compute
// the same arithmetic (real value of a raw byte u with scale s and zero point z is s * (u - z)):
//  * q . k exactly in integers: sum_c (q - zq)(k - zk). Out-of-image keys are real 0 and add exactly 0.
//  * q . rel: rel is held as 16-bit fixed point per neighbour (rel16 = rel / s_n, |rel16| <= 32639, relative error
//    below 1.6e-5 of max|rel_n|); sum_c q rel16 on the raw bytes is exact in integers, the zero-point correction
//    zq * sum_c rel16 and the scales are applied in float.
//  * softmax in float. The weights relative to the largest, exp(l - max) in (0, 1], are rounded to 8 bits
//    (0..255, the largest is exactly 255) and normalised by their integer sum, so they sum to exactly 1.
//  * weighted value sum exactly in integers: sum_n w_n (v_n - zv), off-image values are real 0.
//  * epilogue in float: y = a_c * (acc * v_scale / sum w) + b_c (then ReLU).
// The vectorised paths differ from the portable one only in float rounding (their exp is a polynomial, the AVX-512
// path fuses some multiply-adds), which can move a rare 8-bit weight by one step.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "local_attention.h"

namespace medattn {
namespace {

constexpr int32_t kRel16Max = 127 * 256 + 127;  // largest |rel16| whose (hi, lo) split stays in [-128, 127]

// Quantities shared by all rows of one call.
struct Int8Plan {
  AttentionGeometry g;
  QuantizedOperand q, k, v;
  int64_t head_groups = 0;  // ceil(Ch / 4): dword groups of 4 channels per head (zero padded)
  int64_t groups = 0;       // heads * head_groups
  int64_t head_pairs = 0;   // ceil(Ch / 2): dword pairs of 2 channels per head (zero padded)
  int64_t pairs = 0;        // heads * head_pairs
  std::vector<int32_t> rel16;        // K x C
  std::vector<float> rel_scale;      // K: real rel = rel_scale[n] * rel16
  std::vector<int32_t> rel_hi, rel_lo;  // K x groups: 4 signed bytes per dword (channel padding 0), AVX-512
  std::vector<int32_t> rel_pairs;    // K x pairs: 2 int16 per dword (channel padding 0), AVX2
  std::vector<float> rel_sum;        // K x heads: sum of rel16 over the head's channels
  std::vector<int64_t> rel_sum16;    // the same, exact
  std::vector<float> out_scale, out_shift;  // C: the epilogue (1 / 0 when absent)
  bool relu = false;
};

Int8Plan make_plan(const QuantizedOperand& q, const QuantizedOperand& k, const QuantizedOperand& v,
                   const float* rel, const AttentionGeometry& g, const OutputEpilogue& epilogue) {
  Int8Plan plan;
  plan.g = g;
  plan.q = q;
  plan.k = k;
  plan.v = v;
  const int64_t C = g.channels, K = g.neighbours(), Ch = g.head_channels();
  plan.out_scale.assign(C, 1.f);
  plan.out_shift.assign(C, 0.f);
  if (epilogue.scale) std::copy(epilogue.scale, epilogue.scale + C, plan.out_scale.begin());
  if (epilogue.shift) std::copy(epilogue.shift, epilogue.shift + C, plan.out_shift.begin());
  plan.relu = epilogue.relu;
  plan.head_groups = (Ch + 3) / 4;
  plan.groups = g.heads * plan.head_groups;
  plan.head_pairs = (Ch + 1) / 2;
  plan.pairs = g.heads * plan.head_pairs;
  plan.rel16.assign(K * C, 0);
  plan.rel_scale.assign(K, 1.f);
  plan.rel_hi.assign(K * plan.groups, 0);
  plan.rel_lo.assign(K * plan.groups, 0);
  plan.rel_pairs.assign(K * plan.pairs, 0);
  plan.rel_sum.assign(K * g.heads, 0.f);
  plan.rel_sum16.assign(K * g.heads, 0);
  for (int64_t n = 0; n < K; ++n) {
    float max_abs = 0.f;
    for (int64_t c = 0; c < C; ++c) max_abs = std::max(max_abs, std::fabs(rel[n * C + c]));
    const float scale = max_abs > 0.f ? max_abs / static_cast<float>(kRel16Max) : 1.f;
    plan.rel_scale[n] = scale;
    for (int64_t h = 0; h < g.heads; ++h) {
      int64_t sum = 0;
      for (int64_t cc = 0; cc < Ch; ++cc) {
        const int64_t c = h * Ch + cc;
        int32_t r16 = static_cast<int32_t>(std::nearbyint(rel[n * C + c] / scale));
        r16 = std::min(kRel16Max, std::max(-kRel16Max, r16));
        plan.rel16[n * C + c] = r16;
        sum += r16;
        const int32_t hi = (r16 + 128) >> 8;  // floor((r16 + 128) / 256)
        const int32_t lo = r16 - 256 * hi;     // in [-128, 127]
        const int64_t gidx = n * plan.groups + h * plan.head_groups + cc / 4;
        const int shift = 8 * static_cast<int>(cc % 4);
        plan.rel_hi[gidx] = static_cast<int32_t>(static_cast<uint32_t>(plan.rel_hi[gidx]) |
                                                 (static_cast<uint32_t>(hi & 0xFF) << shift));
        plan.rel_lo[gidx] = static_cast<int32_t>(static_cast<uint32_t>(plan.rel_lo[gidx]) |
                                                 (static_cast<uint32_t>(lo & 0xFF) << shift));
        const int64_t pidx = n * plan.pairs + h * plan.head_pairs + cc / 2;
        plan.rel_pairs[pidx] = static_cast<int32_t>(static_cast<uint32_t>(plan.rel_pairs[pidx]) |
                                                    (static_cast<uint32_t>(r16 & 0xFFFF) << (16 * (cc % 2))));
      }
      plan.rel_sum[n * g.heads + h] = static_cast<float>(sum);
      plan.rel_sum16[n * g.heads + h] = sum;
    }
  }
  return plan;
}

// Per-pixel integer implementation of the same arithmetic (8-bit weights included): the path for machines
// without AVX2 and the cross-check of the vectorised ones.
void int8_portable_rows(const Int8Plan& plan, float* out, int64_t row_begin, int64_t row_end) {
  const AttentionGeometry& g = plan.g;
  const int64_t C = g.channels, Ch = g.head_channels(), K = g.neighbours(), P = g.pixels();
  const int64_t D = g.depth, H = g.height, W = g.width;
  const int32_t zq = plan.q.zero_point, zk = plan.k.zero_point, zv = plan.v.zero_point;
  const float sqk = plan.q.scale * plan.k.scale;
  std::vector<float> logits(K);
  std::vector<int32_t> weights(K);
  std::vector<const uint8_t*> kn(K), vn(K);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / (D * H), z = (row / H) % D, y = row % H;
    for (int64_t x = 0; x < W; ++x) {
      const uint8_t* qp = plan.q.data + (b * P + (z * H + y) * W + x) * C;
      for (int64_t n = 0; n < K; ++n) {
        const int64_t zz = z + g.dz(n), yy = y + g.dy(n), xx = x + g.dx(n);
        const bool valid = zz >= 0 && zz < D && yy >= 0 && yy < H && xx >= 0 && xx < W;
        const int64_t pix = b * P + (zz * H + yy) * W + xx;
        kn[n] = valid ? plan.k.data + pix * C : nullptr;
        vn[n] = valid ? plan.v.data + pix * C : nullptr;
      }
      for (int64_t h = 0; h < g.heads; ++h) {
        const int64_t c0 = h * Ch;
        float max_logit = -INFINITY;
        for (int64_t n = 0; n < K; ++n) {
          int64_t qk = 0, qrel = 0;
          for (int64_t c = c0; c < c0 + Ch; ++c) {
            if (kn[n]) qk += static_cast<int64_t>(qp[c] - zq) * (kn[n][c] - zk);
            qrel += static_cast<int64_t>(qp[c]) * plan.rel16[n * C + c];
          }
          const float rel_part = static_cast<float>(qrel) - static_cast<float>(zq) * plan.rel_sum[n * g.heads + h];
          logits[n] = sqk * static_cast<float>(qk) + plan.q.scale * plan.rel_scale[n] * rel_part;
          max_logit = std::max(max_logit, logits[n]);
        }
        int64_t weight_sum = 0;
        for (int64_t n = 0; n < K; ++n) {
          weights[n] = static_cast<int32_t>(std::nearbyint(std::exp(logits[n] - max_logit) * 255.f));
          weight_sum += weights[n];
        }
        const float norm = plan.v.scale / static_cast<float>(weight_sum);
        for (int64_t c = c0; c < c0 + Ch; ++c) {
          int64_t acc = 0;
          for (int64_t n = 0; n < K; ++n) {
            if (vn[n]) acc += static_cast<int64_t>(weights[n]) * (vn[n][c] - zv);
          }
          const float value = plan.out_scale[c] * (static_cast<float>(acc) * norm) + plan.out_shift[c];
          out[(b * P + (z * H + y) * W + x) * C + c] = plan.relu ? std::max(value, 0.f) : value;
        }
      }
    }
  }
}

Int8PlanView plan_view(const Int8Plan& plan) {
  Int8PlanView view;
  view.g = geometry_view(plan.g);
  view.q = plan.q.data;
  view.k = plan.k.data;
  view.v = plan.v.data;
  view.q_scale = plan.q.scale;
  view.k_scale = plan.k.scale;
  view.v_scale = plan.v.scale;
  view.q_zero = plan.q.zero_point;
  view.k_zero = plan.k.zero_point;
  view.v_zero = plan.v.zero_point;
  view.rel_scale = plan.rel_scale.data();
  view.rel_sum = plan.rel_sum.data();
  view.rel_sum16 = plan.rel_sum16.data();
  view.head_groups = plan.head_groups;
  view.groups = plan.groups;
  view.rel_hi = plan.rel_hi.data();
  view.rel_lo = plan.rel_lo.data();
  view.head_pairs = plan.head_pairs;
  view.pairs = plan.pairs;
  view.rel_pairs = plan.rel_pairs.data();
  view.out_scale = plan.out_scale.data();
  view.out_shift = plan.out_shift.data();
  view.relu = plan.relu ? 1 : 0;
  return view;
}

}  // namespace

void local_attention_int8(const QuantizedOperand& q, const QuantizedOperand& k, const QuantizedOperand& v,
                          const float* rel, float* out, const AttentionGeometry& geo, const OutputEpilogue& epilogue,
                          Isa isa) {
  const Int8Plan plan = make_plan(q, k, v, rel, geo, epilogue);
  const Int8PlanView view = plan_view(plan);
  at::parallel_for(0, geo.image_rows(), 1, [&](int64_t begin, int64_t end) {
    switch (isa) {
      case Isa::kAvx512Vnni: avx512::int8_rows(view, out, begin, end); break;
      case Isa::kAvx2: avx2::int8_rows(view, out, begin, end); break;
      default: int8_portable_rows(plan, out, begin, end); break;
    }
  });
}

}  // namespace medattn
