// The tile layout of low-bit weights and what both engines share: expanding a B tile (16 VNNI rows of 32 bf16)
// from its 4- or 8-bit codes and scales, the grouped problem, and the few-rows dot-product path.
//
// The weight is stored in "tiles" (repacked once at load, dgemma/quant/native.py): for each block of 16 output
// columns (nb) and 32 inputs (kb), the 16 rows of one B tile in VNNI order, where VNNI element e (0..31) of row r
// is W[16 nb + e / 2, 32 kb + 2 r + e % 2]. That is the order AMX's B tiles and AVX-512 BF16's dot products
// (vdpbf16ps: a column's pair of inputs in one 32-bit lane) both read.
//
// What the expansion writes, and so what the products are:
// - int4: (q - 8) x scale, exact in fp32, rounded once to bf16 (as the dequantize-then-bf16 path does); or, on the
//   group-scaled path, q - 8 alone (exact in bf16) with each scale group's fp32 sums scaled: the exact dequantized
//   weight.
// - NVFP4: e2m1 x e4m3 block scale, exact in bf16 (at most 6 significant bits), so x times the exact dequantized
//   weight; the global scale applies to the output (in Python).
// - FP8: e4m3 x scale rounded once to bf16, as the dequantize-then-bf16 path does.
// - BF16: a plain bf16 [N, K] matrix read in place (the tied LM head's table): each B tile is a 16 x 16 transpose
//   of 32-bit input pairs, no scales.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "bf16.h"

namespace woq {
enum Format : int64_t { INT4 = 0, NVFP4 = 1, FP8 = 2, BF16 = 3 };

constexpr int TILE_K = 32;    // bf16 inputs per B tile (16 VNNI rows of 2)
constexpr int TILE_N = 16;    // output columns per B tile
constexpr int TILE_M = 16;    // activation rows per A tile
constexpr int BLOCK_M = 2 * TILE_M;  // rows per block of C tiles (2 x 2 C tiles: 32 rows x 32 columns)


// Every call streams its codes from memory once. One core's demand loads (interleaved with the expansion's stores)
// reach ~7 GB/s on a Xeon; asking for the codes PREFETCH_AHEAD bytes ahead into L2 lifts that to ~10 GB/s. Each
// expansion prefetches as many bytes as it reads; past the end of a tile row the prefetches land in the next rows,
// which the next work items read.
constexpr int64_t PREFETCH_AHEAD = 8192;

inline void prefetch_codes(const uint8_t* codes, int bytes) {
  for (int i = 0; i < bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(codes + PREFETCH_AHEAD + i), _MM_HINT_T1);
}

inline __m512 e4m3_to_ps(__m128i bytes16) {
  // e4m3 -> fp16 bits (sign, then exponent and mantissa shifted into place) -> fp32, times 2^8 for the bias
  // difference; the fp16 conversion takes the e4m3 subnormals exactly.
  __m256i w = _mm256_cvtepu8_epi16(bytes16);
  __m256i sign = _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8);
  __m256i mag = _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7F)), 7);
  __m512 f = _mm512_cvtph_ps(_mm256_or_si256(sign, mag));
  return _mm512_mul_ps(f, _mm512_set1_ps(256.0f));
}

// The 16 columns' scales of one scale block as fp32. INT4: bf16 [NB, K / group, 16]; NVFP4: e4m3 [NB, K / 16, 16];
// FP8: fp32 [NB, K / block, 16].
template <int64_t FMT>
inline __m512 load_scales(const void* data, int64_t at) {
  if constexpr (FMT == INT4) {
    return bf16_load(static_cast<const uint16_t*>(data) + at);
  } else if constexpr (FMT == NVFP4) {
    return e4m3_to_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(data) + at)));
  } else {
    return _mm512_loadu_ps(static_cast<const float*>(data) + at);
  }
}

// The 4-bit layout. A B tile's 256 bytes are four groups of 64 bytes; 16-bit word e (0..31) of group g holds
// element e of VNNI rows 4g, 4g + 1, 4g + 2, 4g + 3 in its nibbles 0-3. So a shift and one 32-lane word permute
// give a whole VNNI row, and seen as 16 dwords, lane i holds column i's two inputs of those rows (input 0 of row
// 4g + h at bit 4h, input 1 at bit 16 + 4h): a shift and one 16-lane permute give one input for all 16 columns.
constexpr int GROUP_BYTES = 64;

inline __m512 int4_table() { return _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8); }
inline __m512 e2m1_table() {
  return _mm512_set_ps(-6.f, -4.f, -3.f, -2.f, -1.5f, -1.f, -0.5f, -0.f, 6.f, 4.f, 3.f, 2.f, 1.5f, 1.f, 0.5f, 0.f);
}

