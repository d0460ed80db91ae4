// Copyright MedAttnSlicer contributors. Apache-2.0.
//
// FP32 fused local self-attention on contiguous (B, C, D, H, W) tensors: the portable per-pixel path and the
// dispatcher. at::parallel_for hands each thread a contiguous range of image rows (b, z, y); the thread runs the
// code path chosen by isa.cpp on them: the plain C++ below, or the row workers of local_attention_fp32_avx2.cpp
// (8 lanes, AVX2 + FMA) / local_attention_fp32_avx512.cpp (16 lanes, AVX-512), which share one design:
//
// Each thread copies the rows it needs into small buffers: the query row and, for keys and values, the window rows
// (b, z + dz, y + dy) held in a row cache indexed by (z mod kd, y mod k), so every input row is read from memory
// once per thread. Buffered rows are padded with r zeros on both sides (zero outside the image, no masks in the
// inner loops) and their channel stride is an odd number of cache lines (in the NCHW tensor itself the channel
// stride H*W*4 is often a multiple of 4 KiB and all channels of a pixel would compete for one cache set).
// A row is processed in tiles of 8 / 16 pixels along x. For a tile and a head, the logits of a block of up to 9
// neighbours stay in registers while the head's channels stream by (q loaded once per channel; per neighbour one
// shifted key load and two FMAs, q * k and q * rel), the softmax over all K neighbours runs on a K x lanes buffer
// in L1, and the output accumulates 8 channels at a time from the shifted value rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "local_attention.h"

namespace medattn {
namespace {

// Straightforward per-pixel implementation: the path for machines without AVX2 and the
// cross-check of the vectorised ones in tests.
void fp32_portable_rows(const float* q, const float* k, const float* v, const float* rel, float* out,
                        const AttentionGeometry& g, int64_t row_begin, int64_t row_end) {
  const int64_t C = g.channels, Ch = g.head_channels(), K = g.neighbours(), P = g.pixels();
  const int64_t D = g.depth, H = g.height, W = g.width;
  std::vector<float> logits(K);
  std::vector<int64_t> neighbour_offset(K);
  std::vector<char> neighbour_valid(K);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / (D * H), z = (row / H) % D, y = row % H;
    const int64_t batch_off = b * C * P;
    for (int64_t x = 0; x < W; ++x) {
      const int64_t p = (z * H + y) * W + x;
      for (int64_t n = 0; n < K; ++n) {
        const int64_t zz = z + g.dz(n), yy = y + g.dy(n), xx = x + g.dx(n);
        neighbour_valid[n] = zz >= 0 && zz < D && yy >= 0 && yy < H && xx >= 0 && xx < W;
        neighbour_offset[n] = (zz * H + yy) * W + xx;
      }
      for (int64_t h = 0; h < g.heads; ++h) {
        const int64_t c0 = h * Ch;
        float max_logit = -INFINITY;
        for (int64_t n = 0; n < K; ++n) {
          float acc = 0.f;
          for (int64_t c = c0; c < c0 + Ch; ++c) {
            const float key = neighbour_valid[n] ? k[batch_off + c * P + neighbour_offset[n]] : 0.f;
            acc += q[batch_off + c * P + p] * (key + rel[n * C + c]);
          }
          logits[n] = acc;
          max_logit = std::max(max_logit, acc);
        }
        float sum = 0.f;
        for (int64_t n = 0; n < K; ++n) {
          logits[n] = std::exp(logits[n] - max_logit);
          sum += logits[n];
        }
        for (int64_t c = c0; c < c0 + Ch; ++c) {
          float acc = 0.f;
          for (int64_t n = 0; n < K; ++n) {
            if (neighbour_valid[n]) acc += logits[n] * v[batch_off + c * P + neighbour_offset[n]];
          }
          out[batch_off + c * P + p] = acc / sum;
        }
      }
    }
  }
}

}  // namespace

void local_attention_fp32(const float* q, const float* k, const float* v, const float* rel, float* out,
                          const AttentionGeometry& geo, Isa isa) {
  Fp32View view;
  view.g = geometry_view(geo);
  view.q = q;
  view.k = k;
  view.v = v;
  view.rel = rel;
  at::parallel_for(0, geo.image_rows(), 1, [&](int64_t begin, int64_t end) {
    switch (isa) {
      case Isa::kAvx512Vnni: avx512::fp32_rows(view, out, begin, end); break;
      case Isa::kAvx2: avx2::fp32_rows(view, out, begin, end); break;
      default: fp32_portable_rows(q, k, v, rel, out, geo, begin, end); break;
    }
  });
}

}  // namespace medattn
