// The fp32 engine: y[rows, N] = x[rows, K] @ W.T for fp32 activations and low-bit weights in the tile layout
// (tiles.h describes it; dgemma/quant/native.py builds it at load), on any x86-64 CPU with AVX2 and FMA. It is what
// dgemma runs where the CPU has no native bf16 (so activations stay fp32), and for fp32 activations anywhere.
//
// Each work item is one expert's strip of 16 output columns. Its weight is expanded into fp32, k-major (16 columns
// per input, two 8-lane vectors), and every row of the expert takes one fused multiply-add per input and column,
// inputs in ascending order: y[r, n] = fma(x[r, K-1], w[K-1, n], ... fma(x[r, 0], w[0, n], 0)). That sequence is the
// same whatever the rows around r and whichever loop runs it, so a row's result never depends on its neighbours.
//
// The expanded weight is the format's exact fp32 dequantized weight, the one TileTensor.dequantize returns:
// int4 (q - 8) x scale and NVFP4 e2m1 x e4m3 block scale are exact in fp32; FP8 e4m3 x fp32 scale is rounded once,
// as torch rounds q.float() * s. NVFP4's global scale applies to the output (in Python). So the outputs agree with
// the dequantized model's fp32 matmul to fp32 rounding of a K-term sum (another summation order than the BLAS).
//
// Built as its own module with AVX2 flags only (dgemma/extension.py): the AVX-512 module's code must never reach
// a CPU without AVX-512.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace {

enum Format : int64_t { INT4 = 0, NVFP4 = 1, FP8 = 2 };
constexpr int TILE_K = 32;     // inputs per tile
constexpr int TILE_N = 16;     // output columns per tile (one work item's strip)
constexpr int GROUP_BYTES = 64;  // a 4-bit tile: 4 groups of 16 dwords (tiles.h)
constexpr int BLOCK_ROWS = 6;  // rows per register block: 12 accumulators, 2 weights, 1 activation
constexpr int64_t PREFETCH_AHEAD = 4096;

// 8 bf16 -> fp32 (exact)
inline __m256 bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// 8 e4m3 bytes -> fp32 (exact): fp16 bits (sign, then exponent and mantissa shifted into place), times 2^8 for the
// bias difference; the fp16 conversion takes the e4m3 subnormals exactly.
inline __m256 e4m3x8(__m128i bytes8) {
  const __m128i w = _mm_cvtepu8_epi16(bytes8);
  const __m128i sign = _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8);
  const __m128i mag = _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x7F)), 7);
  return _mm256_mul_ps(_mm256_cvtph_ps(_mm_or_si128(sign, mag)), _mm256_set1_ps(256.0f));
}

// The 16 columns' scales of scale block `blk` (strip nb) as two fp32 vectors. INT4: bf16 [NB, blocks, 16];
// NVFP4: e4m3 [NB, blocks, 16]; FP8: fp32 [NB, blocks, 16].
template <int64_t FMT>
inline void load_scales(const uint8_t* scales, int64_t at, __m256& s0, __m256& s1) {
  if constexpr (FMT == INT4) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(scales) + at;
    s0 = bf16x8(p);
    s1 = bf16x8(p + 8);
  } else if constexpr (FMT == NVFP4) {
    s0 = e4m3x8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales + at)));
    s1 = e4m3x8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales + at + 8)));
  } else {
    const float* p = reinterpret_cast<const float*>(scales) + at;
    s0 = _mm256_loadu_ps(p);
    s1 = _mm256_loadu_ps(p + 8);
  }
}

// e2m1 magnitudes (code bits 0-2); bit 3 is the sign
inline __m256 e2m1_magnitudes() { return _mm256_setr_ps(0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f); }

