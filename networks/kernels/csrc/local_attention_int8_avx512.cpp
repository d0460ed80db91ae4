// Copyright MedAttnSlicer contributors. Apache-2.0.
//
// INT8 fused local self-attention, AVX-512 VNNI/VBMI code path (the arithmetic is described in
// local_attention_int8.cpp):
//  * q . k: sum_c (q - zq)(k - zk) = dot + (128 - zk) SQ - zq SK + Ch zq zk, where dot = sum_c q * (k - 128) runs on
//    VNNI (vpdpbusd: u8 x s8 -> int32, four channels per lane), SQ / SK are the per-pixel channel sums of the raw
//    bytes. Out-of-image keys are the byte zk (real 0), so they add exactly 0.
//  * q . rel: rel16 = 256 hi + lo split into two signed bytes; sum_c q rel16 is two more VNNI dot products, exact in
//    int32, combined with one rounding (fma) as the portable path's float(sum).
//  * weighted value sum: vpdpbusd of the u8 weights of four horizontally adjacent taps with the values v - 128 of
//    those taps (s8). The values of a row are kept planar ([channel][pixel] bytes, padded with zv, the real 0) and
//    one byte permutation (vpermb) turns 64 loaded bytes into 16 dwords holding pixels x .. x + 3.
//  * epilogue: blocks of 16 channels x 16 pixels are transposed in registers and stored as 16 channels-last pixels
//    (narrower blocks scatter).
//
// Work unit: an image row (b, z, y) in tiles of 16 pixels. Each thread owns a contiguous range of rows and caches
// the repacked key / value rows of the window (keys: [channel group][pixel] dwords of 4 channels, padded by r
// pixels with zk; values: planar bytes), so every input row is repacked once per thread; the repacking transposes
// 16 pixels x 16 channel groups of dwords in registers (rows of fewer than 64 channels gather instead).
//
// This TU is compiled for AVX-512 F/BW/DQ/VL/VNNI/VBMI through the target pragma below (the library itself is built
// for baseline x86-64) and is only entered when CPUID reports all of them; see isa_kernels.h for why everything but
// the entry point is in an anonymous namespace and why all standard headers come before the pragma.
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "isa_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512vbmi")
#define MEDATTN_SIMD_AVX512 1
#include "simd_math.h"

namespace medattn {
namespace {

using simd::kLanes;
constexpr int kNeighbourBlock = 9;

// In-register transpose of a 16 x 16 matrix of dwords: r[i] lane j -> r[j] lane i.
inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  __m512i u[16];
  for (int a = 0; a < 4; ++a) {
    u[4 * a + 0] = _mm512_unpacklo_epi64(t[4 * a], t[4 * a + 2]);
    u[4 * a + 1] = _mm512_unpackhi_epi64(t[4 * a], t[4 * a + 2]);
    u[4 * a + 2] = _mm512_unpacklo_epi64(t[4 * a + 1], t[4 * a + 3]);
    u[4 * a + 3] = _mm512_unpackhi_epi64(t[4 * a + 1], t[4 * a + 3]);
  }
  // u[4a + e], 128-bit lane L, holds column 4L + e of rows 4a .. 4a + 3
  for (int e = 0; e < 4; ++e) {
    const __m512i s0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44);
    const __m512i s1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xEE);
    const __m512i s2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44);
    const __m512i s3 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
    r[8 + e] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
  }
}

// Dword groups g0 .. g0 + ng - 1 (4 channels each) of pixels x0 .. x0 + npx - 1 of a channels-last row with G
// groups per pixel, as out[j] = 16 pixel lanes of group g0 + j (zero beyond npx). Rows of at least 16 groups use
// 16 x 16 register transposes; narrower rows (fewer than 64 channels) gather, which costs far fewer shuffles.
inline void load_groups_pixel_lanes(const uint32_t* src32, int64_t G, int64_t x0, int64_t npx, int64_t g0,
                                    int64_t ng, __m512i out[16]) {
  const __mmask16 pmask = static_cast<__mmask16>((npx >= 16) ? 0xFFFF : ((1u << npx) - 1u));
  if (G < 16) {
    const __m512i index = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(static_cast<int32_t>(G)));
    for (int64_t j = 0; j < ng; ++j)
      out[j] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), pmask, index, src32 + x0 * G + g0 + j, 4);
    return;
  }
  const __mmask16 gmask = static_cast<__mmask16>((ng >= 16) ? 0xFFFF : ((1u << ng) - 1u));
  for (int i = 0; i < 16; ++i)
    out[i] = i < npx ? _mm512_maskz_loadu_epi32(gmask, src32 + (x0 + i) * G + g0) : _mm512_setzero_si512();
  transpose16x16_epi32(out);
}

