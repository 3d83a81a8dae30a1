// Weight-only low-bit GEMM: y[rows, N] = x[rows, K] @ W.T with W kept in 4 or 8 bits (tile layout: tiles.h; or
// a plain bf16 matrix read in place, the tied LM head), on
// one of two engines chosen at load (dgemma/quant/native.py): Intel AMX (this file: the expanded B tiles multiplied
// by the tile unit) or AVX-512 BF16 (woq_avx512.cpp: the same expanded tiles, vdpbf16ps with accumulators in
// registers). Each call expands 32 output columns at a time into bf16 in cache, so no expanded expert ever reaches
// memory.
//
// Paths, by an expert's row count (the caller picks the thresholds; 0 and 0 keep one path per weight):
// - at most `small_rows` (left-to-right decoding; int4, NVFP4): no expansion, fp32 dot products of the codes'
//   values with the activations, scaled once per block (tiles.h, gemv_item).
// - int4 with at most `exact_rows`: the group-scaled path, tiles of q - 8 alone, each scale group's sums scaled:
//   the exact dequantized weight, and cheaper where each expanded tile serves only ~16 rows (a canvas's share).
// - otherwise the scaled expansion, expanded once per strip of 32 columns and reused for every row.
//
// Grouped calls run many experts at once: rows are sorted by expert, `offsets` [E + 1] gives each expert's rows,
// and the work items (expert, strip of 32 columns) are spread over torch's threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"
#include "tiles.h"
#include "woq_avx512.h"

