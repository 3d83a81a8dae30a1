// The denoising sampler's per-position work at a large vocabulary, fused: the scaled-logit lookup (softcap and
// temperature of every 16-bit head output, precomputed by dgemma/sampler.py), max and argmax, softmax, entropy,
// the self-conditioning probabilities and the inverse-CDF draw, in four passes over one position's V values kept
// in a per-thread buffer (in L2), positions spread over torch's threads. AVX-512 only; built into the native
// extension (dgemma/quant/native.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "bf16.h"
#include "vmath.h"

namespace {

struct Position {
  int64_t sampled, argmax;
  float entropy;
};

// One position: codes [V] (16-bit head outputs), table [65536] fp32 scaled logits indexed by code + 32768.
// probs (bf16 or fp32, or null) receives the softmax. x: [V] fp32 scratch, blocks: [V / 16] double scratch.
template <typename Out>
Position one_position(const int16_t* codes, const float* table, int64_t v, double u, Out* probs, float* x,
                      double* blocks) {
  // 1: scaled logits, max and the first index that holds it
  __m512 best = _mm512_set1_ps(-INFINITY);
  __m512i where = _mm512_set1_epi32(0);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t i = 0; i < v; i += 16) {
    const __m512i idx = _mm512_add_epi32(
        _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i))),
        _mm512_set1_epi32(32768));
    const __m512 val = _mm512_i32gather_ps(idx, table, 4);
    _mm512_storeu_ps(x + i, val);
    const __mmask16 up = _mm512_cmp_ps_mask(val, best, _CMP_GT_OQ);  // strictly greater: the first one stays
    best = _mm512_mask_mov_ps(best, up, val);
    where = _mm512_mask_mov_epi32(where, up, _mm512_add_epi32(lane, _mm512_set1_epi32(int32_t(i))));
  }
  const float m = _mm512_reduce_max_ps(best);
  const __mmask16 at_max = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ);
  int64_t argmax = _mm512_mask_reduce_min_epi32(at_max, where);
  if (at_max == 0) argmax = 0;  // all NaN
  // 2: e = exp(x - m), z = sum e, s = sum e (x - m)
  __m512 z = _mm512_setzero_ps(), s = _mm512_setzero_ps();
  const __m512 mv = _mm512_set1_ps(m);
  for (int64_t i = 0; i < v; i += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), mv);
    const __m512 e = exp_nonpositive(d);
    z = _mm512_add_ps(z, e);
    s = _mm512_add_ps(s, _mm512_mul_ps(e, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_NEQ_OQ), d)));
    _mm512_storeu_ps(x + i, e);
  }
  const float zs = _mm512_reduce_add_ps(z);
  const float entropy = std::log(zs) - _mm512_reduce_add_ps(s) / zs;
  // 3: p = e / z (to probs), and each block of 16's sum in double (a fixed order)
  const __m512 zv = _mm512_set1_ps(zs);
  double total = 0;
  for (int64_t i = 0; i < v; i += 16) {
    const __m512 p = _mm512_div_ps(_mm512_loadu_ps(x + i), zv);
    _mm512_storeu_ps(x + i, p);
    if constexpr (std::is_same_v<Out, float>) {
      if (probs) _mm512_storeu_ps(probs + i, p);
    } else {
      if (probs) bf16_store(probs + i, p);
    }
    const double b = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(p)),
                                                         _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(p), 1)))));
    blocks[i / 16] = b;
    total += b;
  }
  // 4: the first index whose running sum (blocks in order, then within the block in order) exceeds u x total,
  // kept strictly below the total so the draw never lands past the last token with mass
  const float total_f = float(total);
  const float target = std::min(float(u) * total_f, std::nextafter(total_f, 0.0f));
  double run = 0;
  int64_t block = 0;
  const int64_t nblocks = v / 16;
  while (block < nblocks - 1 && !(float(run + blocks[block]) > target)) run += blocks[block++];
  int64_t sampled = block * 16 + 15;
  for (int j = 0; j < 16; ++j) {
    run += x[block * 16 + j];
    if (float(run) > target) {
      sampled = block * 16 + j;
      break;
    }
  }
  return {sampled, argmax, entropy};
}

}  // namespace