// byte permutation [pixel][4 channels] -> [channel][16 pixels] within a zmm
inline __m512i pixel_major_to_channel_major_index() {
  alignas(64) uint8_t idx[64];
  for (int m = 0; m < 4; ++m)
    for (int p = 0; p < 16; ++p) idx[m * 16 + p] = static_cast<uint8_t>(p * 4 + m);
  return _mm512_load_si512(idx);
}

// byte permutation making dword l hold bytes l, l+1, l+2, l+3 of the source
inline __m512i tap_expand_index() {
  alignas(64) uint8_t idx[64];
  for (int l = 0; l < 16; ++l)
    for (int j = 0; j < 4; ++j) idx[4 * l + j] = static_cast<uint8_t>(l + j);
  return _mm512_load_si512(idx);
}

class Int8RowWorker {
 public:
  Int8RowWorker(const Int8PlanView& plan, float* out) : p_(plan), g_(plan.g), out_(out) {
    const int64_t C = g_.channels, r = g_.radius;
    Ch_ = g_.head_channels;
    Gh_ = p_.head_groups;
    G_ = p_.groups;
    fast_pack_ = Ch_ % 4 == 0;
    taps_ = g_.kernel_size;
    tap_groups_ = (taps_ + 3) / 4;
    window_rows_ = g_.window_rows;
    Wt_ = round_up(g_.width, kLanes);
    Wk_ = Wt_ + 2 * r;
    // a planar value row is read as 64-byte windows starting at x0 + 4 t (x0 < Wt, t < tap_groups)
    Wpl_ = Wt_ + 4 * (tap_groups_ - 1) + 64;
    slots_ = window_rows_;

    q4_.allocate(G_ * Wt_);
    sq_.allocate(g_.heads * Wt_);
    // slots_ cached rows + one constant out-of-image row at index slots_
    k4_.allocate((slots_ + 1) * G_ * Wk_);
    sk_.allocate((slots_ + 1) * g_.heads * Wk_);
    tag_.allocate(slots_);
    tag_.fill(-1);
    vpl_.allocate((slots_ + 1) * C * Wpl_);
    vpl_.fill(static_cast<uint8_t>(p_.v_zero ^ 0x80));
    // key padding: real channels hold zk (minus 128), padding channels 0 (they meet q = 0)
    for (int64_t gg = 0; gg < Gh_; ++gg) {
      uint32_t word = 0;
      for (int j = 0; j < 4; ++j)
        if (4 * gg + j < Ch_) word |= static_cast<uint32_t>((p_.k_zero ^ 0x80) & 0xFF) << (8 * j);
      for (int64_t s = 0; s <= slots_; ++s)
        for (int64_t h = 0; h < g_.heads; ++h) {
          uint32_t* dst = k4_.data() + (s * G_ + h * Gh_ + gg) * Wk_;
          for (int64_t x = 0; x < Wk_; ++x) dst[x] = word;
        }
    }
    sk_.fill(static_cast<int32_t>(Ch_ * p_.k_zero));
    logits_.allocate(g_.neighbours * kLanes);
    wq_.allocate(g_.neighbours * kLanes);
    wpack_.allocate(window_rows_ * tap_groups_ * kLanes);
    row_k4_.allocate(window_rows_);
    row_sk_.allocate(window_rows_);
    row_vpl_.allocate(window_rows_);
    kp_.allocate(g_.neighbours);
    skp_.allocate(g_.neighbours);
    neighbour_row_.allocate(g_.neighbours);
    neighbour_col_.allocate(g_.neighbours);
    for (int64_t n = 0; n < g_.neighbours; ++n) {  // (no integer divisions in the per-tile loops)
      neighbour_row_[n] = n / g_.kernel_size;
      neighbour_col_[n] = n % g_.kernel_size;  // dx + r
    }
    idx_transpose_ = pixel_major_to_channel_major_index();
    idx_expand_ = tap_expand_index();
  }

