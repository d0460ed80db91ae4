// Copyright MedAttnSlicer contributors. Apache-2.0.
//
// FP32 fused local self-attention on contiguous (B, C, D, H, W) tensors.
//
// Work unit: one image row (b, z, y). Each thread owns a contiguous range of rows and copies the rows it needs into
// small buffers: the query row and, for keys and values, the window rows (b, z + dz, y + dy) held in a row cache
// indexed by (z mod kd, y mod k), so every input row is read from memory once per thread. Buffered rows are padded
// with r zeros on both sides (zero outside the image, no masks in the inner loops) and their channel stride is an
// odd number of cache lines (in the NCHW tensor itself the channel stride H*W*4 is often a multiple of 4 KiB and
// all channels of a pixel would compete for one cache set).
// A row is processed in tiles of 16 pixels along x. For a tile and a head, the logits of a block of up to 9
// neighbours stay in registers while the head's channels stream by (q loaded once per channel; per neighbour one
// shifted key load and two FMAs, q * k and q * rel), the softmax over all K neighbours runs on a K x 16 buffer in
// L1, and the output accumulates 8 channels at a time from the shifted value rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "local_attention.h"
#include "simd_math.h"

namespace medattn {
namespace {

// Straightforward per-pixel implementation: the reference for machines without AVX-512 and a cross-check in tests.
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

#if defined(__AVX512F__)
using simd::kLanes;
constexpr int kNeighbourBlock = 9;  // logits held in registers per pass over the channels

// In place: logits (K x 16) -> softmax weights over the K rows, per lane.
inline void softmax_columns(float* logits, int64_t K) {
  __m512 m = _mm512_load_ps(logits);
  for (int64_t n = 1; n < K; ++n) m = _mm512_max_ps(m, _mm512_load_ps(logits + n * kLanes));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t n = 0; n < K; ++n) {
    const __m512 e = simd::exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(logits + n * kLanes), m));
    _mm512_store_ps(logits + n * kLanes, e);
    sum = _mm512_add_ps(sum, e);
  }
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), sum);
  for (int64_t n = 0; n < K; ++n)
    _mm512_store_ps(logits + n * kLanes, _mm512_mul_ps(_mm512_load_ps(logits + n * kLanes), inv));
}

inline int64_t padded_stride(int64_t n) {
  // a multiple of 16 floats that is an odd number of cache lines: consecutive channel rows of the buffers
  // then fall into different cache sets (a power-of-two stride would pile them into one set)
  int64_t s = (n + kLanes - 1) / kLanes * kLanes;
  if ((s / kLanes) % 2 == 0) s += kLanes;
  return s;
}

template <int NB>
inline void logits_block(const float* qp, int64_t q_stride, const float* const* kp, int64_t k_stride,
                         const float* relp, int64_t rel_stride, int64_t head_channels, float* logits) {
  __m512 acc[NB];
#pragma GCC unroll 16
  for (int j = 0; j < NB; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < head_channels; ++c) {
    const __m512 qv = _mm512_loadu_ps(qp + c * q_stride);
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) {
      acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kp[j] + c * k_stride), acc[j]);
      acc[j] = _mm512_fmadd_ps(qv, _mm512_set1_ps(relp[j * rel_stride + c]), acc[j]);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < NB; ++j) _mm512_store_ps(logits + j * kLanes, acc[j]);
}

template <int CB>
inline void output_block(const float* weights, int64_t K, const float* const* vp, int64_t v_stride,
                         int64_t channel_off, float* outp, int64_t out_stride, __mmask16 qmask) {
  __m512 acc[CB];
#pragma GCC unroll 16
  for (int j = 0; j < CB; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t n = 0; n < K; ++n) {
    const __m512 w = _mm512_load_ps(weights + n * kLanes);
    const float* base = vp[n] + channel_off;
#pragma GCC unroll 16
    for (int j = 0; j < CB; ++j) acc[j] = _mm512_fmadd_ps(w, _mm512_loadu_ps(base + j * v_stride), acc[j]);
  }
#pragma GCC unroll 16
  for (int j = 0; j < CB; ++j) _mm512_mask_storeu_ps(outp + j * out_stride, qmask, acc[j]);
}