// One tile (32 inputs x 16 columns): sink(k, w0, w1) for each input k (0..31, any order) with its 16 columns'
// fp32 weights (columns 0-7, 8-15). 4-bit tiles: dword lane c of group g holds column c's inputs 8g + 2h (bits 4h)
// and 8g + 2h + 1 (bits 16 + 4h), h = 0..3.
template <int64_t FMT, class Sink>
inline void expand_tile(const uint8_t* codes, const uint8_t* scales, int64_t at, int64_t at_next, Sink&& sink) {
  _mm_prefetch(reinterpret_cast<const char*>(codes + PREFETCH_AHEAD), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(codes + PREFETCH_AHEAD + 64), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(codes + PREFETCH_AHEAD + 128), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(codes + PREFETCH_AHEAD + 192), _MM_HINT_T0);
  __m256 s0, s1;
  load_scales<FMT>(scales, at, s0, s1);
  if constexpr (FMT == INT4) {
    // (q - 8) x s as fma(q, s, -8 s): both exact, so the one rounding of the fma is none
    const __m256 n0 = _mm256_mul_ps(s0, _mm256_set1_ps(-8.f)), n1 = _mm256_mul_ps(s1, _mm256_set1_ps(-8.f));
    const __m256i nib = _mm256_set1_epi32(0xF);
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + GROUP_BYTES * g));
      const __m256i d1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + GROUP_BYTES * g + 32));
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const int shift = 4 * (i >> 1) + 16 * (i & 1);
        const int k = 8 * g + 2 * (i >> 1) + (i & 1);
        const __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d0, shift), nib));
        const __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d1, shift), nib));
        sink(k, _mm256_fmadd_ps(q0, s0, n0), _mm256_fmadd_ps(q1, s1, n1));
      }
    }
  } else if constexpr (FMT == NVFP4) {
    // two 16-input scale blocks per tile: groups 0-1, then 2-3
    __m256 t0, t1;
    load_scales<FMT>(scales, at_next, t0, t1);
    const __m256 mags = e2m1_magnitudes();
    const __m256i bit3 = _mm256_set1_epi32(8);
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + GROUP_BYTES * g));
      const __m256i d1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + GROUP_BYTES * g + 32));
      const __m256 a0 = g < 2 ? s0 : t0, a1 = g < 2 ? s1 : t1;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const int shift = 4 * (i >> 1) + 16 * (i & 1);
        const int k = 8 * g + 2 * (i >> 1) + (i & 1);
        const __m256i c0 = _mm256_srli_epi32(d0, shift), c1 = _mm256_srli_epi32(d1, shift);
        // vpermps reads the low 3 bits of each lane: the magnitude; bit 3 moves to the sign bit
        const __m256 v0 = _mm256_xor_ps(_mm256_permutevar8x32_ps(mags, c0),
                                        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(c0, bit3), 28)));
        const __m256 v1 = _mm256_xor_ps(_mm256_permutevar8x32_ps(mags, c1),
                                        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(c1, bit3), 28)));
        sink(k, _mm256_mul_ps(v0, a0), _mm256_mul_ps(v1, a1));
      }
    }
  } else {
    // 8-bit tiles: 16 rows of 32 bytes; byte e of row r is column e / 2, input 2 r + e % 2. Within each 128-bit
    // half, the even bytes (input 2 r) to the low 8 bytes and the odd ones (input 2 r + 1) to the high 8.
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
#pragma GCC unroll 4
    for (int r = 0; r < 16; ++r) {
      const __m256i b = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * r)),
                                            split);
      const __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);  // columns 0-7, 8-15
      sink(2 * r, _mm256_mul_ps(e4m3x8(lo), s0), _mm256_mul_ps(e4m3x8(hi), s1));
      sink(2 * r + 1, _mm256_mul_ps(e4m3x8(_mm_srli_si128(lo, 8)), s0),
           _mm256_mul_ps(e4m3x8(_mm_srli_si128(hi, 8)), s1));
    }
  }
}

// A sink that writes the tile k-major into dst ([32][16]).
inline auto store_to(float* dst) {
  return [dst](int k, __m256 w0, __m256 w1) {
    _mm256_store_ps(dst + 16 * k, w0);
    _mm256_store_ps(dst + 16 * k + 8, w1);
  };
}

struct Problem {
  const float* x;           // fp32 [rows, K]
  float* y;                 // fp32 [rows, N]
  const int64_t* offsets;   // [E + 1]
  const uint8_t* weight;    // [E, NB, KB, tile bytes]
  int64_t expert_weight_bytes;
  const uint8_t* scales;    // [E, NB, blocks, 16] of the format's scale type
  int64_t expert_scale_bytes;
  int64_t fmt, blocks, block_k, n, k;
};