namespace {

using namespace woq;

struct TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The rows of the C and A tiles as this thread configured them (B tiles always have 16: a tile's 32 inputs).
thread_local int tile_rows_now = 0;

// C tiles 0-3 (fp32) and A tiles 4-5 (32 bf16 per row) of `rows` rows, B tiles 6-7 of 16. Fewer rows than 16 (an
// expert with few rows) load, multiply, store and fold only those; each row's products are the same whatever the
// rows around it, so the results are too.
void configure_tiles(int rows = TILE_M) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = t < 6 ? rows : 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  tile_rows_now = rows;
}

// Reconfigure only when the rows change (a run of items of one expert keeps them); loading a configuration zeroes
// every tile, so call it before an item's first tile instruction.
inline void use_tile_rows(int rows) {
  if (rows != tile_rows_now) configure_tiles(rows);
}


inline void zero_c() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// The C tiles to c (tiles 2-3, the second 16 rows, only with two_m).
inline void spill_c(float (*c)[TILE_M * TILE_N], bool two_m) {
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  if (two_m) {
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
  }
}

// Rows m0 .. end (at most 32) of y, columns 16 nb0 .. 16 nb0 + 16 ntiles, from c laid out as the C tiles.
inline void write_rows(const Problem& p, int64_t m0, int64_t end, int64_t nb0, int ntiles, bool two_m,
                       const float (*c)[TILE_M * TILE_N]) {
  for (int mt = 0; mt < (two_m ? 2 : 1); ++mt) {
    for (int t = 0; t < ntiles; ++t) {
      const float* src = c[mt * 2 + t];
      for (int64_t r = 0; r < TILE_M; ++r) {
        int64_t row = m0 + mt * TILE_M + r;
        if (row >= end) break;
        store_out(p, row, (nb0 + t) * TILE_N, _mm512_load_ps(src + r * TILE_N));
      }
    }
  }
}

inline void store_c(const Problem& p, int64_t m0, int64_t end, int64_t nb0, int ntiles, bool two_m) {
  alignas(64) float tmp[4][TILE_M * TILE_N];
  spill_c(tmp, two_m);
  write_rows(p, m0, end, nb0, ntiles, two_m, tmp);
}

// C (up to 32 rows x 32 columns) += A (rows m0.., inputs of block kb) x the two B tiles at b.
inline void dot_block(const Problem& p, int64_t m0, int64_t kb, const uint16_t* b, int ntiles, bool two_m) {
  const uint16_t* a = p.x + m0 * p.k + kb * TILE_K;
  const int64_t lda = p.k * 2;
  _tile_loadd(4, a, lda);
  _tile_loadd(6, b, 64);
  _tile_dpbf16ps(0, 4, 6);
  if (ntiles == 2) {
    _tile_loadd(7, b + 512, 64);
    _tile_dpbf16ps(1, 4, 7);
  }
  if (two_m) {
    _tile_loadd(5, a + TILE_M * p.k, lda);
    _tile_dpbf16ps(2, 5, 6);
    if (ntiles == 2) _tile_dpbf16ps(3, 5, 7);
  }
}


// The C tiles of rows m0 .. m0 + rows (at most 32) over all K, with B tiles (scales included) from `tile(kb)`,
// stored to y.
template <typename TileFn>
inline void block_rows(const Problem& p, int64_t m0, int rows, int64_t nb0, int ntiles, TileFn tile) {
  const bool two_m = rows > TILE_M;
  zero_c();
  for (int64_t kb = 0; kb < p.k / TILE_K; ++kb) dot_block(p, m0, kb, tile(kb), ntiles, two_m);
  store_c(p, m0, m0 + rows, nb0, ntiles, two_m);
}


// The B tiles of input tile kb (one or two columns' tiles) into slot kb % 4 of the ring. The products read a slot
// AHEAD tiles after it was written: a tile load cannot take data still in the store buffer, so the expansion runs
// ahead and the loads find it in L1.
constexpr int64_t AHEAD = 3;
inline uint16_t* ring_slot(uint16_t* buf, int64_t kb) { return buf + (kb & 3) * 1024; }  // 4 slots of 2 tiles
inline void expand_ring(const uint8_t* w, int64_t nb0, int ntiles, int64_t kb_count, int64_t kb, uint16_t* buf) {
  for (int t = 0; t < ntiles; ++t)
    expand_int4_unscaled(w + ((nb0 + t) * kb_count + kb) * 256, ring_slot(buf, kb) + t * 512);
}

// One scale group's products for 16 rows: C tiles C0, C1 (zeroed first) += A x B over the group's input tiles, then
// stored to sums. GCC's tile intrinsics take tile numbers as literal tokens, hence a macro for the two pairs.
#define DGEMMA_GROUP_PRODUCTS(NAME, C0, C1)                                                                       \
  inline void NAME(const Problem& p, int64_t m0, int64_t kb0, int64_t kb1, int ntiles, const uint8_t* w,         \
                   int64_t nb0, uint16_t* buf, float (*sums)[TILE_M * TILE_N]) {                                 \
    const int64_t kb_count = p.k / TILE_K, lda = p.k * 2;                                                        \
    _tile_zero(C0);                                                                                              \
    _tile_zero(C1);                                                                                              \
    for (int64_t kb = kb0; kb < kb1; ++kb) {                                                                     \
      if (kb + AHEAD < kb_count) expand_ring(w, nb0, ntiles, kb_count, kb + AHEAD, buf);                         \
      const uint16_t* b = ring_slot(buf, kb);                                                                    \
      _tile_loadd(4, p.x + m0 * p.k + kb * TILE_K, lda);                                                         \
      _tile_loadd(6, b, 64);                                                                                     \
      _tile_dpbf16ps(C0, 4, 6);                                                                                  \
      if (ntiles == 2) {                                                                                         \
        _tile_loadd(7, b + 512, 64);                                                                             \
        _tile_dpbf16ps(C1, 4, 7);                                                                                \
      }                                                                                                          \
    }                                                                                                            \
    _tile_stored(C0, sums[0], 64);                                                                               \
    if (ntiles == 2) _tile_stored(C1, sums[1], 64);                                                              \
  }
DGEMMA_GROUP_PRODUCTS(group_products_01, 0, 1)
DGEMMA_GROUP_PRODUCTS(group_products_23, 2, 3)
#undef DGEMMA_GROUP_PRODUCTS

// total (the first `rows` rows x 16 ntiles columns, fp32) += sums x the columns' scales of scale block blk.
inline void fold_group(const Problem& p, const void* sc, int64_t nb0, int ntiles, int64_t blk,
                       const float (*sums)[TILE_M * TILE_N], float (*total)[TILE_M * TILE_N], int rows = TILE_M) {
  for (int t = 0; t < ntiles; ++t) {
    const __m512 s = load_scales<INT4>(sc, ((nb0 + t) * p.blocks + blk) * TILE_N);
#pragma GCC unroll 4
    for (int r = 0; r < rows; ++r)
      _mm512_store_ps(total[t] + 16 * r,
                      _mm512_fmadd_ps(_mm512_load_ps(sums[t] + 16 * r), s, _mm512_load_ps(total[t] + 16 * r)));
  }
}

// int4, at most 16 rows (begin .. end) times columns 16 nb0 .. 16 nb0 + 16 ntiles, group-scaled: the C tiles
// collect one scale group's sums of x (q - 8), then total += sums x the columns' scales (fp32, in L1). Groups
// alternate between two pairs of C tiles, and a group's sums are folded after the next group's products are issued:
// the tile unit works while the vector units scale, instead of each waiting on the other. Each tile is expanded
// into the ring in L1 AHEAD steps before its products.
void int4_group_scaled_16(const Problem& p, int64_t begin, int64_t end, int64_t nb0, int ntiles, const uint8_t* w,
                          const void* sc, uint16_t* buf) {
  const int64_t per_group = p.block_k / TILE_K;
  const int rows = int(end - begin);
  use_tile_rows(rows);  // an expert's rows only: fewer A rows loaded, fewer C rows multiplied, stored and folded
  alignas(64) float sums[2][2][TILE_M * TILE_N];
  alignas(64) float total[2][TILE_M * TILE_N];
  std::memset(total, 0, sizeof(total));
  for (int64_t kb = 0; kb < AHEAD && kb < p.k / TILE_K; ++kb) expand_ring(w, nb0, ntiles, p.k / TILE_K, kb, buf);
  for (int64_t blk = 0; blk < p.blocks; ++blk) {
    const int64_t kb0 = blk * per_group, kb1 = kb0 + per_group;
    if (blk & 1) group_products_23(p, begin, kb0, kb1, ntiles, w, nb0, buf, sums[1]);
    else group_products_01(p, begin, kb0, kb1, ntiles, w, nb0, buf, sums[0]);
    if (blk > 0) fold_group(p, sc, nb0, ntiles, blk - 1, sums[(blk - 1) & 1], total, rows);
  }
  fold_group(p, sc, nb0, ntiles, p.blocks - 1, sums[(p.blocks - 1) & 1], total, rows);
  write_rows(p, begin, end, nb0, ntiles, false, total);
}

// int4 rows begin .. end times columns 16 nb0 .. 16 nb0 + 16 ntiles, group-scaled: per block of 32 rows, the C
// tiles collect one scale group's sums of x (q - 8), then total += sums x the columns' scales (fp32, in L1). The
// same sums in the same order as int4_group_scaled_16 (which takes items of at most 16 rows), so a row's result
// does not depend on how many rows share its expert.
void int4_group_scaled(const Problem& p, int64_t begin, int64_t end, int64_t nb0, int ntiles, const uint8_t* w,
                       const void* sc, uint16_t* buf) {
  const int64_t kb_count = p.k / TILE_K, per_group = p.block_k / TILE_K;
  const bool many = end - begin > BLOCK_M;
  alignas(64) float sums[4][TILE_M * TILE_N];
  alignas(64) float total[4][TILE_M * TILE_N];
  // up to 32 rows: each tile into the ring AHEAD tiles before its products; more: the strip once, kept for every
  // block
  if (many)
    for (int64_t kb = 0; kb < kb_count; ++kb)
      for (int t = 0; t < ntiles; ++t)
        expand_int4_unscaled(w + ((nb0 + t) * kb_count + kb) * 256, buf + kb * 1024 + t * 512);
  else
    for (int64_t kb = 0; kb < AHEAD && kb < kb_count; ++kb) expand_ring(w, nb0, ntiles, kb_count, kb, buf);
  for (int64_t m0 = begin; m0 < end; m0 += BLOCK_M) {
    const int rows = int(std::min<int64_t>(BLOCK_M, end - m0));
    const bool two_m = rows > TILE_M;
    const int mtiles = two_m ? 2 : 1;
    std::memset(total, 0, sizeof(total));
    for (int64_t blk = 0; blk < p.blocks; ++blk) {
      zero_c();
      for (int64_t kb = blk * per_group; kb < (blk + 1) * per_group; ++kb) {
        if (!many && kb + AHEAD < kb_count) expand_ring(w, nb0, ntiles, kb_count, kb + AHEAD, buf);
        dot_block(p, m0, kb, many ? buf + kb * 1024 : ring_slot(buf, kb), ntiles, two_m);
      }
      spill_c(sums, two_m);
      for (int mt = 0; mt < mtiles; ++mt) fold_group(p, sc, nb0, ntiles, blk, sums + 2 * mt, total + 2 * mt);
    }
    write_rows(p, m0, m0 + rows, nb0, ntiles, two_m, total);
  }
}

// One work item: the rows of `expert` times its columns 32 strip .. 32 strip + 32. With at most 32 rows each B
// tile is expanded into a small ring (in L1) right before its dot products; with more, the whole strip is expanded
// once into buf and reused for every 32 rows.
template <int64_t FMT>
void run_item(const Problem& p, int64_t expert, int64_t strip, uint16_t* buf) {
  const Item it(p, expert, strip);
  if (done_by_gemv<FMT>(p, it)) return;
  const int64_t begin = it.begin, end = it.end, nb0 = it.nb0, kb_count = p.k / TILE_K;
  const int ntiles = it.ntiles;
  if constexpr (FMT == INT4) {
    if (end - begin <= TILE_M && end - begin <= p.exact_rows) {  // configures its tiles with the item's rows
      int4_group_scaled_16(p, begin, end, nb0, ntiles, it.w, it.sc, buf);
      return;
    }
  }
  use_tile_rows(TILE_M);  // every other path multiplies whole 16-row tiles
  auto expand = [&](int64_t kb, uint16_t* dst) {
    for (int t = 0; t < ntiles; ++t)
      expand_tile<FMT>(it.w, it.sc, nb0 + t, kb, kb_count, p.blocks, p.kb_block[kb], dst + t * 512);
    return dst;
  };
  if constexpr (FMT == INT4) {
    if (end - begin <= p.exact_rows) {
      int4_group_scaled(p, begin, end, nb0, ntiles, it.w, it.sc, buf);
      return;
    }
  }
  if (end - begin <= BLOCK_M) {
    block_rows(p, begin, int(end - begin), nb0, ntiles,
               [&](int64_t kb) { return expand(kb, ring_slot(buf, kb)); });
    return;
  }
  for (int64_t kb = 0; kb < kb_count; ++kb) expand(kb, buf + kb * 1024);
  for (int64_t m0 = begin; m0 < end; m0 += BLOCK_M)
    block_rows(p, m0, int(std::min<int64_t>(BLOCK_M, end - m0)), nb0, ntiles,
               [&](int64_t kb) { return buf + kb * 1024; });
}

}  // namespace

