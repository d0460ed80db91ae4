// Copyright MedAttnSlicer contributors. Apache-2.0.
//
// INT8 fused local self-attention, AVX2 code path (the arithmetic is described in local_attention_int8.cpp).
//
// AVX2 has no non-saturating u8 x s8 -> int32 dot product (vpmaddubsw saturates its pair sums in int16), so the
// integer products run on vpmaddwd (int16 x int16 -> int32 sums of 2 products, exact) after widening:
//  * zero points are subtracted while repacking: q' = q - zq and k' = k - zk as int16 in [-255, 255], packed as
//    dwords of 2 channels ([pair][pixel]). q' . k' is then exact with no corrections, and off-image keys (and
//    values) are plain 0. |q' . k'| <= 255^2 * Ch fits int32 for the <= 8192 channels per head the op allows.
//  * q' . rel16 with rel16 as int16 pairs per neighbour (broadcast): each pair sum is <= 2 * 255 * 32639, so 128
//    pairs (256 channels) are exact in int32; wider heads sum chunks of 128 pairs in double. The raw-byte sum the
//    portable path rounds, q . rel16 = q' . rel16 + zq * sum(rel16), is formed exactly (modulo 2^32 in int32 for
//    heads of <= 256 channels, where the true value fits) and rounded once, and the logit is then evaluated with the
//    portable path's float operations in the same order (no fused multiply-adds: -ffp-contract=off), so the logits
//    equal the portable path's bit for bit.
//  * softmax in float; the 8-bit weights of taps 2t and 2t + 1 of a window row are packed as an int16 pair per pixel.
//  * weighted value sum: vpmaddwd of (weight pair) x (value pair). The values v' = v - zv of a cached row are kept
//    interleaved once per row, vi[c][x] = (v'[c][x], v'[c][x + 1]) over padded columns, so the pair for taps 2t, 2t+1
//    of the 8 pixels x0 .. x0 + 7 is one unaligned load at column x0 + 2t. A window of k taps costs ceil(k / 2)
//    multiply-adds per channel and 8 pixels.
//  * epilogue in float as the portable path (scale, shift, ReLU); blocks of 8 channels x 8 pixels are transposed in
//    registers and stored as 8 channels-last pixels.
//
// Work unit: an image row (b, z, y) in tiles of 8 pixels; each thread caches the repacked key / value rows of the
// window, so every input row is repacked once per thread. The repacking widens 16 channels of 8 pixels to int16 and
// transposes 8 x 8 dwords in registers (heads of odd width and ragged tails go through a scalar loop).
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
constexpr int kNeighbourBlock = 6;     // 2 accumulators per neighbour + q + 2 operands in 16 ymm registers
constexpr int64_t kPairChunk = 128;    // q' . rel16 pairs exact in int32

inline uint32_t pack_pair(int32_t lo, int32_t hi) {
  return (static_cast<uint32_t>(lo) & 0xFFFFu) | (static_cast<uint32_t>(hi) << 16);
}

