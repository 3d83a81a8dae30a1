// The AVX-512 BF16 engine. A work item expands its strip of 32 columns into bf16 tiles (tiles.h: VNNI order, a
// column's pair of inputs in one 32-bit lane, what vdpbf16ps reads; Tiles says where they are kept) and multiplies
// blocks of up to AVX_ROWS rows with them, each block's 32 columns accumulating in zmm registers over all of K: per
// VNNI row, one load per 16 columns and one 32-bit broadcast per row. Every output is a sum in one fixed order
// (input pair by input pair), so the same whatever rows share its block. The group-scaled path (int4) folds each
// scale group's sums into an fp32 total in L1, as the AMX engine does.
#include "woq_avx512.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

namespace woq {
namespace {

constexpr int AVX_ROWS = 12;  // rows per register block: 12 x 2 accumulators, 2 weight rows, 1 broadcast (of 32)

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

inline __m512i pair_at(const uint16_t* a) {  // x[i], x[i + 1] in every lane
  int32_t v;
  std::memcpy(&v, a, 4);
  return _mm512_set1_epi32(v);
}

// Where a work item's expanded B tiles come from: the whole strip expanded once into `strip` (many rows: one
// expansion serves every block), or, with `strip` null (one block of rows), each input tile's pair expanded into a
// two-slot ring in L1 right before its products, so the expansion never goes through L2.
struct Tiles {
  const uint16_t* strip;
  uint16_t* ring;
  void (*expand)(const Tiles&, int64_t kb, uint16_t* dst);
  const Problem* p;
  const Item* it;