namespace {
bool amx_ready = false;  // the OS granted this process the AMX tile state
bool amx_on = false;     // the engine: AMX, else AVX-512 BF16
}  // namespace

// Request the AMX tile state (Linux hands it out only on request: ARCH_REQ_XCOMP_PERM = 0x1023, XTILEDATA = 18)
// and make AMX the engine where granted. Call only on CPUs with the AMX flags.
bool amx_init() {
  amx_ready = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  amx_on = amx_ready;
  return amx_ready;
}

bool amx_granted() { return amx_ready; }
bool amx_active() { return amx_on; }

// The engine for later calls: AMX where `on` and granted, else AVX-512 BF16; returns whether AMX is on.
bool use_amx(bool on) {
  amx_on = on && amx_ready;
  return amx_on;
}

// The rows of x the A tile loads read: each expert's tiles start at its first row, every 16 rows, and read 16.
int64_t tile_rows(const int64_t* offsets, int64_t experts) {
  int64_t need = 0;
  for (int64_t e = 0; e < experts; ++e)
    if (offsets[e + 1] > offsets[e])
      need = std::max(need, offsets[e] + (offsets[e + 1] - offsets[e] + TILE_M - 1) / TILE_M * TILE_M);
  return need;
}

// y fp32 [rows, N] = x @ W_e.T for each expert e's rows, rows = offsets[E]. x: bf16 [R, K] with R at least what
// the tiles read (`tile_rows`: rows rounded up to 16 for one matrix, rows + 15 at most for many experts; the rows
// past `rows` only feed outputs that are never stored). With bf16_out, y is bf16 (each output rounded once); for a
// plain bf16 matrix (the LM head), rows whose bytes are a multiple of 4 KiB get 64 bytes of padding (y is then a
// view): the head's [rows, 262144] would otherwise put every row's outputs of a strip in the same cache sets.
// Experts with at most `small_rows` rows (<= 4) take the dot-product path, int4 experts with at most `exact_rows`
// the group-scaled one; 0 and 0 keep every row on the scaled-expansion path, so that a row's result never depends on
// how many rows share its expert.
torch::Tensor woq_grouped(torch::Tensor x, torch::Tensor offsets, torch::Tensor weight, torch::Tensor scales,
                          int64_t fmt, int64_t n, int64_t k, int64_t block_k, int64_t small_rows,
                          int64_t exact_rows, bool bf16_out) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && x.size(1) == k, "x: bf16 [R, K]");
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.is_contiguous(), "offsets: int64");
  TORCH_CHECK(weight.is_contiguous() && scales.is_contiguous(), "weight and scales must be contiguous");
  TORCH_CHECK(n % TILE_N == 0 && k % TILE_K == 0 && block_k % 16 == 0, "N % 16, K % 32 and block % 16 must be 0");
  TORCH_CHECK(fmt != INT4 || exact_rows == 0 || block_k % TILE_K == 0, "group-scaled int4 needs block % 32 == 0");
  const int64_t experts = offsets.size(0) - 1;
  const int64_t rows = offsets.data_ptr<int64_t>()[experts];
  TORCH_CHECK(x.size(0) >= tile_rows(offsets.data_ptr<int64_t>(), experts), "x: ", x.size(0),
              " rows, the tiles read ", tile_rows(offsets.data_ptr<int64_t>(), experts));
  const int64_t ldy = fmt == BF16 && bf16_out && (n * 2) % 4096 == 0 ? n + 32 : n;
  auto y = torch::empty({rows, ldy}, x.options().dtype(bf16_out ? torch::kBFloat16 : torch::kFloat32));
  const int64_t strips = (n + 2 * TILE_N - 1) / (2 * TILE_N);
  Problem p{reinterpret_cast<const uint16_t*>(x.data_ptr()), bf16_out ? nullptr : y.data_ptr<float>(),
            bf16_out ? reinterpret_cast<uint16_t*>(y.data_ptr()) : nullptr, offsets.data_ptr<int64_t>(),
            weight.data_ptr<uint8_t>(), weight.numel() * weight.element_size() / experts,
            static_cast<const uint8_t*>(scales.data_ptr()), scales.numel() * scales.element_size() / experts,
            fmt, k / block_k, block_k, n, k, std::min<int64_t>(small_rows, GEMV_ROWS), exact_rows, nullptr,
            nullptr, ldy};
  std::vector<int64_t> kb_block(k / TILE_K);
  for (int64_t kb = 0; kb < k / TILE_K; ++kb) kb_block[kb] = kb * TILE_K / block_k;
  p.kb_block = kb_block.data();
  // work items: only experts with rows; the few-rows experts' activations in fp32, once
  std::vector<int64_t> active;
  torch::Tensor xf;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t count = p.offsets[e + 1] - p.offsets[e];
    if (count == 0) continue;
    active.push_back(e);
    if (count > p.small_rows || fmt == FP8 || fmt == BF16) continue;
    if (!xf.defined()) xf = torch::empty({rows, k}, x.options().dtype(torch::kFloat32));
    p.xf = xf.data_ptr<float>();
    for (int64_t row = p.offsets[e]; row < p.offsets[e + 1]; ++row)
      for (int64_t i = 0; i < k; i += 16) {
        _mm512_storeu_ps(p.xf + row * k + i, bf16_load(p.x + row * k + i));
      }
  }
  const int64_t items = int64_t(active.size()) * strips;
  // items are claimed from a shared counter (experts' row counts differ, so a static split would leave a thread
  // idle), in runs of consecutive items: a run is one stretch of codes in memory, which the prefetches (ours, 8 KB
  // ahead, and the hardware's) follow across item boundaries; items claimed one by one alternate between threads,
  // and each thread's stream restarts every 45 KB (gate/up 16 rows, two threads: 11% faster; down 22%). At least
  // 8 runs per thread keep the balance.
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(items, 1));
  const int64_t run = std::clamp<int64_t>(items / (workers * 8), 1, 16);
  const bool amx = amx_on;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    if (amx) configure_tiles();
    // the expanded strip (or the 4-tile ring), 64-byte aligned
    std::vector<uint16_t> storage(std::max<int64_t>(k / TILE_K, 4) * 1024 + 32);
    uint16_t* buf = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
    for (int64_t first = next.fetch_add(run); first < items; first = next.fetch_add(run))
      for (int64_t i = first; i < std::min(items, first + run); ++i) {
        if (!amx) avx512_item(p, active[i / strips], i % strips, buf);
        else if (fmt == INT4) run_item<INT4>(p, active[i / strips], i % strips, buf);
        else if (fmt == NVFP4) run_item<NVFP4>(p, active[i / strips], i % strips, buf);
        else if (fmt == BF16) run_item<BF16>(p, active[i / strips], i % strips, buf);
        else run_item<FP8>(p, active[i / strips], i % strips, buf);
      }
    if (amx) _tile_release();
  });
  return ldy == n ? y : y.narrow(1, 0, n);
}