// `count` inputs of R rows (x rows `ldx` apart) times the expanded weight b ([k][16]), added to the accumulators
// acc (R rows of 16 fp32, `ldc` apart, in memory between calls: stored and reloaded exactly). The accumulators are
// named variables, not an array: GCC keeps an array's elements in memory too and stores each after every product
// (a third of the speed).
#define DGEMMA_ROWS(F) F(0) F(1) F(2) F(3) F(4) F(5)
template <int R>
inline void multiply(const float* x, int64_t ldx, const float* b, int64_t count, float* acc, int64_t ldc = 16) {
  static_assert(R >= 1 && R <= BLOCK_ROWS);
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
#define DGEMMA_LOAD(r) \
  if constexpr (R > r) c##r##0 = _mm256_loadu_ps(acc + ldc * r), c##r##1 = _mm256_loadu_ps(acc + ldc * r + 8);
  DGEMMA_ROWS(DGEMMA_LOAD)
#pragma GCC unroll 4
  for (int64_t k = 0; k < count; ++k) {
    const __m256 b0 = _mm256_load_ps(b + 16 * k), b1 = _mm256_load_ps(b + 16 * k + 8);
#define DGEMMA_FMA(r)                                                 \
  if constexpr (R > r) {                                              \
    const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);            \
    c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0);                        \
    c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1);                        \
  }
    DGEMMA_ROWS(DGEMMA_FMA)
  }
#define DGEMMA_STORE(r) \
  if constexpr (R > r) _mm256_storeu_ps(acc + ldc * r, c##r##0), _mm256_storeu_ps(acc + ldc * r + 8, c##r##1);
  DGEMMA_ROWS(DGEMMA_STORE)
#undef DGEMMA_LOAD
#undef DGEMMA_FMA
#undef DGEMMA_STORE
}

// Rows row .. row + count of y, columns col .. col + 15, from the accumulators.
inline void store_rows(const Problem& p, int64_t row, int64_t count, int64_t col, const float* acc) {
  for (int64_t r = 0; r < count; ++r) {
    _mm256_storeu_ps(p.y + (row + r) * p.n + col, _mm256_loadu_ps(acc + 16 * r));
    _mm256_storeu_ps(p.y + (row + r) * p.n + col + 8, _mm256_loadu_ps(acc + 16 * r + 8));
  }
}

// A few rows (at most BLOCK_ROWS): each tile expanded into `tile` (L1) and used at once; one or two rows
// (left-to-right decoding) take each input's weights straight from the expansion, never stored. Either way every
// row's accumulator takes the same fused multiply-adds in the same order as on the strip path.
template <int64_t FMT, int R>
void few_rows(const Problem& p, const uint8_t* w, const uint8_t* s, int64_t nb, int64_t row, float* tile) {
  constexpr int64_t tb = FMT == FP8 ? 512 : 256;
  const int64_t kb_count = p.k / TILE_K;
  alignas(32) float acc[BLOCK_ROWS * TILE_N] = {};
  if constexpr (R <= 2) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00;
    const float* x0 = p.x + row * p.k;
    const float* x1 = R == 2 ? x0 + p.k : x0;
    for (int64_t kb = 0; kb < kb_count; ++kb) {
      const int64_t blk = kb * TILE_K / p.block_k;
      const float* a0 = x0 + kb * TILE_K;
      const float* a1 = x1 + kb * TILE_K;
      expand_tile<FMT>(w + (nb * kb_count + kb) * tb, s, (nb * p.blocks + blk) * 16, (nb * p.blocks + blk + 1) * 16,
                       [&](int k, __m256 w0, __m256 w1) {
                         const __m256 a = _mm256_broadcast_ss(a0 + k);
                         c00 = _mm256_fmadd_ps(a, w0, c00);
                         c01 = _mm256_fmadd_ps(a, w1, c01);
                         if constexpr (R == 2) {
                           const __m256 b = _mm256_broadcast_ss(a1 + k);
                           c10 = _mm256_fmadd_ps(b, w0, c10);
                           c11 = _mm256_fmadd_ps(b, w1, c11);
                         }
                       });
    }
    _mm256_store_ps(acc, c00);
    _mm256_store_ps(acc + 8, c01);
    _mm256_store_ps(acc + 16, c10);
    _mm256_store_ps(acc + 24, c11);
  } else {
    for (int64_t kb = 0; kb < kb_count; ++kb) {
      const int64_t blk = kb * TILE_K / p.block_k;
      expand_tile<FMT>(w + (nb * kb_count + kb) * tb, s, (nb * p.blocks + blk) * 16, (nb * p.blocks + blk + 1) * 16,
                       store_to(tile));
      multiply<R>(p.x + row * p.k + kb * TILE_K, p.k, tile, TILE_K, acc);
    }
  }
  store_rows(p, row, R, nb * TILE_N, acc);
}

