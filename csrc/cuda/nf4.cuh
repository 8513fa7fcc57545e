// nf4 (QLoRA) decode GEMV for CUDA on raw pointers + an explicit stream.
//
// Contract (lolakernels/reference/nf4.py). For x [M, K] in T (float16 / bfloat16, M <= kNf4GemvMaxTokens),
// an nf4 weight W [N, K] in bitsandbytes' storage (csrc/common/nf4.h), h = x · lora_aᵀ [M, r] fp32
// (computed by the caller, once), lora_b [N, r] fp32:
//
//     acc[m, n] = Σ_k float(x[m, k]) · float(T(W[n, k]))                  fp32 sums
//     base      = T(acc + float(bias[n]))                                 one rounding
//     t         = Σ_r h[m, r] · lora_b[n, r]                              fp32
//     LoRA:  out[m, n] = T(base + T(t · scale))
//     DoRA:  out[m, n] = T(base + ((s[n] − 1) · T(base − bias[n]) + (s[n] · t) · scale))
//
// (bias, lora and DoRA's s optional; with no bias the DoRA base is `base`.) Shapes in elements:
// x row stride x_row_stride, out [M, N] with row stride out_row_stride, bias [N] in T, h [M, r]
// and lora_b [N, r] contiguous fp32, dora_scale [N] fp32.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../common/nf4.h"
#include "shared_basis_lora.cuh"

namespace lola::cuda {

// The largest token count the GEMV serves (one fp32 accumulator per token and lane).
constexpr int64_t kNf4GemvMaxTokens = 16;

// Returns cudaSuccess, the launch error, or cudaErrorInvalidValue for inconsistent arguments
// (num_tokens outside [1, kNf4GemvMaxTokens], a blocksize that is not a power of two >= 2, ...).
// Asynchronous with respect to the host: everything is enqueued on `stream`.
cudaError_t nf4_gemv(
    void* out, int64_t out_row_stride,
    const void* x, int64_t x_row_stride,
    const Nf4Storage& weight, int64_t n, int64_t k,
    const void* bias,                                   // [n] in dtype, or nullptr
    const float* lora_h, const float* lora_b, int64_t rank, float scale,   // nullptr / 0 without LoRA
    const float* dora_scale,                            // [n] fp32, or nullptr (plain LoRA)
    int64_t num_tokens, DType dtype, cudaStream_t stream);

}  // namespace lola::cuda