// -- the self-conditioning product: probabilities P [M, V] @ the embedding table E [V, H], both bf16 --------------
// oneDNN reorders the whole table (1.5 GB at full size) into its blocked layout at every call; this reads it in
// place. For each chunk of TABLE_KC vocabulary rows: P's chunk is packed into A tiles (all M rows), and for each
// strip of 64 table columns the chunk's 16 VNNI rows per tile are built from pairs of table rows (one word permute
// per pair, the next strip's rows prefetched meanwhile); C for a group of TABLE_GROUP strips x all M rows stays in a
// per-thread buffer over the whole vocabulary. Each output is an fp32 sum of exact bf16 products in one fixed order
// (chunk by chunk, 32 rows per tile product), whatever M: a row's result never depends on its neighbours.
constexpr int64_t TABLE_KC = 256;     // vocabulary rows per chunk: V must be a multiple
// Where V allows, chunks of TABLE_KC_LONG: C goes to and from its buffer once per 32 input tiles instead of 8
// (the full-size product, 256 rows: 25% less time, 128 rows: 10%; 2048 was slower: A, B and C no longer fit L2).
// The sums are the same either way: each C tile accumulates the input tiles in order, stored and reloaded exactly.
constexpr int64_t TABLE_KC_LONG = 1024;
constexpr int64_t TABLE_STRIP = 64;   // table columns per strip (4 C tiles)
constexpr int64_t TABLE_GROUP = 4;    // strips per work item