  void run(int64_t row_begin, int64_t row_end) {
    const int64_t D = g_.depth, H = g_.height;
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t b = row / (D * H), z = (row / H) % D, y = row % H;
      process_row(b, z, y);
    }
  }

 private:
  const uint8_t* pixel_row(const uint8_t* data, int64_t b, int64_t z, int64_t y) const {
    return data + (b * g_.pixels + (z * g_.height + y) * g_.width) * g_.channels;
  }

  // Repack W pixels x C channels (one image row, channels-last) into dst[group][dst_off + x] dwords of 4 channels
  // (XOR-ed with flip: 0x80808080 turns u8 into u - 128 as s8), with sums[head][dst_off + x] = sum of the raw
  // channel bytes of the head. Fast path (C/heads % 4 == 0): 16 x 16 dword transposes.
  void pack_groups(const uint8_t* src, uint32_t* dst, int32_t* sums, int64_t dst_stride, int64_t dst_off,
                   uint32_t flip) {
    const int64_t W = g_.width, C = g_.channels;
    if (!fast_pack_) {
      for (int64_t x = 0; x < W; ++x) {
        const uint8_t* px = src + x * C;
        for (int64_t h = 0; h < g_.heads; ++h) {
          int32_t sum = 0;
          for (int64_t gg = 0; gg < Gh_; ++gg) {
            uint32_t word = 0;
            for (int j = 0; j < 4; ++j) {
              const int64_t cc = 4 * gg + j;
              if (cc >= Ch_) continue;
              const uint8_t raw = px[h * Ch_ + cc];
              sum += raw;
              word |= static_cast<uint32_t>(raw ^ (flip & 0xFF)) << (8 * j);
            }
            dst[(h * Gh_ + gg) * dst_stride + dst_off + x] = word;
          }
          sums[h * dst_stride + dst_off + x] = sum;
        }
      }
      return;
    }
    const uint32_t* src32 = reinterpret_cast<const uint32_t*>(src);
    const int64_t G = G_;
    const __m512i ones = _mm512_set1_epi8(1);
    const __m512i flipv = _mm512_set1_epi32(static_cast<int32_t>(flip));
    for (int64_t x0 = 0; x0 < W; x0 += kLanes) {
      const int64_t npx = min64(kLanes, W - x0);
      const __mmask16 pmask = simd::tile_mask(x0, 0, W);
      for (int64_t g0 = 0; g0 < G; g0 += kLanes) {
        const int64_t ng = min64(kLanes, G - g0);
        __m512i r[16];
        load_groups_pixel_lanes(src32, G, x0, npx, g0, ng, r);
        for (int64_t j = 0; j < ng; ++j) {
          const int64_t grp = g0 + j;
          const int64_t h = grp / Gh_;
          int32_t* sp = sums + h * dst_stride + dst_off + x0;
          __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), r[j], ones);
          if (grp % Gh_ != 0) s = _mm512_add_epi32(s, _mm512_maskz_loadu_epi32(pmask, sp));
          _mm512_mask_storeu_epi32(sp, pmask, s);
          _mm512_mask_storeu_epi32(dst + grp * dst_stride + dst_off + x0, pmask, _mm512_xor_si512(r[j], flipv));
        }
      }
    }
  }

  // Values of one image row -> vpl[c][r + x] = v - 128 (s8); the padding keeps zv - 128 (real 0).
  void pack_values(const uint8_t* src, uint8_t* vpl) {
    const int64_t W = g_.width, C = g_.channels, r = g_.radius;
    if (!fast_pack_) {
      for (int64_t x = 0; x < W; ++x)
        for (int64_t c = 0; c < C; ++c) vpl[c * Wpl_ + r + x] = src[x * C + c] ^ 0x80;
    } else {
      const uint32_t* src32 = reinterpret_cast<const uint32_t*>(src);
      const int64_t G = C / 4;
      const __m512i flipv = _mm512_set1_epi8(static_cast<char>(0x80));
      for (int64_t x0 = 0; x0 < W; x0 += kLanes) {
        const int64_t npx = min64(kLanes, W - x0);
        const __mmask16 pmask = simd::tile_mask(x0, 0, W);
        for (int64_t g0 = 0; g0 < G; g0 += kLanes) {
          const int64_t ng = min64(kLanes, G - g0);
          __m512i rr[16];
          load_groups_pixel_lanes(src32, G, x0, npx, g0, ng, rr);
          for (int64_t j = 0; j < ng; ++j) {
            const __m512i planar = _mm512_xor_si512(_mm512_permutexvar_epi8(idx_transpose_, rr[j]), flipv);
            uint8_t* base = vpl + 4 * (g0 + j) * Wpl_ + r + x0;
            _mm_mask_storeu_epi8(base, pmask, _mm512_extracti32x4_epi32(planar, 0));
            _mm_mask_storeu_epi8(base + Wpl_, pmask, _mm512_extracti32x4_epi32(planar, 1));
            _mm_mask_storeu_epi8(base + 2 * Wpl_, pmask, _mm512_extracti32x4_epi32(planar, 2));
            _mm_mask_storeu_epi8(base + 3 * Wpl_, pmask, _mm512_extracti32x4_epi32(planar, 3));
          }
        }
      }
    }
  }

  // Slot of image row (b, z, y), repacking its keys and values on a miss; the constant pad slot outside the image.
  int64_t row_slot(int64_t b, int64_t z, int64_t y) {
    if (z < 0 || z >= g_.depth || y < 0 || y >= g_.height) return slots_;
    const int64_t slot = (z % g_.window_depth) * g_.kernel_size + (y % g_.kernel_size);
    const int64_t tag = (b * g_.depth + z) * g_.height + y;
    if (tag_[slot] != tag) {
      pack_groups(pixel_row(p_.k, b, z, y), k4_.data() + slot * G_ * Wk_, sk_.data() + slot * g_.heads * Wk_, Wk_,
                  g_.radius, 0x80808080u);
      pack_values(pixel_row(p_.v, b, z, y), vpl_.data() + slot * g_.channels * Wpl_);
      tag_[slot] = tag;
    }
    return slot;
  }

  template <int NB>
  void logits_block(const uint32_t* qp, int64_t n0, int64_t h, const __m512i sq) {
    __m512i dot[NB], hi[NB], lo[NB];
    const uint32_t* kp[NB];
    const int32_t* rh[NB];
    const int32_t* rl[NB];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) {
      dot[j] = _mm512_setzero_si512();
      hi[j] = _mm512_setzero_si512();
      lo[j] = _mm512_setzero_si512();
      kp[j] = kp_[n0 + j];
      rh[j] = p_.rel_hi + (n0 + j) * G_ + h * Gh_;
      rl[j] = p_.rel_lo + (n0 + j) * G_ + h * Gh_;
    }
    for (int64_t gg = 0; gg < Gh_; ++gg) {
      const __m512i qv = _mm512_loadu_si512(qp + gg * Wt_);
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
        dot[j] = _mm512_dpbusd_epi32(dot[j], qv, _mm512_loadu_si512(kp[j] + gg * Wk_));
        hi[j] = _mm512_dpbusd_epi32(hi[j], qv, _mm512_set1_epi32(rh[j][gg]));
        lo[j] = _mm512_dpbusd_epi32(lo[j], qv, _mm512_set1_epi32(rl[j][gg]));
      }
    }
    const int32_t zq = p_.q_zero, zk = p_.k_zero;
    const __m512i k128 = _mm512_set1_epi32(128 - zk);
    const __m512i kzq = _mm512_set1_epi32(zq);
    const __m512i kconst = _mm512_set1_epi32(static_cast<int32_t>(Ch_ * zq * zk));
    const __m512 sqk = _mm512_set1_ps(p_.q_scale * p_.k_scale);
    const __m512i sq_term = _mm512_add_epi32(_mm512_mullo_epi32(sq, k128), kconst);
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) {
      const int64_t n = n0 + j;
      const __m512i sk = _mm512_loadu_si512(skp_[n]);
      const __m512i qk = _mm512_sub_epi32(_mm512_add_epi32(dot[j], sq_term), _mm512_mullo_epi32(sk, kzq));
      __m512 relf = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[j]), _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(lo[j]));
      relf = _mm512_sub_ps(relf, _mm512_set1_ps(static_cast<float>(zq) * p_.rel_sum[n * g_.heads + h]));
      const __m512 logit = _mm512_fmadd_ps(_mm512_cvtepi32_ps(qk), sqk,
                                           _mm512_mul_ps(relf, _mm512_set1_ps(p_.q_scale * p_.rel_scale[n])));
      _mm512_storeu_ps(logits_.data() + n * kLanes, logit);
    }
  }

  void logits_all(const uint32_t* qp, int64_t h, const __m512i sq) {
    const int64_t K = g_.neighbours;
    for (int64_t n0 = 0; n0 < K; n0 += kNeighbourBlock) {
      switch (min64(kNeighbourBlock, K - n0)) {
        case 1: logits_block<1>(qp, n0, h, sq); break;
        case 2: logits_block<2>(qp, n0, h, sq); break;
        case 3: logits_block<3>(qp, n0, h, sq); break;
        case 4: logits_block<4>(qp, n0, h, sq); break;
        case 5: logits_block<5>(qp, n0, h, sq); break;
        case 6: logits_block<6>(qp, n0, h, sq); break;
        case 7: logits_block<7>(qp, n0, h, sq); break;
        case 8: logits_block<8>(qp, n0, h, sq); break;
        case 9: logits_block<9>(qp, n0, h, sq); break;
        default: break;
      }
    }
  }

  // logits -> 8-bit weights packed per (window row, tap group); returns v_scale / (sum of the weights) per lane.
  __m512 softmax_weights() {
    const int64_t K = g_.neighbours;
    __m512 m = _mm512_loadu_ps(logits_.data());
    for (int64_t n = 1; n < K; ++n) m = _mm512_max_ps(m, _mm512_loadu_ps(logits_.data() + n * kLanes));
    __m512i sum = _mm512_setzero_si512();
    const __m512 k255 = _mm512_set1_ps(255.f);
    for (int64_t n = 0; n < K; ++n) {
      const __m512 e = simd::exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(logits_.data() + n * kLanes), m));
      const __m512i w = _mm512_cvtps_epi32(_mm512_mul_ps(e, k255));  // round to nearest even
      _mm512_storeu_si512(wq_.data() + n * kLanes, w);
      sum = _mm512_add_epi32(sum, w);
    }
    for (int64_t rw = 0; rw < window_rows_; ++rw) {
      for (int64_t t = 0; t < tap_groups_; ++t) {
        __m512i packed = _mm512_setzero_si512();
        for (int j = 0; j < 4; ++j) {
          const int64_t tap = 4 * t + j;
          if (tap >= taps_) break;
          const __m512i w = _mm512_loadu_si512(wq_.data() + (rw * taps_ + tap) * kLanes);
          packed = _mm512_or_si512(packed, _mm512_sll_epi32(w, _mm_cvtsi32_si128(8 * j)));
        }
        _mm512_storeu_si512(wpack_.data() + (rw * tap_groups_ + t) * kLanes, packed);
      }
    }
    return _mm512_div_ps(_mm512_set1_ps(p_.v_scale), _mm512_cvtepi32_ps(sum));
  }

  // Channels c .. c + CB - 1 of the 16-pixel tile at x0: integer weighted value sums, the float epilogue, and a
  // channels-last store to outp (pixel x0, channel c). CB = 16 transposes in registers, narrower blocks scatter.
  template <int CB>
  void output_block(int64_t c, int64_t x0, __m512 norm, __m512 offset, float* outp, __mmask16 qmask, int64_t npx) {
    __m512i acc[CB];
#pragma GCC unroll 16
    for (int j = 0; j < CB; ++j) acc[j] = _mm512_setzero_si512();
    for (int64_t rw = 0; rw < window_rows_; ++rw) {
      const uint8_t* base = row_vpl_[rw] + c * Wpl_ + x0;
      for (int64_t t = 0; t < tap_groups_; ++t) {
        const __m512i w = _mm512_loadu_si512(wpack_.data() + (rw * tap_groups_ + t) * kLanes);
#pragma GCC unroll 16
        for (int j = 0; j < CB; ++j)
          acc[j] = _mm512_dpbusd_epi32(
              acc[j], w, _mm512_permutexvar_epi8(idx_expand_, _mm512_loadu_si512(base + j * Wpl_ + 4 * t)));
      }
    }
    const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int j = 0; j < CB; ++j) {
      __m512 y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j]), norm, offset);
      y = _mm512_fmadd_ps(y, _mm512_set1_ps(p_.out_scale[c + j]), _mm512_set1_ps(p_.out_shift[c + j]));
      if (p_.relu) y = _mm512_max_ps(y, zero);
      acc[j] = _mm512_castps_si512(y);
    }
    const int64_t C = g_.channels;
    if constexpr (CB == 16) {
      transpose16x16_epi32(acc);  // acc[i] = channels c .. c + 15 of pixel x0 + i
      for (int64_t i = 0; i < npx; ++i) _mm512_storeu_si512(outp + i * C, acc[i]);
    } else {
      const __m512i index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(static_cast<int32_t>(C)));
