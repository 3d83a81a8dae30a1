// A layer's per-row elementwise work, fused: the RMS norm and the gated GELU-tanh activation, bf16 in and out,
// rows spread over torch's threads. Each is one pass over a row held in registers and L1, where torch's eager
// composition (dgemma/numerics.py) makes six to eight passes over fp32 copies of the whole tensor. The roundings are
// torch's, step by step; what differs is the order of the norm's sum of squares and the tanh (see each function).
// AVX-512 only; built into the native extension (dgemma/quant/native.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "bf16.h"
#include "vmath.h"

namespace {

inline __mmask16 lanes(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

inline const uint16_t* bf16_data(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr());
}

// tanh(z) = sign(z) (1 - d) with d = 2e / (1 + e), e = exp(-2 |z|) (the exponent never positive): d has full
// relative precision, so 1 - d is tanh rounded once to fp32 (within an ulp), and the caller then adds 1 as torch's
// composition does: near tanh = -1 (GELU's left tail) 1 + tanh keeps torch's grid of 2^-24 steps, and is exactly 0
// where torch's is.
inline __m512 tanh_ps(__m512 z) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = exp_nonpositive(_mm512_mul_ps(_mm512_set1_ps(-2.0f), _mm512_abs_ps(z)));
  const __m512 t = _mm512_sub_ps(one, _mm512_div_ps(_mm512_add_ps(e, e), _mm512_add_ps(one, e)));
  const __mmask16 below = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_sub_ps(t, below, _mm512_setzero_ps(), t);
}

}  // namespace

// y = x * (mean(x^2) + eps)^-0.5, then * weight when given, per row of x [R, D] (bf16, rows contiguous): as
// dgemma.numerics.rms_norm computes it (squares rounded to fp32 and summed, the mean a division by D, the power a
// division by a square root, x * r rounded, then * weight rounded, then bf16), except that the sum runs in this
// kernel's order (16 lanes, then across them), so the statistic can differ from torch's in its last bits.
// weight: fp32 [D] or an empty tensor.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.dim() == 2 && x.stride(1) == 1, "x: bf16 [R, D] rows");
  const int64_t rows = x.size(0), d = x.size(1), ldx = x.stride(0);
  const bool scaled = weight.numel() > 0;
  TORCH_CHECK(!scaled || (weight.scalar_type() == torch::kFloat32 && weight.is_contiguous() && weight.numel() == d),
              "weight: fp32 [D]");
  auto y = torch::empty({rows, d}, x.options());
  const uint16_t* xp = bf16_data(x);
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const float* w = scaled ? weight.data_ptr<float>() : nullptr;
  const float epsf = float(eps), df = float(d);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const uint16_t* src = xp + r * ldx;
      uint16_t* dst = yp + r * d;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < d; i += 16) {
        const __m512 v = bf16_load(src + i, lanes(d - i));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
      }
      const float mean = _mm512_reduce_add_ps(acc) / df;
      const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(mean + epsf));
      for (int64_t i = 0; i < d; i += 16) {
        const __mmask16 m = lanes(d - i);
        __m512 v = _mm512_mul_ps(bf16_load(src + i, m), inv);
        if (scaled) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + i));
        bf16_store(dst + i, v, m);
      }
    }
  });
  return y;
}

// out [R, I] = gelu_tanh(gate) * up, gate, up and out bf16 [R, I] with rows of any stride (the two halves of a
// fused gate/up product read in place, the result into a caller's padded buffer): the GELU in fp32 as torch writes
// it, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), rounded to bf16, times up rounded to bf16: the two roundings
// of gelu_tanh(gate) * up. The tanh is this kernel's
// (a few fp32 ulps from torch's), so a result can differ from torch's in its last bf16 bit where the fp32 GELU
// lies within those ulps of a rounding boundary.
void gelu_mul(torch::Tensor gate, torch::Tensor up, torch::Tensor out) {
  TORCH_CHECK(gate.scalar_type() == torch::kBFloat16 && up.scalar_type() == torch::kBFloat16, "gate, up: bf16");
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes() && gate.stride(1) == 1 && up.stride(1) == 1,
              "gate, up: [R, I] with contiguous rows");
  TORCH_CHECK(out.scalar_type() == torch::kBFloat16 && out.sizes() == gate.sizes() && out.stride(1) == 1,
              "out: bf16 [R, I] with contiguous rows");
  const int64_t rows = gate.size(0), n = gate.size(1);
  const uint16_t *gp = bf16_data(gate), *upp = bf16_data(up);
  const int64_t ldg = gate.stride(0), ldu = up.stride(0), ldo = out.stride(0);
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const __m512 beta = _mm512_set1_ps(float(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa = _mm512_set1_ps(0.044715f),
               half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = lanes(n - i);
        const __m512 x = bf16_load(gp + r * ldg + i, m);
        const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
        const __m512 inner = _mm512_mul_ps(beta, _mm512_add_ps(x, _mm512_mul_ps(kappa, cube)));
        const __m512 g = bf16_round(_mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, tanh_ps(inner))));
        bf16_store(op + r * ldo + i, _mm512_mul_ps(g, bf16_load(upp + r * ldu + i, m)), m);
      }
  });
}