// VNNI row r of the four B tiles of a strip (columns n0 .. n0 + 63) from table rows e0 and e1 (= e0 + 1 row).
inline void vnni_pair(const uint16_t* e0, const uint16_t* e1, uint16_t* dst, int r) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                      5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54, 22,
                                      53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  for (int h = 0; h < 2; ++h) {
    const __m512i a = _mm512_loadu_si512(e0 + 32 * h), b = _mm512_loadu_si512(e1 + 32 * h);
    _mm512_store_si512(dst + (2 * h) * 512 + r * 32, _mm512_permutex2var_epi16(a, lo, b));
    _mm512_store_si512(dst + (2 * h + 1) * 512 + r * 32, _mm512_permutex2var_epi16(a, hi, b));
  }
}

// fp32 [M, H] = p [M, V] @ e [V, H]; M % 16, V % 256 and H % 64 must be 0 (dgemma/quant/native.py pads M).
torch::Tensor table_product(torch::Tensor p, torch::Tensor e) {
  TORCH_CHECK(p.scalar_type() == torch::kBFloat16 && e.scalar_type() == torch::kBFloat16 && p.is_contiguous() &&
              e.is_contiguous() && p.dim() == 2 && e.dim() == 2 && p.size(1) == e.size(0),
              "p: bf16 [M, V], e: bf16 [V, H], contiguous");
  const int64_t M = p.size(0), K = p.size(1), N = e.size(1);
  TORCH_CHECK(M % TILE_M == 0 && K % TABLE_KC == 0 && N % TABLE_STRIP == 0, "M % 16, V % 256 and H % 64 must be 0");
  auto out = torch::empty({M, N}, p.options().dtype(torch::kFloat32));
  const uint16_t* P = reinterpret_cast<const uint16_t*>(p.data_ptr());
  const uint16_t* E = reinterpret_cast<const uint16_t*>(e.data_ptr());
  float* O = out.data_ptr<float>();
  const int64_t strips = N / TABLE_STRIP, groups = (strips + TABLE_GROUP - 1) / TABLE_GROUP;
  const int64_t kc = K % TABLE_KC_LONG == 0 ? TABLE_KC_LONG : TABLE_KC;  // the AMX path's chunk
  const int64_t kt = kc / TILE_K;  // tiles per chunk
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), groups);
  if (!amx_on) {  // AVX-512 BF16: each worker its share of the column strips
    at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t worker = w0; worker < w1; ++worker)
        avx512_table_columns(P, E, O, M, K, N, TABLE_STRIP * (strips * worker / workers),
                             TABLE_STRIP * (strips * (worker + 1) / workers));
    });
    return out;
  }
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t worker = w0; worker < w1; ++worker) {
      configure_tiles();
      auto aligned = [](auto& v) { return reinterpret_cast<decltype(v.data())>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63)); };
      std::vector<uint16_t> b_store(kc * TABLE_STRIP + 64), a_store(M * kc + 64);
      std::vector<float> c_store(M * TABLE_GROUP * TABLE_STRIP + 16);
      uint16_t* bbuf = aligned(b_store);
      uint16_t* abuf = aligned(a_store);
      float* cbuf = aligned(c_store);
      for (int64_t g = groups * worker / workers; g < groups * (worker + 1) / workers; ++g) {
        const int64_t sa = g * TABLE_GROUP, sb = std::min(strips, sa + TABLE_GROUP), width = (sb - sa) * TABLE_STRIP;
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
          for (int64_t m = 0; m < M; ++m)  // A tiles of this chunk: [M / 16][kt][16 rows x 32]
            for (int64_t ks = 0; ks < kt; ++ks)
              _mm512_store_si512(abuf + ((m / TILE_M) * kt + ks) * 512 + (m % TILE_M) * 32,
                                 _mm512_loadu_si512(P + m * K + k0 + TILE_K * ks));
          for (int64_t s = sa; s < sb; ++s) {
            const int64_t n0 = TABLE_STRIP * s;
            for (int64_t ks = 0; ks < kt; ++ks)
              for (int r = 0; r < 16; ++r) {
                const int64_t k = k0 + TILE_K * ks + 2 * r;
                vnni_pair(E + k * N + n0, E + (k + 1) * N + n0, bbuf + ks * 2048, r);
              }
            // the table rows of the next strip (or of the next chunk's first strip), fetched during the products
            const bool last = s + 1 == sb;
            const uint16_t* next = last ? E + (k0 + kc) * N + sa * TABLE_STRIP : E + k0 * N + n0 + TABLE_STRIP;
            const int64_t per = (last && k0 + kc >= K) ? 0 : kc / (M / TILE_M);
            for (int64_t m0 = 0; m0 < M; m0 += TILE_M) {
              for (int64_t i = 0; i < per; ++i) {
                const char* q = reinterpret_cast<const char*>(next + ((m0 / TILE_M) * per + i) * N);
                _mm_prefetch(q, _MM_HINT_T0);
                _mm_prefetch(q + 64, _MM_HINT_T0);
              }
              float* c = cbuf + m0 * width + (n0 - sa * TABLE_STRIP);
              if (k0 == 0) {
                zero_c();
              } else {  // tile numbers must be constants
                _tile_loadd(0, c, width * 4);
                _tile_loadd(1, c + 16, width * 4);
                _tile_loadd(2, c + 32, width * 4);
                _tile_loadd(3, c + 48, width * 4);
              }
              const uint16_t* a = abuf + (m0 / TILE_M) * kt * 512;
              for (int64_t ks = 0; ks < kt; ++ks) {
                _tile_loadd(4, a + 512 * ks, 64);
                const uint16_t* b = bbuf + ks * 2048;
                _tile_loadd(6, b, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_loadd(7, b + 512, 64);
                _tile_dpbf16ps(1, 4, 7);
                _tile_loadd(6, b + 1024, 64);
                _tile_dpbf16ps(2, 4, 6);
                _tile_loadd(7, b + 1536, 64);
                _tile_dpbf16ps(3, 4, 7);
              }
              _tile_stored(0, c, width * 4);
              _tile_stored(1, c + 16, width * 4);
              _tile_stored(2, c + 32, width * 4);
              _tile_stored(3, c + 48, width * 4);
            }
          }
        }
        for (int64_t m = 0; m < M; ++m) std::memcpy(O + m * N + sa * TABLE_STRIP, cbuf + m * width, width * 4);
      }
      _tile_release();
    }
  });
  return out;
}

