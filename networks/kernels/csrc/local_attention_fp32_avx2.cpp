// Copyright MedAttnSlicer contributors. Apache-2.0.
//
// FP32 fused local self-attention, AVX2 + FMA code path: the row worker of local_attention_fp32_avx512.cpp on 8-lane
// ymm registers (the design is described in local_attention_fp32.cpp). 16 ymm registers hold a block of 9 neighbour
// logits plus q, a key and a rel broadcast; ragged tiles are stored with vmaskmovps; exp builds 2^n from exponent
// bits (no scalef).
//
// This TU is compiled for AVX2 + FMA through the target pragma below (the library itself is built for baseline
// x86-64) and is only entered when CPUID reports both; see isa_kernels.h for why everything but the entry point is in
// an anonymous namespace and why all standard headers come before the pragma.
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "isa_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MEDATTN_SIMD_AVX2 1
#include "simd_math.h"

namespace medattn {
namespace {

using simd::kLanes;
constexpr int kNeighbourBlock = 9;  // logits held in registers per pass over the channels

// In place: logits (K x 8) -> softmax weights over the K rows, per lane.
inline void softmax_columns(float* logits, int64_t K) {
  __m256 m = _mm256_load_ps(logits);
  for (int64_t n = 1; n < K; ++n) m = _mm256_max_ps(m, _mm256_load_ps(logits + n * kLanes));
  __m256 sum = _mm256_setzero_ps();
  for (int64_t n = 0; n < K; ++n) {
    const __m256 e = simd::exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(logits + n * kLanes), m));
    _mm256_store_ps(logits + n * kLanes, e);
    sum = _mm256_add_ps(sum, e);
  }
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.f), sum);
  for (int64_t n = 0; n < K; ++n)
    _mm256_store_ps(logits + n * kLanes, _mm256_mul_ps(_mm256_load_ps(logits + n * kLanes), inv));
}

inline int64_t padded_stride(int64_t n) {
  // a multiple of 16 floats (a cache line) that is an odd number of cache lines: consecutive channel rows of the
  // buffers then fall into different cache sets (a power-of-two stride would pile them into one set)
  int64_t s = (n + 15) / 16 * 16;
  if ((s / 16) % 2 == 0) s += 16;
  return s;
}

template <int NB>
inline void logits_block(const float* qp, int64_t q_stride, const float* const* kp, int64_t k_stride,
                         const float* relp, int64_t rel_stride, int64_t head_channels, float* logits) {
  __m256 acc[NB];
#pragma GCC unroll 16
  for (int j = 0; j < NB; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < head_channels; ++c) {
    const __m256 qv = _mm256_loadu_ps(qp + c * q_stride);
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) {
      acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp[j] + c * k_stride), acc[j]);
      acc[j] = _mm256_fmadd_ps(qv, _mm256_broadcast_ss(relp + j * rel_stride + c), acc[j]);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < NB; ++j) _mm256_store_ps(logits + j * kLanes, acc[j]);
}

template <int CB>
inline void output_block(const float* weights, int64_t K, const float* const* vp, int64_t v_stride,
                         int64_t channel_off, float* outp, int64_t out_stride, __m256i qmask) {
  __m256 acc[CB];
#pragma GCC unroll 16
  for (int j = 0; j < CB; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t n = 0; n < K; ++n) {
    const __m256 w = _mm256_load_ps(weights + n * kLanes);
    const float* base = vp[n] + channel_off;
#pragma GCC unroll 16
    for (int j = 0; j < CB; ++j) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(base + j * v_stride), acc[j]);
  }
#pragma GCC unroll 16
  for (int j = 0; j < CB; ++j) _mm256_maskstore_ps(outp + j * out_stride, qmask, acc[j]);
}