class Int8RowWorker {
 public:
  Int8RowWorker(const Int8PlanView& plan, float* out) : p_(plan), g_(plan.g), out_(out) {
    const int64_t C = g_.channels, r = g_.radius, K = g_.neighbours;
    Ch_ = g_.head_channels;
    Ph_ = p_.head_pairs;
    G2_ = p_.pairs;
    pairs_are_channels_ = Ch_ % 2 == 0;  // then pair j of a pixel is channels 2j, 2j + 1 (no head padding)
    taps_ = g_.kernel_size;
    tap_pairs_ = (taps_ + 1) / 2;
    window_rows_ = g_.window_rows;
    slots_ = window_rows_;
    Wt_ = round_up(g_.width, kLanes);
    Wk_ = Wt_ + 2 * r;
    Wv_ = Wt_ + 2 * tap_pairs_;         // interleaved value columns read: x0 + lane + 2t
    Wpl_ = round_up(Wv_ + 1 + kLanes, kLanes);  // planar int16 columns (+ the pair partner, + vector-load slack)

    q2_.allocate(G2_ * Wt_);
    // slots_ cached rows + one constant all-zero (real 0) out-of-image row at index slots_
    k2_.allocate((slots_ + 1) * G2_ * Wk_);
    vi_.allocate((slots_ + 1) * C * Wv_);
    vplane_.allocate(C * Wpl_);  // columns outside [r, r + W) stay 0
    tag_.allocate(slots_);
    tag_.fill(-1);
    logits_.allocate(K * kLanes);
    wq_.allocate(K * kLanes);
    wpair_.allocate(window_rows_ * tap_pairs_ * kLanes);
    rel_int_.allocate(kNeighbourBlock * kLanes);
    rel_wide_.allocate(kNeighbourBlock * kLanes);
    row_k2_.allocate(window_rows_);
    row_vi_.allocate(window_rows_);
    kp_.allocate(K);
    vp_.allocate(window_rows_ * tap_pairs_);
    neighbour_row_.allocate(K);
    neighbour_col_.allocate(K);
    for (int64_t n = 0; n < K; ++n) {  // (no integer divisions in the per-tile loops)
      neighbour_row_[n] = n / g_.kernel_size;
      neighbour_col_[n] = n % g_.kernel_size;  // dx + r
    }
  }

  void run(int64_t row_begin, int64_t row_end) {
    const int64_t D = g_.depth, H = g_.height;
    for (int64_t row = row_begin; row < row_end; ++row) process_row(row / (D * H), (row / H) % D, row % H);
  }

 private:
  const uint8_t* pixel_row(const uint8_t* data, int64_t b, int64_t z, int64_t y) const {
    return data + (b * g_.pixels + (z * g_.height + y) * g_.width) * g_.channels;
  }