// A layer's expert outputs back to its tokens: out[t] = bf16(sum over j < top_k, in order, of bf16(y[slot[t k + j]])
// x w[t k + j]), the sum in fp32 from 0: what rounding y to bf16, then out.float() * w, a scatter to token order and
// a sum over the k slots give in torch, in one pass (y: fp32 [rows, H], slot and w: [T x top_k]).
torch::Tensor moe_combine(torch::Tensor y, torch::Tensor slot, torch::Tensor w, int64_t top_k) {
  TORCH_CHECK(y.scalar_type() == torch::kFloat32 && y.dim() == 2 && y.is_contiguous() && y.size(1) % 16 == 0,
              "y: contiguous fp32 [rows, H], H % 16 == 0");
  TORCH_CHECK(slot.scalar_type() == torch::kInt64 && w.scalar_type() == torch::kFloat32 && slot.is_contiguous() &&
              w.is_contiguous() && slot.numel() == w.numel() && top_k > 0 && slot.numel() % top_k == 0,
              "slot int64 and w fp32, [tokens x top_k]");
  const int64_t tokens = slot.numel() / top_k, h = y.size(1), rows = y.size(0);
  const int64_t* sl = slot.data_ptr<int64_t>();
  for (int64_t i = 0; i < slot.numel(); ++i) TORCH_CHECK(sl[i] >= 0 && sl[i] < rows, "slot out of range");
  auto out = torch::empty({tokens, h}, y.options().dtype(torch::kBFloat16));
  const float* ys = y.data_ptr<float>();
  const float* ws = w.data_ptr<float>();
  uint16_t* os = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, tokens, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t)
      for (int64_t c = 0; c < h; c += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < top_k; ++j) {
          const __m512 v = bf16_round(_mm512_loadu_ps(ys + sl[t * top_k + j] * h + c));
          acc = _mm512_add_ps(acc, _mm512_mul_ps(v, _mm512_set1_ps(ws[t * top_k + j])));  // two roundings, as torch
        }
        bf16_store(os + t * h + c, acc);
      }
  });
  return out;
}