class Fp32RowWorker {
 public:
  Fp32RowWorker(const float* q, const float* k, const float* v, const float* rel, float* out,
                const AttentionGeometry& g)
      : q_(q), k_(k), v_(v), rel_(rel), out_(out), g_(g) {
    const int64_t C = g.channels, r = g.radius();
    K_ = g.neighbours();
    Ch_ = g.head_channels();
    window_rows_ = g.window_rows();
    Wq_ = padded_stride(g.width);
    Wk_ = padded_stride(g.width + 2 * r);
    q_buf_.assign(C * Wq_ + kLanes, 0.f);
    k_buf_.assign((window_rows_ + 1) * C * Wk_ + kLanes, 0.f);  // + one all-zero out-of-image row
    v_buf_.assign((window_rows_ + 1) * C * Wk_ + kLanes, 0.f);
    tag_.assign(window_rows_, -1);
    logit_storage_.assign(K_ * kLanes + kLanes, 0.f);
    logits_ = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(logit_storage_.data()) + 63) & ~uintptr_t(63));
    row_k_.resize(window_rows_);
    row_v_.resize(window_rows_);
    kp_.resize(K_);
    vp_.resize(K_);
    for (int64_t n = 0; n < K_; ++n) {  // (no integer divisions in the per-tile loops)
      neighbour_row_.push_back(n / g.kernel_size);
      neighbour_col_.push_back(g.dx(n) + r);
    }
  }

  void run(int64_t row_begin, int64_t row_end) {
    const int64_t D = g_.depth, H = g_.height;
    for (int64_t row = row_begin; row < row_end; ++row) {
      process_row(row / (D * H), (row / H) % D, row % H);
    }
  }

 private:
  int64_t row_slot(int64_t b, int64_t z, int64_t y) {
    if (z < 0 || z >= g_.depth || y < 0 || y >= g_.height) return window_rows_;
    const int64_t slot = (z % g_.window_depth()) * g_.kernel_size + (y % g_.kernel_size);
    const int64_t tag = (b * g_.depth + z) * g_.height + y;
    if (tag_[slot] != tag) {
      const int64_t C = g_.channels, P = g_.pixels(), W = g_.width, r = g_.radius();
      const int64_t src = b * C * P + (z * g_.height + y) * W;
      float* kd = k_buf_.data() + slot * C * Wk_ + r;
      float* vd = v_buf_.data() + slot * C * Wk_ + r;
      for (int64_t c = 0; c < C; ++c) {
        std::memcpy(kd + c * Wk_, k_ + src + c * P, W * sizeof(float));
        std::memcpy(vd + c * Wk_, v_ + src + c * P, W * sizeof(float));
      }
      tag_[slot] = tag;
    }
    return slot;
  }

  void process_row(int64_t b, int64_t z, int64_t y) {
    const int64_t C = g_.channels, P = g_.pixels(), W = g_.width, r = g_.radius();
    const int64_t own_row = (z * g_.height + y) * W;
    for (int64_t c = 0; c < C; ++c)
      std::memcpy(q_buf_.data() + c * Wq_, q_ + b * C * P + c * P + own_row, W * sizeof(float));
    for (int64_t rw = 0; rw < window_rows_; ++rw) {
      const int64_t zz = z + (g_.volumetric ? rw / g_.kernel_size - r : 0);
      const int64_t yy = y + rw % g_.kernel_size - r;
      const int64_t slot = row_slot(b, zz, yy);
      row_k_[rw] = k_buf_.data() + slot * C * Wk_;
      row_v_[rw] = v_buf_.data() + slot * C * Wk_;
    }
    for (int64_t x0 = 0; x0 < W; x0 += kLanes) {
      const __mmask16 qmask = simd::tile_mask(x0, 0, W);
      for (int64_t h = 0; h < g_.heads; ++h) {
        for (int64_t n = 0; n < K_; ++n) {
          const int64_t col = h * Ch_ * Wk_ + x0 + neighbour_col_[n];
          kp_[n] = row_k_[neighbour_row_[n]] + col;
          vp_[n] = row_v_[neighbour_row_[n]] + col;
        }
        const float* qp = q_buf_.data() + h * Ch_ * Wq_ + x0;
        const float* relp = rel_ + h * Ch_;
        for (int64_t n0 = 0; n0 < K_; n0 += kNeighbourBlock) {
          const float* const* kpb = kp_.data() + n0;
          const float* relb = relp + n0 * C;
          float* lb = logits_ + n0 * kLanes;
          switch (std::min<int64_t>(kNeighbourBlock, K_ - n0)) {
            case 1: logits_block<1>(qp, Wq_, kpb, Wk_, relb, C, Ch_, lb); break;
            case 2: logits_block<2>(qp, Wq_, kpb, Wk_, relb, C, Ch_, lb); break;
            case 3: logits_block<3>(qp, Wq_, kpb, Wk_, relb, C, Ch_, lb); break;
            case 4: logits_block<4>(qp, Wq_, kpb, Wk_, relb, C, Ch_, lb); break;
            case 5: logits_block<5>(qp, Wq_, kpb, Wk_, relb, C, Ch_, lb); break;
            case 6: logits_block<6>(qp, Wq_, kpb, Wk_, relb, C, Ch_, lb); break;
            case 7: logits_block<7>(qp, Wq_, kpb, Wk_, relb, C, Ch_, lb); break;
            case 8: logits_block<8>(qp, Wq_, kpb, Wk_, relb, C, Ch_, lb); break;
            case 9: logits_block<9>(qp, Wq_, kpb, Wk_, relb, C, Ch_, lb); break;
            default: break;
          }
        }
        softmax_columns(logits_, K_);
        float* outp = out_ + b * C * P + h * Ch_ * P + own_row + x0;
        const float* const* vpp = vp_.data();
        int64_t c = 0;
        for (; c + 8 <= Ch_; c += 8)
          output_block<8>(logits_, K_, vpp, Wk_, c * Wk_, outp + c * P, P, qmask);
        if (c + 4 <= Ch_) {
          output_block<4>(logits_, K_, vpp, Wk_, c * Wk_, outp + c * P, P, qmask);
          c += 4;
        }
        if (c + 2 <= Ch_) {
          output_block<2>(logits_, K_, vpp, Wk_, c * Wk_, outp + c * P, P, qmask);
          c += 2;
        }
        if (c < Ch_) output_block<1>(logits_, K_, vpp, Wk_, c * Wk_, outp + c * P, P, qmask);
      }
    }
  }

  const float* q_;
  const float* k_;
  const float* v_;
  const float* rel_;
  float* out_;
  const AttentionGeometry& g_;
  int64_t K_ = 0, Ch_ = 0, window_rows_ = 0, Wq_ = 0, Wk_ = 0;
  std::vector<float> q_buf_, k_buf_, v_buf_, logit_storage_;
  float* logits_ = nullptr;
  std::vector<int64_t> tag_;
  std::vector<int64_t> neighbour_row_, neighbour_col_;  // window row and padded column offset of neighbour n
  std::vector<const float*> row_k_, row_v_, kp_, vp_;
};
#endif

}  // namespace

const char* fp32_implementation() {
#if defined(__AVX512F__)
  return "avx512";
#else
  return "portable";
#endif
}

void local_attention_fp32(const float* q, const float* k, const float* v, const float* rel, float* out,
                          const AttentionGeometry& geo, bool allow_simd) {
  (void)allow_simd;  // unused when this build has no AVX-512 path
  at::parallel_for(0, geo.image_rows(), 1, [&](int64_t begin, int64_t end) {
#if defined(__AVX512F__)
    if (allow_simd) {
      Fp32RowWorker worker(q, k, v, rel, out, geo);
      worker.run(begin, end);
      return;
    }
#endif
    fp32_portable_rows(q, k, v, rel, out, geo, begin, end);
  });
}

}  // namespace medattn