template <int64_t FMT>
void few(const Problem& p, const uint8_t* w, const uint8_t* s, int64_t nb, int64_t row, int64_t count, float* tile) {
  switch (count) {
    case 1: few_rows<FMT, 1>(p, w, s, nb, row, tile); break;
    case 2: few_rows<FMT, 2>(p, w, s, nb, row, tile); break;
    case 3: few_rows<FMT, 3>(p, w, s, nb, row, tile); break;
    case 4: few_rows<FMT, 4>(p, w, s, nb, row, tile); break;
    case 5: few_rows<FMT, 5>(p, w, s, nb, row, tile); break;
    default: few_rows<FMT, 6>(p, w, s, nb, row, tile); break;
  }
}

// `count` (<= BLOCK_ROWS) rows of x times b, into the accumulators acc (rows `ldc` apart).
void multiply_rows(int64_t count, const float* x, int64_t ldx, const float* b, int64_t k, float* acc, int64_t ldc) {
  switch (count) {
    case 1: multiply<1>(x, ldx, b, k, acc, ldc); break;
    case 2: multiply<2>(x, ldx, b, k, acc, ldc); break;
    case 3: multiply<3>(x, ldx, b, k, acc, ldc); break;
    case 4: multiply<4>(x, ldx, b, k, acc, ldc); break;
    case 5: multiply<5>(x, ldx, b, k, acc, ldc); break;
    default: multiply<6>(x, ldx, b, k, acc, ldc); break;
  }
}

// One work item: expert e's rows times its strip nb.
template <int64_t FMT>
void run_item(const Problem& p, int64_t e, int64_t nb, float* strip) {
  constexpr int64_t tb = FMT == FP8 ? 512 : 256;
  const uint8_t* w = p.weight + e * p.expert_weight_bytes;
  const uint8_t* s = p.scales + e * p.expert_scale_bytes;
  const int64_t first = p.offsets[e], count = p.offsets[e + 1] - first;
  if (count <= BLOCK_ROWS) {
    few<FMT>(p, w, s, nb, first, count, strip);
    return;
  }
  const int64_t kb_count = p.k / TILE_K;
  for (int64_t kb = 0; kb < kb_count; ++kb) {
    const int64_t blk = kb * TILE_K / p.block_k;
    expand_tile<FMT>(w + (nb * kb_count + kb) * tb, s, (nb * p.blocks + blk) * 16, (nb * p.blocks + blk + 1) * 16,
                     store_to(strip + kb * TILE_K * TILE_N));
  }
  for (int64_t row = first; row < first + count; row += BLOCK_ROWS) {  // the whole strip, a block of rows at a time
    const int64_t rows = std::min<int64_t>(BLOCK_ROWS, first + count - row);
    alignas(32) float acc[BLOCK_ROWS * TILE_N] = {};
    multiply_rows(rows, p.x + row * p.k, p.k, strip, p.k, acc, TILE_N);
    store_rows(p, row, rows, nb * TILE_N, acc);
  }
}

}  // namespace