  const uint16_t* at(int64_t kb) const {
    if (strip) return strip + kb * 1024;
    uint16_t* dst = ring + (kb & 1) * 1024;
    expand(*this, kb, dst);
    return dst;
  }
};

// acc[m][t] += rows m of x (stride k) times tiles t, input tiles kb0 .. kb1.
template <int R, int NT>
inline void dot_tiles(const uint16_t* x, int64_t k, const Tiles& src, int64_t kb0, int64_t kb1,
                      __m512 (&acc)[R][NT]) {
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const uint16_t* b = src.at(kb);
    const uint16_t* a = x + kb * TILE_K;
#pragma GCC unroll 2
    for (int r = 0; r < 16; ++r) {
      __m512i bv[NT];
      for (int t = 0; t < NT; ++t) bv[t] = _mm512_load_si512(b + t * 512 + 32 * r);
      for (int m = 0; m < R; ++m) {
        const __m512i av = pair_at(a + m * k + 2 * r);
        for (int t = 0; t < NT; ++t) acc[m][t] = _mm512_dpbf16_ps(acc[m][t], as_bh(av), as_bh(bv[t]));
      }
    }
  }
}

// Rows m0 .. m0 + R times the expanded (scaled) tiles, stored to y.
template <int R, int NT>
void scaled_rows(const Problem& p, int64_t m0, int64_t nb0, const Tiles& tiles, const void*) {
  __m512 acc[R][NT];
  for (int m = 0; m < R; ++m)
    for (int t = 0; t < NT; ++t) acc[m][t] = _mm512_setzero_ps();
  dot_tiles<R, NT>(p.x + m0 * p.k, p.k, tiles, 0, p.k / TILE_K, acc);
  for (int m = 0; m < R; ++m)
    for (int t = 0; t < NT; ++t) store_out(p, m0 + m, (nb0 + t) * TILE_N, acc[m][t]);
}

// int4, group-scaled: the tiles hold q - 8; total += each scale group's sums x the columns' scales.
template <int R, int NT>
void group_rows(const Problem& p, int64_t m0, int64_t nb0, const Tiles& tiles, const void* sc) {
  const int64_t per_group = p.block_k / TILE_K;
  alignas(64) float total[R][NT][TILE_N] = {};
  for (int64_t blk = 0; blk < p.blocks; ++blk) {
    __m512 acc[R][NT];
    for (int m = 0; m < R; ++m)
      for (int t = 0; t < NT; ++t) acc[m][t] = _mm512_setzero_ps();
    dot_tiles<R, NT>(p.x + m0 * p.k, p.k, tiles, blk * per_group, (blk + 1) * per_group, acc);
    for (int t = 0; t < NT; ++t) {
      const __m512 s = load_scales<INT4>(sc, ((nb0 + t) * p.blocks + blk) * TILE_N);
      for (int m = 0; m < R; ++m)
        _mm512_store_ps(total[m][t], _mm512_fmadd_ps(acc[m][t], s, _mm512_load_ps(total[m][t])));
    }
  }
  for (int m = 0; m < R; ++m)
    for (int t = 0; t < NT; ++t) store_out(p, m0 + m, (nb0 + t) * TILE_N, _mm512_load_ps(total[m][t]));
}

using RowsFn = void (*)(const Problem&, int64_t, int64_t, const Tiles&, const void*);

template <bool GROUP, int NT, size_t... I>
constexpr std::array<RowsFn, sizeof...(I)> rows_table(std::index_sequence<I...>) {
  return {{(GROUP ? &group_rows<int(I) + 1, NT> : &scaled_rows<int(I) + 1, NT>)...}};
}

RowsFn rows_fn(bool group, int ntiles, int rows) {
  constexpr auto seq = std::make_index_sequence<AVX_ROWS>{};
  static constexpr auto s1 = rows_table<false, 1>(seq), s2 = rows_table<false, 2>(seq);
  static constexpr auto g1 = rows_table<true, 1>(seq), g2 = rows_table<true, 2>(seq);
  const auto& fns = group ? (ntiles == 2 ? g2 : g1) : (ntiles == 2 ? s2 : s1);
  return fns[rows - 1];
}

template <int64_t FMT>
void item(const Problem& p, int64_t expert, int64_t strip, uint16_t* buf) {
  const Item it(p, expert, strip);
  if (done_by_gemv<FMT>(p, it)) return;
  const bool group = FMT == INT4 && it.rows() <= p.exact_rows;
  auto expand = [](const Tiles& s, int64_t kb, uint16_t* dst) {
    const Item& i = *s.it;
    for (int t = 0; t < i.ntiles; ++t)
      expand_tile<FMT>(i.w, i.sc, i.nb0 + t, kb, s.p->k / TILE_K, s.p->blocks, s.p->kb_block[kb], dst + t * 512);
  };
  auto expand_unscaled = [](const Tiles& s, int64_t kb, uint16_t* dst) {
    const Item& i = *s.it;
    for (int t = 0; t < i.ntiles; ++t)
      expand_int4_unscaled(i.w + ((i.nb0 + t) * (s.p->k / TILE_K) + kb) * 256, dst + t * 512);
  };
  const int64_t rows = it.rows(), blocks = (rows + AVX_ROWS - 1) / AVX_ROWS;
  Tiles src{nullptr, buf, group ? +expand_unscaled : +expand, &p, &it};
  if (blocks > 1) {  // many rows: the whole strip once, for every block
    for (int64_t kb = 0; kb < p.k / TILE_K; ++kb) src.expand(src, kb, buf + kb * 1024);
    src.strip = buf;
  }
  // blocks of nearly equal rows (16 rows: 8 + 8)
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t a = it.begin + rows * i / blocks, b = it.begin + rows * (i + 1) / blocks;
    rows_fn(group, it.ntiles, int(b - a))(p, a, it.nb0, src, it.sc);
  }
}

// -- the self-conditioning product -----------------------------------------------------------------------------------
// For each chunk of TABLE_KC table rows and strip of 64 columns, the chunk's pairs of rows are interleaved into VNNI
// order (4 zmm per pair: 16 columns each, in L1), then blocks of TABLE_ROWS rows of P accumulate the 64 columns in
// registers, C kept in a per-call fp32 buffer across chunks. One fixed order per output (chunk by chunk, pair by
// pair), whatever the rows.
constexpr int64_t TABLE_KC = 256;
constexpr int64_t TABLE_STRIP = 64;
constexpr int TABLE_ROWS = 6;  // 6 x 4 accumulators, 4 table rows, 1 broadcast