// raw: int16 view of bf16 / fp16 head outputs [B, C, V], positions evenly spaced (the native LM head pads its rows);
// table fp32 [65536]; uniforms fp64 [B, C]; rows bool [B];
// probs: [B, C, V] bf16 or fp32 (or an empty tensor: not written). Returns (sampled, argmax, entropy) [B, C], zeros
// for rows not processed.
std::vector<torch::Tensor> fused_sample(torch::Tensor raw, torch::Tensor table, torch::Tensor uniforms,
                                        torch::Tensor rows, torch::Tensor probs) {
  TORCH_CHECK(raw.scalar_type() == torch::kInt16 && raw.dim() == 3 && raw.stride(2) == 1 &&
              raw.stride(0) == raw.size(1) * raw.stride(1) && raw.stride(1) >= raw.size(2),
              "raw: int16 [B, C, V], positions evenly spaced");
  TORCH_CHECK(table.scalar_type() == torch::kFloat32 && table.numel() == 65536 && table.is_contiguous(), "table");
  TORCH_CHECK(uniforms.scalar_type() == torch::kFloat64 && uniforms.is_contiguous(), "uniforms: fp64 [B, C]");
  TORCH_CHECK(rows.scalar_type() == torch::kBool && rows.numel() == raw.size(0), "rows: bool [B]");
  const int64_t b = raw.size(0), c = raw.size(1), v = raw.size(2), ld = raw.stride(1);
  TORCH_CHECK(v % 16 == 0, "V % 16 must be 0");
  const bool write = probs.numel() > 0;
  TORCH_CHECK(!write || (probs.sizes() == raw.sizes() && probs.is_contiguous() &&
                         (probs.scalar_type() == torch::kBFloat16 || probs.scalar_type() == torch::kFloat32)),
              "probs: contiguous bf16 or fp32 [B, C, V]");
  auto sampled = torch::zeros({b, c}, torch::kInt64), argmax = torch::zeros({b, c}, torch::kInt64);
  auto ent = torch::zeros({b, c}, torch::kFloat32);
  std::vector<int64_t> work;
  const bool* live = rows.data_ptr<bool>();
  for (int64_t r = 0; r < b; ++r)
    if (live[r])
      for (int64_t p = 0; p < c; ++p) work.push_back(r * c + p);
  const int16_t* codes = raw.data_ptr<int16_t>();
  const float* tab = table.data_ptr<float>();
  const double* us = uniforms.data_ptr<double>();
  int64_t* so = sampled.data_ptr<int64_t>();
  int64_t* ao = argmax.data_ptr<int64_t>();
  float* eo = ent.data_ptr<float>();
  const bool bf16 = write && probs.scalar_type() == torch::kBFloat16;
  uint16_t* pb = bf16 ? reinterpret_cast<uint16_t*>(probs.data_ptr()) : nullptr;
  float* pf = write && !bf16 ? probs.data_ptr<float>() : nullptr;
  at::parallel_for(0, int64_t(work.size()), 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> x(v);
    std::vector<double> blocks(v / 16);
    for (int64_t w = lo; w < hi; ++w) {
      const int64_t at = work[w];
      const Position pos = bf16 || !write
          ? one_position<uint16_t>(codes + at * ld, tab, v, us[at], pb ? pb + at * v : nullptr, x.data(), blocks.data())
          : one_position<float>(codes + at * ld, tab, v, us[at], pf + at * v, x.data(), blocks.data());
      so[at] = pos.sampled;
      ao[at] = pos.argmax;
      eo[at] = pos.entropy;
    }
  });
  return {sampled, argmax, ent};
}