// y fp32 [rows, N] = x @ W_e.T for each expert e's rows (rows sorted by expert, offsets [E + 1], rows = offsets[E]).
torch::Tensor woq_grouped_f32(torch::Tensor x, torch::Tensor offsets, torch::Tensor weight, torch::Tensor scales,
                              int64_t fmt, int64_t n, int64_t k, int64_t block_k) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2 && x.size(1) == k,
              "x: contiguous fp32 [rows, K]");
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.is_contiguous() && offsets.dim() == 1 &&
              offsets.size(0) >= 2, "offsets: int64 [E + 1]");
  TORCH_CHECK(weight.scalar_type() == torch::kUInt8 && weight.is_contiguous() && scales.is_contiguous(),
              "weight: contiguous uint8 tiles; scales contiguous");
  TORCH_CHECK(fmt == INT4 || fmt == NVFP4 || fmt == FP8, "format: 0 (int4), 1 (NVFP4) or 2 (FP8)");
  TORCH_CHECK(n % TILE_N == 0 && k % TILE_K == 0 && block_k % 16 == 0 && k % block_k == 0,
              "N % 16, K % 32, block % 16 and K % block must be 0");
  const int64_t experts = offsets.size(0) - 1;
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0, "offsets must start at 0");
  for (int64_t e = 0; e < experts; ++e) TORCH_CHECK(off[e + 1] >= off[e], "offsets must not decrease");
  TORCH_CHECK(off[experts] <= x.size(0), "offsets ask for ", off[experts], " rows, x has ", x.size(0));
  const int64_t tile_bytes = fmt == FP8 ? 512 : 256;
  TORCH_CHECK(weight.numel() == experts * (n / TILE_N) * (k / TILE_K) * tile_bytes,
              "weight: ", weight.numel(), " bytes, the tiles of ", experts, " x [", n, ", ", k, "] need ",
              experts * (n / TILE_N) * (k / TILE_K) * tile_bytes);
  const int64_t blocks = k / block_k;
  const int64_t scale_bytes = fmt == INT4 ? 2 : fmt == NVFP4 ? 1 : 4;
  TORCH_CHECK(scales.numel() * scales.element_size() == experts * (n / TILE_N) * blocks * 16 * scale_bytes,
              "scales: ", scales.numel() * scales.element_size(), " bytes, expected ",
              experts * (n / TILE_N) * blocks * 16 * scale_bytes);
  const int64_t rows = off[experts];
  auto y = torch::empty({rows, n}, x.options());
  Problem p{x.data_ptr<float>(), y.data_ptr<float>(), off, weight.data_ptr<uint8_t>(), weight.numel() / experts,
            static_cast<const uint8_t*>(scales.data_ptr()), scales.numel() * scales.element_size() / experts,
            fmt, blocks, block_k, n, k};
  std::vector<int64_t> active;
  for (int64_t e = 0; e < experts; ++e)
    if (off[e + 1] > off[e]) active.push_back(e);
  const int64_t strips = n / TILE_N;
  const int64_t items = int64_t(active.size()) * strips;
  // items claimed from a shared counter in runs of consecutive items (one stretch of codes in memory): experts'
  // row counts differ, so a static split would leave a thread idle
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(items, 1));
  const int64_t run = std::clamp<int64_t>(items / (workers * 8), 1, 16);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> storage(k * TILE_N + 8);  // the expanded strip, 32-byte aligned
    float* strip = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 31) & ~uintptr_t(31));
    for (int64_t first = next.fetch_add(run); first < items; first = next.fetch_add(run))
      for (int64_t i = first; i < std::min(items, first + run); ++i) {
        const int64_t e = active[i / strips], nb = i % strips;
        if (fmt == INT4) run_item<INT4>(p, e, nb, strip);
        else if (fmt == NVFP4) run_item<NVFP4>(p, e, nb, strip);
        else run_item<FP8>(p, e, nb, strip);
      }
  });
  return y;
}