#pragma GCC unroll 16
      for (int j = 0; j < CB; ++j) _mm512_mask_i32scatter_ps(outp + j, qmask, index, _mm512_castsi512_ps(acc[j]), 4);
    }
  }

  void process_row(int64_t b, int64_t z, int64_t y) {
    const int64_t W = g_.width, K = g_.neighbours, r = g_.radius, P = g_.pixels;
    pack_groups(pixel_row(p_.q, b, z, y), q4_.data(), sq_.data(), Wt_, 0, 0u);
    for (int64_t rw = 0; rw < window_rows_; ++rw) {
      const int64_t zz = z + (g_.volumetric ? rw / g_.kernel_size - r : 0);
      const int64_t yy = y + rw % g_.kernel_size - r;
      const int64_t slot = row_slot(b, zz, yy);
      row_k4_[rw] = k4_.data() + slot * G_ * Wk_;
      row_sk_[rw] = sk_.data() + slot * g_.heads * Wk_;
      row_vpl_[rw] = vpl_.data() + slot * g_.channels * Wpl_;
    }
    const int32_t zv = p_.v_zero;
    const __m512 offset = _mm512_set1_ps(p_.v_scale * static_cast<float>(128 - zv));
    for (int64_t x0 = 0; x0 < W; x0 += kLanes) {
      const __mmask16 qmask = simd::tile_mask(x0, 0, W);
      for (int64_t h = 0; h < g_.heads; ++h) {
        for (int64_t n = 0; n < K; ++n) {
          kp_[n] = row_k4_[neighbour_row_[n]] + h * Gh_ * Wk_ + x0 + neighbour_col_[n];
          skp_[n] = row_sk_[neighbour_row_[n]] + h * Wk_ + x0 + neighbour_col_[n];
        }
        const __m512i sq = _mm512_loadu_si512(sq_.data() + h * Wt_ + x0);
        logits_all(q4_.data() + h * Gh_ * Wt_ + x0, h, sq);
        const __m512 norm = softmax_weights();
        const int64_t npx = min64(kLanes, W - x0);
        float* outp = out_ + (b * P + (z * g_.height + y) * W + x0) * g_.channels + h * Ch_;
        int64_t c = 0;
        for (; c + 16 <= Ch_; c += 16) output_block<16>(h * Ch_ + c, x0, norm, offset, outp + c, qmask, npx);
        if (c + 8 <= Ch_) {
          output_block<8>(h * Ch_ + c, x0, norm, offset, outp + c, qmask, npx);
          c += 8;
        }
        if (c + 4 <= Ch_) {
          output_block<4>(h * Ch_ + c, x0, norm, offset, outp + c, qmask, npx);
          c += 4;
        }
        if (c + 2 <= Ch_) {
          output_block<2>(h * Ch_ + c, x0, norm, offset, outp + c, qmask, npx);
          c += 2;
        }
        if (c < Ch_) output_block<1>(h * Ch_ + c, x0, norm, offset, outp + c, qmask, npx);
      }
    }
  }

  const Int8PlanView p_;
  const GeometryView g_;
  float* out_;
  int64_t Ch_ = 0, Gh_ = 0, G_ = 0, taps_ = 0, tap_groups_ = 0, window_rows_ = 0;
  int64_t Wt_ = 0, Wk_ = 0, Wpl_ = 0, slots_ = 0;
  bool fast_pack_ = false;
  ScratchBuffer<uint32_t> q4_;
  ScratchBuffer<int32_t> sq_;
  ScratchBuffer<uint32_t> k4_;
  ScratchBuffer<int32_t> sk_;
  ScratchBuffer<int64_t> tag_;
  ScratchBuffer<uint8_t> vpl_;
  ScratchBuffer<float> logits_;
  ScratchBuffer<int32_t> wq_;
  ScratchBuffer<int32_t> wpack_;
  ScratchBuffer<const uint32_t*> row_k4_;
  ScratchBuffer<const int32_t*> row_sk_;
  ScratchBuffer<const uint8_t*> row_vpl_;
  ScratchBuffer<const uint32_t*> kp_;
  ScratchBuffer<const int32_t*> skp_;
  ScratchBuffer<int64_t> neighbour_row_, neighbour_col_;  // window row and padded column offset of neighbour n
  __m512i idx_transpose_;
  __m512i idx_expand_;
};

}  // namespace

namespace avx512 {

void int8_rows(const Int8PlanView& plan, float* out, int64_t row_begin, int64_t row_end) {
  Int8RowWorker worker(plan, out);
  worker.run(row_begin, row_end);
}

}  // namespace avx512
}  // namespace medattn

#pragma GCC pop_options