// The values of one input (0..7 within a group) for the group's 16 columns, from the group's dwords.
inline __m512 input_values(__m512i d, int i, __m512 table) {
  return _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4 * (i >> 1) + 16 * (i & 1)), table);
}

// int4 B tile: (q - 8) x the columns' scales (s), exact in fp32, rounded once to bf16. input_values' lanes are
// columns, so a word permute interleaves the two inputs of each column into VNNI order.
inline void expand_int4(const uint8_t* codes, __m512 s, uint16_t* dst) {
  const __m512 table = int4_table();
  const __m512i vnni = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                        21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  prefetch_codes(codes, 256);
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512i d = _mm512_loadu_si512(codes + GROUP_BYTES * g);
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) {
      const __m512 a = _mm512_mul_ps(input_values(d, 2 * h, table), s);
      const __m512 b = _mm512_mul_ps(input_values(d, 2 * h + 1, table), s);
      const __m512i words = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // a's 16 bf16, then b's
      _mm512_storeu_si512(dst + 128 * g + 32 * h, _mm512_permutexvar_epi16(vnni, words));
    }
  }
}

// NVFP4 B tile: e2m1 x block scale (s0: the tile's first 16 inputs, rows 0-7; s1: rows 8-15), exact in fp32 with
// at most 6 significant bits, so its bf16 is the top half of its fp32 bits: VNNI lane i = (input 0 >> 16) |
// input 1 (whose low half is zero), no rounding step.
inline void expand_nvfp4(const uint8_t* codes, __m512 s0, __m512 s1, uint16_t* dst) {
  const __m512 table = e2m1_table();
  prefetch_codes(codes, 256);
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512i d = _mm512_loadu_si512(codes + GROUP_BYTES * g);
    const __m512 s = g < 2 ? s0 : s1;
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) {
      const __m512i a = _mm512_castps_si512(_mm512_mul_ps(input_values(d, 2 * h, table), s));
      const __m512i b = _mm512_castps_si512(_mm512_mul_ps(input_values(d, 2 * h + 1, table), s));
      _mm512_storeu_si512(dst + 128 * g + 32 * h, _mm512_or_si512(_mm512_srli_epi32(a, 16), b));
    }
  }
}

// lanes 0..15 <- s[8 half + lane / 2]: each column's scale for its two VNNI elements
inline __m512 pair_spread(__m512 s, int half) {
  const __m512i lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
  return _mm512_permutexvar_ps(half ? hi : lo, s);
}

// FP8 B tile: 32 bytes per VNNI row, e4m3 codes in element order, times the scales, rounded once to bf16 (as
// (q * s).to(bf16)).
inline void expand_fp8(const uint8_t* codes, __m512 s, uint16_t* dst) {
  const __m512 sa = pair_spread(s, 0), sb = pair_spread(s, 1);
  prefetch_codes(codes, 512);
  for (int r = 0; r < 16; ++r) {
    __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 32 * r));
    __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 32 * r + 16));
    __m512 lo = _mm512_mul_ps(e4m3_to_ps(b0), sa);
    __m512 hi = _mm512_mul_ps(e4m3_to_ps(b1), sb);
    _mm512_storeu_si512(dst + 32 * r, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// BF16 B tile from a row-major [N, K] bf16 matrix: w points at W[16 nb, 32 kb], rows `ld` elements apart. VNNI row
// r is input pair r (one dword) of each of the 16 columns: a 16 x 16 transpose of dwords.
inline void expand_bf16(const uint16_t* w, int64_t ld, uint16_t* dst) {
  __m512i r[16], t[16];  // rows of the 16 columns' 16 input pairs
  for (int c = 0; c < 16; ++c) r[c] = _mm512_loadu_si512(w + c * ld);
  for (int c = 0; c < 16; c += 2) {  // dwords of rows c, c + 1 interleaved
    t[c] = _mm512_unpacklo_epi32(r[c], r[c + 1]);
    t[c + 1] = _mm512_unpackhi_epi32(r[c], r[c + 1]);
  }
  for (int c = 0; c < 16; c += 4) {  // then qwords of pairs of rows
    r[c] = _mm512_unpacklo_epi64(t[c], t[c + 2]);
    r[c + 1] = _mm512_unpackhi_epi64(t[c], t[c + 2]);
    r[c + 2] = _mm512_unpacklo_epi64(t[c + 1], t[c + 3]);
    r[c + 3] = _mm512_unpackhi_epi64(t[c + 1], t[c + 3]);
  }
  // lane L (128 bits) of r[4 q + j] now holds dword 4 L + j of rows 4 q .. 4 q + 3; VNNI row 4 L + j gathers lane L
  // of r[j], r[4 + j], r[8 + j], r[12 + j]
  for (int j = 0; j < 4; ++j) {
    const __m512i a = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88), b = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xDD);
    const __m512i c = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
    const __m512i d = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xDD);
    _mm512_storeu_si512(dst + 32 * j, _mm512_shuffle_i32x4(a, c, 0x88));
    _mm512_storeu_si512(dst + 32 * (4 + j), _mm512_shuffle_i32x4(b, d, 0x88));
    _mm512_storeu_si512(dst + 32 * (8 + j), _mm512_shuffle_i32x4(a, c, 0xDD));
    _mm512_storeu_si512(dst + 32 * (12 + j), _mm512_shuffle_i32x4(b, d, 0xDD));
  }
}