class Fp32RowWorker {
 public:
  Fp32RowWorker(const Fp32View& view, float* out) : q_(view.q), k_(view.k), v_(view.v), rel_(view.rel), out_(out),
                                                    g_(view.g) {
    const int64_t C = g_.channels, r = g_.radius;
    K_ = g_.neighbours;
    Ch_ = g_.head_channels;
    window_rows_ = g_.window_rows;
    Wq_ = padded_stride(g_.width);
    Wk_ = padded_stride(g_.width + 2 * r);
    q_buf_.allocate(C * Wq_ + kLanes);
    k_buf_.allocate((window_rows_ + 1) * C * Wk_ + kLanes);  // + one all-zero out-of-image row
    v_buf_.allocate((window_rows_ + 1) * C * Wk_ + kLanes);
    tag_.allocate(window_rows_);
    tag_.fill(-1);
    logits_.allocate(K_ * kLanes);
    row_k_.allocate(window_rows_);
    row_v_.allocate(window_rows_);
    kp_.allocate(K_);
    vp_.allocate(K_);
    neighbour_row_.allocate(K_);
    neighbour_col_.allocate(K_);
    for (int64_t n = 0; n < K_; ++n) {  // (no integer divisions in the per-tile loops)
      neighbour_row_[n] = n / g_.kernel_size;
      neighbour_col_[n] = n % g_.kernel_size;  // dx + r
    }
  }

  void run(int64_t row_begin, int64_t row_end) {
    const int64_t D = g_.depth, H = g_.height;
    for (int64_t row = row_begin; row < row_end; ++row) process_row(row / (D * H), (row / H) % D, row % H);
  }

 private:
  int64_t row_slot(int64_t b, int64_t z, int64_t y) {
    if (z < 0 || z >= g_.depth || y < 0 || y >= g_.height) return window_rows_;
    const int64_t slot = (z % g_.window_depth) * g_.kernel_size + (y % g_.kernel_size);
    const int64_t tag = (b * g_.depth + z) * g_.height + y;
    if (tag_[slot] != tag) {
      const int64_t C = g_.channels, P = g_.pixels, W = g_.width, r = g_.radius;
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
    const int64_t C = g_.channels, P = g_.pixels, W = g_.width, r = g_.radius;
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
      const __m256i qmask = simd::lane_mask(W - x0);
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
          float* lb = logits_.data() + n0 * kLanes;
          switch (min64(kNeighbourBlock, K_ - n0)) {
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
        softmax_columns(logits_.data(), K_);
        float* outp = out_ + b * C * P + h * Ch_ * P + own_row + x0;
        const float* const* vpp = vp_.data();
        const float* w = logits_.data();
        int64_t c = 0;
        for (; c + 8 <= Ch_; c += 8) output_block<8>(w, K_, vpp, Wk_, c * Wk_, outp + c * P, P, qmask);
        if (c + 4 <= Ch_) {
          output_block<4>(w, K_, vpp, Wk_, c * Wk_, outp + c * P, P, qmask);
          c += 4;
        }
        if (c + 2 <= Ch_) {
          output_block<2>(w, K_, vpp, Wk_, c * Wk_, outp + c * P, P, qmask);
          c += 2;
        }
        if (c < Ch_) output_block<1>(w, K_, vpp, Wk_, c * Wk_, outp + c * P, P, qmask);
      }
    }
  }

  const float* q_;
  const float* k_;
  const float* v_;
  const float* rel_;
  float* out_;
  const GeometryView g_;
  int64_t K_ = 0, Ch_ = 0, window_rows_ = 0, Wq_ = 0, Wk_ = 0;
  ScratchBuffer<float> q_buf_, k_buf_, v_buf_, logits_;
  ScratchBuffer<int64_t> tag_;
  ScratchBuffer<int64_t> neighbour_row_, neighbour_col_;  // window row and padded column offset of neighbour n
  ScratchBuffer<const float*> row_k_, row_v_, kp_, vp_;
};

}  // namespace

namespace avx2 {

void fp32_rows(const Fp32View& view, float* out, int64_t row_begin, int64_t row_end) {
  Fp32RowWorker worker(view, out);
  worker.run(row_begin, row_end);
}

}  // namespace avx2
}  // namespace medattn

#pragma GCC pop_options
