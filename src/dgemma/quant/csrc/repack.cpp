// The tile layout's repack (shared by both builds of the kernel: woq.cpp's AVX-512 module and woq_avx2.cpp's): plain
// C++, no vector instructions, so it runs on any x86-64 CPU.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

namespace {
constexpr int64_t TILE_K = 32, TILE_N = 16, GROUP_BYTES = 64;  // as tiles.h
}  // namespace

// The tile layout (what dgemma/quant/native.py's tile_nibbles / _tile_order build with torch ops, here in one pass
// at load). packed: uint8 [E, N, K / 2] (4-bit, element 2k in the low nibble) or [E, N, K] (8-bit codes).
// 4-bit tiles: [E, NB, KB, 4 groups, 64 bytes] (see GROUP_BYTES); 8-bit: [E, NB, KB, 16 rows, 32 bytes].
torch::Tensor tile_codes(torch::Tensor packed, int64_t bits) {
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 3 && packed.is_contiguous(),
              "packed: contiguous uint8 [E, N, K/2] or [E, N, K]");
  const int64_t experts = packed.size(0), n = packed.size(1), k = packed.size(2) * (bits == 4 ? 2 : 1);
  TORCH_CHECK(n % TILE_N == 0 && k % TILE_K == 0, "N % 16 and K % 32 must be 0");
  const int64_t nb_count = n / TILE_N, kb_count = k / TILE_K;
  auto out = bits == 4 ? torch::empty({experts, nb_count, kb_count, 4, GROUP_BYTES}, packed.options())
                       : torch::empty({experts, nb_count, kb_count, 16, 32}, packed.options());
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t in_row = packed.size(2);
  at::parallel_for(0, experts * nb_count, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t e = i / nb_count, nb = i % nb_count;
      const uint8_t* w = src + e * n * in_row;
      uint8_t* o = dst + i * kb_count * 256 * (bits == 4 ? 1 : 2);
      // VNNI element el of row r of tile kb: column 16 nb + el / 2, input 32 kb + 2 r + el % 2
      auto code = [&](int64_t kb, int r, int el) -> uint8_t {
        const int64_t col = nb * TILE_N + el / 2, kk = kb * TILE_K + 2 * r + el % 2;
        return bits == 8 ? w[col * in_row + kk] : (w[col * in_row + kk / 2] >> (4 * (kk % 2))) & 0xF;
      };
      for (int64_t kb = 0; kb < kb_count; ++kb) {
        if (bits == 8) {
          for (int r = 0; r < 16; ++r)
            for (int el = 0; el < 32; ++el) *o++ = code(kb, r, el);
        } else {  // word el of group g: rows 4g .. 4g + 3 in nibbles 0-3 (little-endian: two bytes)
          for (int g = 0; g < 4; ++g)
            for (int el = 0; el < 32; ++el) {
              *o++ = code(kb, 4 * g, el) | code(kb, 4 * g + 1, el) << 4;
              *o++ = code(kb, 4 * g + 2, el) | code(kb, 4 * g + 3, el) << 4;
            }
        }
      }
    }
  });
  return out;
}