// One B tile of one expert: columns 16 nb .. 16 nb + 16, inputs 32 kb .. 32 kb + 32, into dst (16 rows of 32 bf16).
// scales: this expert's scale table, `blocks` scale blocks along K; blk: the block of the tile's first input.
template <int64_t FMT>
inline void expand_tile(const uint8_t* w, const void* scales, int64_t nb, int64_t kb, int64_t kb_count,
                        int64_t blocks, int64_t blk, uint16_t* dst) {
  constexpr int64_t tb = FMT == FP8 ? 512 : 256;
  const uint8_t* codes = w + (nb * kb_count + kb) * tb;
  if constexpr (FMT == BF16) {
    const int64_t ld = kb_count * TILE_K;
    expand_bf16(reinterpret_cast<const uint16_t*>(w) + nb * TILE_N * ld + kb * TILE_K, ld, dst);
  } else if constexpr (FMT == INT4) {
    expand_int4(codes, load_scales<FMT>(scales, (nb * blocks + blk) * 16), dst);
  } else if constexpr (FMT == NVFP4) {
    expand_nvfp4(codes, load_scales<FMT>(scales, (nb * blocks + blk) * 16),
                 load_scales<FMT>(scales, (nb * blocks + blk + 1) * 16), dst);
  } else {
    expand_fp8(codes, load_scales<FMT>(scales, (nb * blocks + blk) * 16), dst);
  }
}

struct Problem {
  const uint16_t* x;        // bf16 [at least tile_rows(offsets), K]: every A tile load stays inside
  float* y;                 // fp32 [rows, ldy] (columns N .. ldy unused), or null with yb
  uint16_t* yb;             // bf16 [rows, ldy]: the outputs rounded once (the LM head), or null
  const int64_t* offsets;   // [E + 1]
  const uint8_t* weight;    // [E, NB, KB, tile bytes]
  int64_t expert_weight_bytes;
  const uint8_t* scales;    // [E, NB, blocks, 16] of the format's scale type
  int64_t expert_scale_bytes;
  int64_t fmt, blocks, block_k;
  int64_t n, k;
  int64_t small_rows;       // experts with at most this many rows take the dot-product path (0: never)
  int64_t exact_rows;       // int4 experts with small_rows < rows <= this take the group-scaled path (0: never)
  float* xf;                // fp32 [rows, K]: the activations of those experts' rows (others not written)
  const int64_t* kb_block;  // [K / 32]: the scale block of each input tile's first input (no division per tile)
  int64_t ldy;              // output row stride (elements)
};

// Outputs row, columns col .. col + 15.
inline void store_out(const Problem& p, int64_t row, int64_t col, __m512 v) {
  if (p.yb) bf16_store(p.yb + row * p.ldy + col, v);
  else _mm512_storeu_ps(p.y + row * p.ldy + col, v);
}

// A few rows (left-to-right decoding): no expansion to memory. For each input, a shift and a permute give the
// unscaled values (q - 8 for int4, e2m1 for NVFP4) of the 16 columns, multiplied into accumulators with that input's
// fp32 activation; the column scales multiply the accumulators once per scale block. These are the products of the
// exact dequantized weight, so these rows agree with it to fp32 rounding.
constexpr int GEMV_ROWS = 4;  // the most rows `small_rows` may ask for