// csrc/repack.cpp
torch::Tensor tile_codes(torch::Tensor packed, int64_t bits);
// csrc/sample.cpp
std::vector<torch::Tensor> fused_sample(torch::Tensor raw, torch::Tensor table, torch::Tensor uniforms,
                                        torch::Tensor rows, torch::Tensor probs);
// csrc/elementwise.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
void gelu_mul(torch::Tensor gate, torch::Tensor up, torch::Tensor out);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tile_codes", &tile_codes, "repack 4- or 8-bit codes into the kernel's tile layout");
  m.def("amx_init", &amx_init, "request the AMX tile state from the kernel and make AMX the engine");
  m.def("amx_granted", &amx_granted, "whether the AMX engine can run in this process");
  m.def("amx_active", &amx_active, "whether the kernel calls run on AMX now");
  m.def("use_amx", &use_amx, "choose the engine: AMX where granted, else AVX-512 BF16");
  m.def("woq_grouped", &woq_grouped, "grouped weight-only low-bit GEMM");
  m.def("table_product", &table_product, "probabilities times the embedding table (self-conditioning)");
  m.def("fused_sample", &fused_sample, "the denoising sampler's per-position work at a large vocabulary");
  m.def("rms_norm", &rms_norm, "RMS norm of each row (fp32 statistics), bf16");
  m.def("gelu_mul", &gelu_mul, "out = gelu_tanh(gate) * up, bf16");
  m.def("moe_combine", &moe_combine, "expert outputs to token order, weighted and summed over the k choices");
}