  // 8 pixels x 16 channels (from channel c0) of a channels-last row, minus the zero point, as r[j] = the 8 pixel
  // lanes of the dword pair (c0 + 2j, c0 + 2j + 1).
  static void load_pairs_8x8(const uint8_t* src, int64_t C, int64_t x0, int64_t c0, __m256i zero16, __m256i r[8]) {
    for (int i = 0; i < 8; ++i) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (x0 + i) * C + c0));
      r[i] = _mm256_sub_epi16(_mm256_cvtepu8_epi16(bytes), zero16);
    }
    simd::transpose8x8_epi32(r);
  }

  // One image row (W pixels x C channels, channels-last) -> dst[pair][dst_off + x] = (u - zero) pairs of the head-
  // padded channel pairs (pair hp of head h: channels h Ch + 2 hp, h Ch + 2 hp + 1, 0 beyond the head).
  void pack_pairs(const uint8_t* src, int32_t zero, int32_t* dst, int64_t dst_stride, int64_t dst_off) {
    const int64_t W = g_.width, C = g_.channels;
    int64_t x_fast = 0, pair_fast = 0;  // the vector tiles cover pixels [0, x_fast) x pairs [0, pair_fast)
    if (pairs_are_channels_ && C >= 16) {
      x_fast = W / 8 * 8;
      pair_fast = C / 16 * 8;
      const __m256i zero16 = _mm256_set1_epi16(static_cast<int16_t>(zero));
      for (int64_t x0 = 0; x0 < x_fast; x0 += 8) {
        for (int64_t j0 = 0; j0 < pair_fast; j0 += 8) {
          __m256i r[8];
          load_pairs_8x8(src, C, x0, 2 * j0, zero16, r);
          for (int j = 0; j < 8; ++j)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (j0 + j) * dst_stride + dst_off + x0), r[j]);
        }
      }
    }
    // the rest (pixels >= x_fast, or pairs >= pair_fast: ragged tails, heads of odd width) one pair at a time
    for (int64_t x = 0; x < W; ++x) {
      const uint8_t* px = src + x * C;
      const int64_t first = x < x_fast ? pair_fast : 0;
      for (int64_t pair = first; pair < G2_; ++pair) {
        const int64_t h = pair / Ph_, hp = pair - h * Ph_;
        const int64_t c = h * Ch_ + 2 * hp;
        const int32_t lo = px[c] - zero;
        const int32_t hi = 2 * hp + 1 < Ch_ ? px[c + 1] - zero : 0;
        dst[pair * dst_stride + dst_off + x] = static_cast<int32_t>(pack_pair(lo, hi));
      }
    }
  }

  // Values of one image row -> vi[c][x] = (v'[c][x], v'[c][x + 1]) over padded columns (column r + x is pixel x;
  // v' = v - zv, 0 off the image), through the planar int16 copy vplane[c][column].
  void pack_values(const uint8_t* src, int32_t* vi) {
    const int64_t W = g_.width, C = g_.channels, r = g_.radius;
    int16_t* plane = vplane_.data();
    const int32_t zero = p_.v_zero;
    int64_t x_fast = 0, c_fast = 0;
    if (C >= 16) {
      x_fast = W / 8 * 8;
      c_fast = C / 16 * 16;
      const __m256i zero16 = _mm256_set1_epi16(static_cast<int16_t>(zero));
      for (int64_t x0 = 0; x0 < x_fast; x0 += 8) {
        for (int64_t c0 = 0; c0 < c_fast; c0 += 16) {
          __m256i d[8];
          load_pairs_8x8(src, C, x0, c0, zero16, d);
          for (int j = 0; j < 8; ++j) {
            // dwords (even, odd channel) of 8 pixels -> 8 int16 of the even channel, then 8 of the odd one
            const __m256i even = _mm256_srai_epi32(_mm256_slli_epi32(d[j], 16), 16);
            const __m256i odd = _mm256_srai_epi32(d[j], 16);
            const __m256i both = _mm256_permute4x64_epi64(_mm256_packs_epi32(even, odd), 0xD8);
            int16_t* base = plane + (c0 + 2 * j) * Wpl_ + r + x0;
            _mm_storeu_si128(reinterpret_cast<__m128i*>(base), _mm256_castsi256_si128(both));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(base + Wpl_), _mm256_extracti128_si256(both, 1));
          }
        }
      }
    }
    for (int64_t x = 0; x < W; ++x)
      for (int64_t c = x < x_fast ? c_fast : 0; c < C; ++c)
        plane[c * Wpl_ + r + x] = static_cast<int16_t>(src[x * C + c] - zero);
    for (int64_t c = 0; c < C; ++c) {
      const int16_t* pc = plane + c * Wpl_;
      int32_t* vc = vi + c * Wv_;
      for (int64_t x = 0; x < Wv_; x += 8) {  // Wv_ is a multiple of 2; the last store may spill into slack
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pc + x));
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pc + x + 1));
        if (x + 8 <= Wv_) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(vc + x), _mm_unpacklo_epi16(a, b));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(vc + x + 4), _mm_unpackhi_epi16(a, b));
        } else {
          alignas(32) int32_t tmp[8];
          _mm_store_si128(reinterpret_cast<__m128i*>(tmp), _mm_unpacklo_epi16(a, b));
          _mm_store_si128(reinterpret_cast<__m128i*>(tmp + 4), _mm_unpackhi_epi16(a, b));
          for (int64_t i = 0; x + i < Wv_; ++i) vc[x + i] = tmp[i];
        }
      }
    }
  }

  // Slot of image row (b, z, y), repacking its keys and values on a miss; the constant zero slot outside the image.
  int64_t row_slot(int64_t b, int64_t z, int64_t y) {
    if (z < 0 || z >= g_.depth || y < 0 || y >= g_.height) return slots_;
    const int64_t slot = (z % g_.window_depth) * g_.kernel_size + (y % g_.kernel_size);
    const int64_t tag = (b * g_.depth + z) * g_.height + y;
    if (tag_[slot] != tag) {
      pack_pairs(pixel_row(p_.k, b, z, y), p_.k_zero, k2_.data() + slot * G2_ * Wk_, Wk_, g_.radius);
      pack_values(pixel_row(p_.v, b, z, y), vi_.data() + slot * g_.channels * Wv_);
      tag_[slot] = tag;
    }
    return slot;
  }

  template <int NB>
  void logits_block(const int32_t* qp, int64_t n0, int64_t h) {
    __m256i dot[NB], rel[NB];
    const int32_t* kp[NB];
    const int32_t* rp[NB];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) {
      dot[j] = _mm256_setzero_si256();
      rel[j] = _mm256_setzero_si256();
      kp[j] = kp_[n0 + j];
      rp[j] = p_.rel_pairs + (n0 + j) * G2_ + h * Ph_;
    }
    const bool chunked = Ph_ > kPairChunk;
    for (int64_t g0 = 0; g0 < Ph_; g0 += kPairChunk) {
      const int64_t g1 = min64(Ph_, g0 + kPairChunk);
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) rel[j] = _mm256_setzero_si256();
      for (int64_t gg = g0; gg < g1; ++gg) {
        const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + gg * Wt_));
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j) {
          const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp[j] + gg * Wk_));
          dot[j] = _mm256_add_epi32(dot[j], _mm256_madd_epi16(qv, kv));
          rel[j] = _mm256_add_epi32(rel[j], _mm256_madd_epi16(qv, _mm256_set1_epi32(rp[j][gg])));
        }
      }
      if (chunked) {  // wide heads: exact running sums in double
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j)
          _mm256_store_si256(reinterpret_cast<__m256i*>(rel_int_.data() + j * kLanes), rel[j]);
        for (int64_t i = 0; i < NB * kLanes; ++i)
          rel_wide_[i] = (g0 == 0 ? 0.0 : rel_wide_[i]) + static_cast<double>(rel_int_[i]);
      }
    }
    const int32_t zq = p_.q_zero;
    const __m256 sqk = _mm256_set1_ps(p_.q_scale * p_.k_scale);
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) {
      const int64_t n = n0 + j;
      const int64_t zq_sum = static_cast<int64_t>(zq) * p_.rel_sum16[n * g_.heads + h];
      __m256 raw;  // float(sum_c q rel16) on the raw bytes, one rounding of the exact integer
      if (!chunked) {
        // exact modulo 2^32 and the true value fits int32 for <= 256 channels: the wrap-around is harmless
        const __m256i zq_term = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(zq_sum)));
        raw = _mm256_cvtepi32_ps(_mm256_add_epi32(rel[j], zq_term));
      } else {
        alignas(32) float lanes[kLanes];
        for (int l = 0; l < kLanes; ++l)
          lanes[l] = static_cast<float>(static_cast<int64_t>(rel_wide_[j * kLanes + l]) + zq_sum);
        raw = _mm256_load_ps(lanes);
      }
      // the portable path's expression, operation for operation
      const __m256 rel_part =
          _mm256_sub_ps(raw, _mm256_set1_ps(static_cast<float>(zq) * p_.rel_sum[n * g_.heads + h]));
      const __m256 logit = _mm256_add_ps(_mm256_mul_ps(sqk, _mm256_cvtepi32_ps(dot[j])),
                                         _mm256_mul_ps(_mm256_set1_ps(p_.q_scale * p_.rel_scale[n]), rel_part));
      _mm256_store_ps(logits_.data() + n * kLanes, logit);
    }
  }

  void logits_all(const int32_t* qp, int64_t h) {
    const int64_t K = g_.neighbours;
    // balanced blocks: 9 neighbours as 5 + 4 rather than 6 + 3
    const int64_t blocks = (K + kNeighbourBlock - 1) / kNeighbourBlock;
    const int64_t size = (K + blocks - 1) / blocks;
    for (int64_t n0 = 0; n0 < K; n0 += size) {
      switch (min64(size, K - n0)) {
        case 1: logits_block<1>(qp, n0, h); break;
        case 2: logits_block<2>(qp, n0, h); break;
        case 3: logits_block<3>(qp, n0, h); break;
        case 4: logits_block<4>(qp, n0, h); break;
        case 5: logits_block<5>(qp, n0, h); break;
        case 6: logits_block<6>(qp, n0, h); break;
        default: break;
      }
    }
  }

  // logits -> 8-bit weights packed as int16 pairs per (window row, tap pair); returns v_scale / (sum of the
  // weights) per lane.
  __m256 softmax_weights() {
    const int64_t K = g_.neighbours;
    __m256 m = _mm256_load_ps(logits_.data());
    for (int64_t n = 1; n < K; ++n) m = _mm256_max_ps(m, _mm256_load_ps(logits_.data() + n * kLanes));
    __m256i sum = _mm256_setzero_si256();
    const __m256 k255 = _mm256_set1_ps(255.f);
    for (int64_t n = 0; n < K; ++n) {
      const __m256 e = simd::exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(logits_.data() + n * kLanes), m));
      const __m256i w = _mm256_cvtps_epi32(_mm256_mul_ps(e, k255));  // round to nearest even
      _mm256_store_si256(reinterpret_cast<__m256i*>(wq_.data() + n * kLanes), w);
      sum = _mm256_add_epi32(sum, w);
    }
    for (int64_t rw = 0; rw < window_rows_; ++rw) {
      for (int64_t t = 0; t < tap_pairs_; ++t) {
        const int64_t tap = 2 * t;
        __m256i packed = _mm256_load_si256(reinterpret_cast<const __m256i*>(wq_.data() + (rw * taps_ + tap) * kLanes));
        if (tap + 1 < taps_) {
          const __m256i w1 =
              _mm256_load_si256(reinterpret_cast<const __m256i*>(wq_.data() + (rw * taps_ + tap + 1) * kLanes));
          packed = _mm256_or_si256(packed, _mm256_slli_epi32(w1, 16));
        }
        _mm256_store_si256(reinterpret_cast<__m256i*>(wpair_.data() + (rw * tap_pairs_ + t) * kLanes), packed);
      }
    }
    return _mm256_div_ps(_mm256_set1_ps(p_.v_scale), _mm256_cvtepi32_ps(sum));
  }

  // Channels c .. c + CB - 1 of the 8-pixel tile at x0: integer weighted value sums, the float epilogue, and a
  // channels-last store to outp (pixel x0, channel c). CB = 8 transposes in registers, narrower blocks go through
  // a small buffer.
  template <int CB>
  void output_block(int64_t c, int64_t x0, __m256 norm, float* outp, int64_t npx) {
    __m256i acc[CB];
#pragma GCC unroll 16
    for (int j = 0; j < CB; ++j) acc[j] = _mm256_setzero_si256();
    const int64_t offset = c * Wv_;
    for (int64_t i = 0; i < window_rows_ * tap_pairs_; ++i) {  // (window row, tap pair)
      const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(wpair_.data() + i * kLanes));
      const int32_t* base = vp_[i] + offset;
#pragma GCC unroll 16
      for (int j = 0; j < CB; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + j * Wv_));
        acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(w, v));
      }
    }
    const __m256 zero = _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int j = 0; j < CB; ++j) {
      // the portable path's expression: out_scale * (acc * norm) + out_shift
      __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[j]), norm);
      y = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(p_.out_scale[c + j]), y), _mm256_set1_ps(p_.out_shift[c + j]));
      if (p_.relu) y = _mm256_max_ps(y, zero);
      acc[j] = _mm256_castps_si256(y);
    }
    const int64_t C = g_.channels;
    if constexpr (CB == 8) {
      simd::transpose8x8_epi32(acc);  // acc[i] = channels c .. c + 7 of pixel x0 + i
      for (int64_t i = 0; i < npx; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(outp + i * C), acc[i]);
    } else {
      alignas(32) float tile[CB][kLanes];
      for (int j = 0; j < CB; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(tile[j]), acc[j]);
      for (int64_t i = 0; i < npx; ++i)
        for (int j = 0; j < CB; ++j) outp[i * C + j] = tile[j][i];
    }
  }

  void process_row(int64_t b, int64_t z, int64_t y) {
    const int64_t W = g_.width, K = g_.neighbours, r = g_.radius, P = g_.pixels;
    pack_pairs(pixel_row(p_.q, b, z, y), p_.q_zero, q2_.data(), Wt_, 0);
    for (int64_t rw = 0; rw < window_rows_; ++rw) {
      const int64_t zz = z + (g_.volumetric ? rw / g_.kernel_size - r : 0);
      const int64_t yy = y + rw % g_.kernel_size - r;
      const int64_t slot = row_slot(b, zz, yy);
      row_k2_[rw] = k2_.data() + slot * G2_ * Wk_;
      row_vi_[rw] = vi_.data() + slot * g_.channels * Wv_;
    }
    for (int64_t x0 = 0; x0 < W; x0 += kLanes) {
      const int64_t npx = min64(kLanes, W - x0);
      for (int64_t rw = 0; rw < window_rows_; ++rw)
        for (int64_t t = 0; t < tap_pairs_; ++t) vp_[rw * tap_pairs_ + t] = row_vi_[rw] + x0 + 2 * t;
      for (int64_t h = 0; h < g_.heads; ++h) {
        for (int64_t n = 0; n < K; ++n) kp_[n] = row_k2_[neighbour_row_[n]] + h * Ph_ * Wk_ + x0 + neighbour_col_[n];
        logits_all(q2_.data() + h * Ph_ * Wt_ + x0, h);
        const __m256 norm = softmax_weights();
        float* outp = out_ + (b * P + (z * g_.height + y) * W + x0) * g_.channels + h * Ch_;
        int64_t c = 0;
        for (; c + 8 <= Ch_; c += 8) output_block<8>(h * Ch_ + c, x0, norm, outp + c, npx);
        if (c + 4 <= Ch_) {
          output_block<4>(h * Ch_ + c, x0, norm, outp + c, npx);
          c += 4;
        }
        if (c + 2 <= Ch_) {
          output_block<2>(h * Ch_ + c, x0, norm, outp + c, npx);
          c += 2;
        }
        if (c < Ch_) output_block<1>(h * Ch_ + c, x0, norm, outp + c, npx);
      }
    }
  }

  const Int8PlanView p_;
  const GeometryView g_;
  float* out_;
  int64_t Ch_ = 0, Ph_ = 0, G2_ = 0, taps_ = 0, tap_pairs_ = 0, window_rows_ = 0, slots_ = 0;
  int64_t Wt_ = 0, Wk_ = 0, Wv_ = 0, Wpl_ = 0;
  bool pairs_are_channels_ = false;
  ScratchBuffer<int32_t> q2_;      // [pair][pixel] (q - zq) pairs of the current row
  ScratchBuffer<int32_t> k2_;      // [slot][pair][padded pixel] (k - zk) pairs
  ScratchBuffer<int32_t> vi_;      // [slot][channel][padded column] interleaved (v - zv) pairs of adjacent columns
  ScratchBuffer<int16_t> vplane_;  // [channel][padded column] v - zv of the row being repacked
  ScratchBuffer<int64_t> tag_;
  ScratchBuffer<float> logits_;
  ScratchBuffer<int32_t> wq_;
  ScratchBuffer<int32_t> wpair_;
  ScratchBuffer<int32_t> rel_int_;
  ScratchBuffer<double> rel_wide_;
  ScratchBuffer<const int32_t*> row_k2_;
  ScratchBuffer<const int32_t*> row_vi_;
  ScratchBuffer<const int32_t*> kp_;
  ScratchBuffer<const int32_t*> vp_;  // per (window row, tap pair): the value pairs of the current tile's pixels
  ScratchBuffer<int64_t> neighbour_row_, neighbour_col_;  // window row and padded column offset of neighbour n
};

}  // namespace

namespace avx2 {

void int8_rows(const Int8PlanView& plan, float* out, int64_t row_begin, int64_t row_end) {
  Int8RowWorker worker(plan, out);
  worker.run(row_begin, row_end);
}

}  // namespace avx2
}  // namespace medattn

#pragma GCC pop_options