// ROWS is a template parameter so that the accumulators stay in registers.
template <int64_t FMT, int ROWS>
void gemv_item(const Problem& p, int64_t begin, int64_t nb0, int ntiles, const uint8_t* w, const void* sc) {
  const int64_t kb_count = p.k / TILE_K;
  const float* xf = p.xf + begin * p.k;  // these rows' activations in fp32
  const __m512 table = FMT == INT4 ? int4_table() : e2m1_table();
  const int64_t groups_per_block = FMT == NVFP4 ? 2 : 4 * (p.block_k / TILE_K);  // a group: 8 inputs
  for (int t = 0; t < ntiles; ++t) {
    const int64_t nb = nb0 + t;
    __m512 total[ROWS], acc[ROWS][4];  // four accumulators per row (alternate inputs) for the FMA latency
    for (int m = 0; m < ROWS; ++m) total[m] = acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm512_setzero_ps();
    int64_t blk = 0, left = groups_per_block;  // the scale block, and its groups still to come
    for (int64_t kb = 0; kb < kb_count; ++kb) {
      const uint8_t* codes = w + (nb * kb_count + kb) * 256;
      prefetch_codes(codes, 256);
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const __m512i d = _mm512_loadu_si512(codes + GROUP_BYTES * g);
        const float* xk = xf + kb * TILE_K + 8 * g;  // the group's 8 inputs
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          const __m512 v = input_values(d, i, table);
          for (int m = 0; m < ROWS; ++m)
            acc[m][i & 3] = _mm512_fmadd_ps(v, _mm512_set1_ps(xk[m * p.k + i]), acc[m][i & 3]);
        }
        if (--left == 0) {  // the end of a scale block: scale and fold
          left = groups_per_block;
          const __m512 s = load_scales<FMT>(sc, (nb * p.blocks + blk) * TILE_N);
          for (int m = 0; m < ROWS; ++m) {
            const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
            total[m] = _mm512_fmadd_ps(sum, s, total[m]);
            acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm512_setzero_ps();
          }
          ++blk;
        }
      }
    }
    for (int m = 0; m < ROWS; ++m) store_out(p, begin + m, nb * TILE_N, total[m]);
  }
}

// One work item: the rows of `expert` times its columns 32 strip .. 32 strip + 32 (one or two B tiles wide).
struct Item {
  int64_t begin, end, nb0;
  int ntiles;
  const uint8_t* w;  // the expert's codes
  const void* sc;    // the expert's scales

  Item(const Problem& p, int64_t expert, int64_t strip)
      : begin(p.offsets[expert]), end(p.offsets[expert + 1]), nb0(strip * 2),
        ntiles((strip * 2 + 1) * TILE_N < p.n ? 2 : 1), w(p.weight + expert * p.expert_weight_bytes),
        sc(p.scales + expert * p.expert_scale_bytes) {}
  int64_t rows() const { return end - begin; }
};

// Rows begin .. begin + count (1 .. GEMV_ROWS) on the dot-product path.
template <int64_t FMT>
inline void gemv_rows(const Problem& p, int64_t begin, int64_t count, int64_t nb0, int ntiles, const uint8_t* w,
                      const void* sc) {
  switch (count) {
    case 1: gemv_item<FMT, 1>(p, begin, nb0, ntiles, w, sc); break;
    case 2: gemv_item<FMT, 2>(p, begin, nb0, ntiles, w, sc); break;
    case 3: gemv_item<FMT, 3>(p, begin, nb0, ntiles, w, sc); break;
    default: gemv_item<FMT, 4>(p, begin, nb0, ntiles, w, sc); break;
  }
}

// Whether the item has no rows, or few enough for the dot-product path (int4, NVFP4), which then ran.
template <int64_t FMT>
inline bool done_by_gemv(const Problem& p, const Item& it) {
  if (it.rows() == 0) return true;
  if constexpr (FMT == FP8 || FMT == BF16) return false;
  if (it.rows() > p.small_rows) return false;
  gemv_rows<FMT>(p, it.begin, it.rows(), it.nb0, it.ntiles, it.w, it.sc);
  return true;
}

// int4 B tile holding q - 8 (exact in bf16): VNNI row 4g + h is the words of group g shifted by 4h, looked up in a
// table of bf16(-8..7). The table is there twice because vpermw reads five index bits (the fifth: the next nibble's).
inline void expand_int4_unscaled(const uint8_t* codes, uint16_t* dst) {
  const __m512i table = _mm512_set_epi16(
      0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000, -0x4080, -0x4000, -0x3FC0, -0x3F80, -0x3F60,
      -0x3F40, -0x3F20, -0x3F00, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000, -0x4080, -0x4000,
      -0x3FC0, -0x3F80, -0x3F60, -0x3F40, -0x3F20, -0x3F00);
  prefetch_codes(codes, 256);
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512i d = _mm512_loadu_si512(codes + GROUP_BYTES * g);
    _mm512_storeu_si512(dst + 128 * g, _mm512_permutexvar_epi16(d, table));
    _mm512_storeu_si512(dst + 128 * g + 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(d, 4), table));
    _mm512_storeu_si512(dst + 128 * g + 64, _mm512_permutexvar_epi16(_mm512_srli_epi16(d, 8), table));
    _mm512_storeu_si512(dst + 128 * g + 96, _mm512_permutexvar_epi16(_mm512_srli_epi16(d, 12), table));
  }
}

}  // namespace woq