// -- a plain bf16 matrix (the tied embedding table) times fp32 activations -------------------------------------------
// y fp32 [M, N] = a fp32 [M, K] @ B, B[k][n] = t[k, n] (t bf16 [K, N]: the self-conditioning product, probabilities
// times the table) or, with `trans`, t[n, k] (t bf16 [N, K]: the LM head). The table is read in place, once per call
// (at full size 1.5 GB: converting it to fp32 first would write and read 3 GB more). Work items are groups of
// DENSE_NC output columns (the last may be narrower); each walks K in chunks of DENSE_KC inputs, expands the chunk's
// B into fp32 (k-major, 16 columns per strip, a transpose where `trans`) and adds it into every row's accumulators,
// kept in a per-item buffer over the whole K: the same fused multiply-add per input in ascending order as the
// low-bit kernel, so each row's result is the same whatever the other rows. One or two rows with `trans` (the LM
// head of left-to-right decoding, bound by reading the table) skip the buffer: the same sums straight from the
// transposes, 1.35x the buffered path's speed on the AVX2 EPYC.
namespace {
constexpr int64_t DENSE_NC = 128;  // output columns per work item (8 strips of 16)
constexpr int64_t DENSE_KC = 256;  // inputs per chunk: the chunk's expanded B is 128 KB (L2)

// 8 bf16 rows (each `ld` elements apart, 8 inputs each) -> out[i]: input i of those 8 rows as fp32 (an 8 x 8
// transpose). The 16-bit values are transposed first (two unpack rounds, rows j and j + 4 sharing a register), then
// widened by unpacking with zeros: a bf16 is the top half of its fp32.
inline void transpose8(const uint16_t* t, int64_t ld, __m256 out[8]) {
  auto rows = [&](int j) {
    return _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + j * ld))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(t + (j + 4) * ld)), 1);
  };
  const __m256i a = rows(0), b = rows(1), c = rows(2), d = rows(3);
  const __m256i ab0 = _mm256_unpacklo_epi16(a, b), ab1 = _mm256_unpackhi_epi16(a, b);
  const __m256i cd0 = _mm256_unpacklo_epi16(c, d), cd1 = _mm256_unpackhi_epi16(c, d);
  // each lane: rows 0-3 (low) or 4-7 (high) of inputs 2i and 2i + 1
  const __m256i pairs[4] = {_mm256_unpacklo_epi32(ab0, cd0), _mm256_unpackhi_epi32(ab0, cd0),
                            _mm256_unpacklo_epi32(ab1, cd1), _mm256_unpackhi_epi32(ab1, cd1)};
  const __m256i zero = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, pairs[i]));
    out[2 * i + 1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, pairs[i]));
  }
}

// One or two rows times a transposed table (the LM head while decoding left to right): each 32 table rows' inputs
// transposed 8 at a time and multiplied at once, nothing stored, the rows read front to back. Per column the same
// fused multiply-adds in the same order as the buffered path, from zero.
template <int R>
void dense_trans_few(const float* A, const uint16_t* T, float* Y, int64_t n, int64_t k) {
  constexpr int64_t WIDTH = 32;  // columns per item: four 8-column groups, four (R = 1) or eight chains of FMAs
  const int64_t items = (n + WIDTH - 1) / WIDTH;
  at::parallel_for(0, items, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t col = item * WIDTH;
      const int groups = static_cast<int>(std::min<int64_t>(WIDTH, n - col) / 8);
      const uint16_t* rows = T + col * k;
      __m256 c[R][4];
      for (int r = 0; r < R; ++r)
        for (int g = 0; g < 4; ++g) c[r][g] = _mm256_setzero_ps();
      for (int64_t k0 = 0; k0 < k; k0 += 8) {
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) {  // unrolled: the accumulators stay in registers
          if (g >= groups) break;
          __m256 w[8];
          transpose8(rows + 8 * g * k + k0, k, w);
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i)
#pragma GCC unroll 2
            for (int r = 0; r < R; ++r)
              c[r][g] = _mm256_fmadd_ps(_mm256_broadcast_ss(A + r * k + k0 + i), w[i], c[r][g]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int g = 0; g < groups; ++g) _mm256_storeu_ps(Y + r * n + col + 8 * g, c[r][g]);
    }
  });
}

