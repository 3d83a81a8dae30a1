// The AVX-512 BF16 engine (woq_avx512.cpp): what woq.cpp runs on CPUs with vdpbf16ps but no AMX (AMD Zen 4 and
// later, Intel Cooper Lake), on the same tile layout.
#pragma once
#include "tiles.h"

namespace woq {

// One work item: the rows of `expert` times its columns 32 strip .. 32 strip + 32. buf: 64-byte aligned room for
// the strip's expanded tiles (K / 32 x 1024 bf16).
void avx512_item(const Problem& p, int64_t expert, int64_t strip, uint16_t* buf);

// Columns n0 .. n1 (multiples of 64) of O fp32 [M, N] = P bf16 [M, K] @ E bf16 [K, N], K % 256 == 0.
void avx512_table_columns(const uint16_t* P, const uint16_t* E, float* O, int64_t M, int64_t K, int64_t N,
                          int64_t n0, int64_t n1);

}  // namespace woq