template <int R>
void table_rows(const uint16_t* P, int64_t K, int64_t k0, const uint16_t* bbuf, float* c, int64_t ldc, bool first) {
  __m512 acc[R][4];
  for (int m = 0; m < R; ++m)
    for (int t = 0; t < 4; ++t) acc[m][t] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + m * ldc + 16 * t);
  for (int64_t j = 0; j < TABLE_KC / 2; ++j) {
    const uint16_t* b = bbuf + j * 128;
    const __m512i b0 = _mm512_load_si512(b), b1 = _mm512_load_si512(b + 32), b2 = _mm512_load_si512(b + 64),
                  b3 = _mm512_load_si512(b + 96);
    for (int m = 0; m < R; ++m) {
      const __m512bh av = as_bh(pair_at(P + m * K + k0 + 2 * j));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], av, as_bh(b0));
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], av, as_bh(b1));
      acc[m][2] = _mm512_dpbf16_ps(acc[m][2], av, as_bh(b2));
      acc[m][3] = _mm512_dpbf16_ps(acc[m][3], av, as_bh(b3));
    }
  }
  for (int m = 0; m < R; ++m)
    for (int t = 0; t < 4; ++t) _mm512_storeu_ps(c + m * ldc + 16 * t, acc[m][t]);
}

using TableFn = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, float*, int64_t, bool);

template <size_t... I>
constexpr std::array<TableFn, sizeof...(I)> table_fns(std::index_sequence<I...>) {
  return {{&table_rows<int(I) + 1>...}};
}

}  // namespace

void avx512_table_columns(const uint16_t* P, const uint16_t* E, float* O, int64_t M, int64_t K, int64_t N,
                          int64_t n0, int64_t n1) {
  static constexpr auto fns = table_fns(std::make_index_sequence<TABLE_ROWS>{});
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                      5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54, 22,
                                      53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  std::vector<uint16_t> b_store(TABLE_KC * TABLE_STRIP + 32);
  uint16_t* bbuf = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(b_store.data()) + 63) & ~uintptr_t(63));
  for (int64_t k0 = 0; k0 < K; k0 += TABLE_KC) {
    for (int64_t c0 = n0; c0 < n1; c0 += TABLE_STRIP) {
      for (int64_t j = 0; j < TABLE_KC / 2; ++j) {  // pair j: table rows k0 + 2j and k0 + 2j + 1
        const uint16_t* e0 = E + (k0 + 2 * j) * N + c0;
        for (int h = 0; h < 2; ++h) {
          const __m512i a = _mm512_loadu_si512(e0 + 32 * h), b = _mm512_loadu_si512(e0 + N + 32 * h);
          _mm512_store_si512(bbuf + j * 128 + 64 * h, _mm512_permutex2var_epi16(a, lo, b));
          _mm512_store_si512(bbuf + j * 128 + 64 * h + 32, _mm512_permutex2var_epi16(a, hi, b));
        }
      }
      for (int64_t m0 = 0; m0 < M; m0 += TABLE_ROWS) {
        const int r = int(std::min<int64_t>(TABLE_ROWS, M - m0));
        fns[r - 1](P + m0 * K, K, k0, bbuf, O + m0 * N + c0, N, k0 == 0);
      }
    }
  }
}

void avx512_item(const Problem& p, int64_t expert, int64_t strip, uint16_t* buf) {
  if (p.fmt == INT4) item<INT4>(p, expert, strip, buf);
  else if (p.fmt == NVFP4) item<NVFP4>(p, expert, strip, buf);
  else if (p.fmt == BF16) item<BF16>(p, expert, strip, buf);
  else item<FP8>(p, expert, strip, buf);
}

}  // namespace woq