// B's inputs k0 .. k0 + kc for columns n0 .. n0 + 16 * strips into buf ([strip][kc][16]).
void expand_dense(const uint16_t* t, bool trans, int64_t n_total, int64_t k_total, int64_t n0, int64_t strips,
                  int64_t k0, int64_t kc, float* buf) {
  for (int64_t s = 0; s < strips; ++s) {
    float* dst = buf + s * kc * TILE_N;
    const int64_t col = n0 + s * TILE_N;
    if (trans) {  // t [N, K]: rows col .. col + 15, inputs k0 .. k0 + kc
      for (int64_t k = 0; k < kc; k += 8) {
        for (int half = 0; half < 2; ++half) {
          __m256 w[8];
          transpose8(t + (col + 8 * half) * k_total + k0 + k, k_total, w);
          for (int i = 0; i < 8; ++i) _mm256_store_ps(dst + (k + i) * TILE_N + 8 * half, w[i]);
        }
      }
    } else {  // t [K, N]: row k, columns col .. col + 15
      for (int64_t k = 0; k < kc; ++k) {
        const uint16_t* src = t + (k0 + k) * n_total + col;
        _mm256_store_ps(dst + k * TILE_N, bf16x8(src));
        _mm256_store_ps(dst + k * TILE_N + 8, bf16x8(src + 8));
      }
    }
  }
}
}  // namespace

torch::Tensor dense_bf16_f32(torch::Tensor a, torch::Tensor t, bool trans) {
  TORCH_CHECK(a.scalar_type() == torch::kFloat32 && a.is_contiguous() && a.dim() == 2, "a: contiguous fp32 [M, K]");
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16 && t.is_contiguous() && t.dim() == 2, "t: contiguous bf16 matrix");
  const int64_t m = a.size(0), k = a.size(1), n = trans ? t.size(0) : t.size(1);
  const int64_t t_inputs = trans ? t.size(1) : t.size(0);
  TORCH_CHECK(t_inputs == k, "a has ", k, " inputs, the table ", t_inputs);
  TORCH_CHECK(n % TILE_N == 0 && k % 8 == 0, "N % 16 and K % 8 must be 0");
  auto y = torch::empty({m, n}, a.options());
  const float* A = a.data_ptr<float>();
  const uint16_t* T = reinterpret_cast<const uint16_t*>(t.data_ptr());
  float* Y = y.data_ptr<float>();
  if (trans && (m == 1 || m == 2)) {
    if (m == 1) dense_trans_few<1>(A, T, Y, n, k);
    else dense_trans_few<2>(A, T, Y, n, k);
    return y;
  }
  const int64_t items = (n + DENSE_NC - 1) / DENSE_NC;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> b_store(DENSE_KC * DENSE_NC + 8), c_store(m * DENSE_NC + 8);
    float* buf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(b_store.data()) + 31) & ~uintptr_t(31));
    float* c = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(c_store.data()) + 31) & ~uintptr_t(31));
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t n0 = item * DENSE_NC, strips = std::min(DENSE_NC, n - n0) / TILE_N;
      std::fill(c, c + m * DENSE_NC, 0.0f);
      for (int64_t k0 = 0; k0 < k; k0 += DENSE_KC) {
        const int64_t kc = std::min(DENSE_KC, k - k0);
        expand_dense(T, trans, n, k, n0, strips, k0, kc, buf);
        for (int64_t row = 0; row < m; row += BLOCK_ROWS) {
          const int64_t count = std::min<int64_t>(BLOCK_ROWS, m - row);
          for (int64_t s = 0; s < strips; ++s)
            multiply_rows(count, A + row * k + k0, k, buf + s * kc * TILE_N, kc, c + row * DENSE_NC + s * TILE_N,
                          DENSE_NC);
        }
      }
      for (int64_t row = 0; row < m; ++row)
        std::copy(c + row * DENSE_NC, c + row * DENSE_NC + strips * TILE_N, Y + row * n + n0);
    }
  });
  return y;
}

// csrc/repack.cpp
torch::Tensor tile_codes(torch::Tensor packed, int64_t bits);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tile_codes", &tile_codes, "repack 4- or 8-bit codes into the kernel's tile layout");
  m.def("woq_grouped_f32", &woq_grouped_f32, "grouped weight-only low-bit GEMM, fp32 activations (AVX2)");
  m.def("dense_bf16_f32", &dense_bf16_f32, "fp32 activations times a bf16 matrix read in place (AVX2)");
}
