// Shared-basis / multi-LoRA decode backend for CUDA (raw pointers + explicit stream).
//
// Contract (lolakernels/reference/shared_basis_lora.py). For every token t whose adapter
// a = ids[t] lies in [0, num_adapters) and whose cluster c = basis_of[a] lies in
// [0, num_clusters), with s = scale * adapter_scale[a] (adapter_scale optional) and
// r_a = clamp(ranks[a], 0, R) (ranks optional, else R):
//
//     h = lora_a[c] @ x[t]              h: [R] fp32, h[k] = 0 for k >= r_a
//     g = s * sigma_a(h)                g: [R] fp32, g[j] = 0 for j >= r_a
//         sigma_a(h) = h | sigma[a] * h | sigma[a] @ h     (None | Diagonal | Full)
//     out[t, out_offset : out_offset + d_out] += lora_b[c] @ g   (fp32 add, one rounding)
//
// Shapes (elements, not bytes): x [T, d_in] with row stride x_row_stride (unit column
// stride), out [T, *] with row stride out_row_stride (unit column stride),
// lora_a [C, R, d_in], lora_b [C, d_out, R], sigma [N, R] or [N, R, R] (all contiguous,
// same dtype as x and out), ids [T] int32, basis_of [N] int32, adapter_scale [N] fp32,
// ranks [N] int32. Rows of out whose token is skipped (ids[t] == -1, or any id out of
// range) are never read nor written.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace lola::cuda {

enum class SigmaKind : int { None = 0, Diagonal = 1, Full = 2 };
enum class DType : int { Float16 = 0, BFloat16 = 1 };

// Returns cudaSuccess or the launch error (cudaErrorInvalidValue for inconsistent
// arguments). Tokens whose id is out of [0, num_adapters) are skipped (never read out of
// bounds); so are adapters whose cluster is out of [0, num_clusters).
// Asynchronous with respect to the host: everything is enqueued on `stream`.
cudaError_t shared_basis_lora_decode(
    void* out, int64_t out_row_stride, int64_t out_offset,
    const void* x, int64_t x_row_stride,
    const void* lora_a, const void* lora_b,          // [C, R, d_in], [C, d_out, R] contiguous
    const void* sigma, SigmaKind sigma_kind,          // nullptr when None; [N, R] or [N, R, R] contiguous
    const int32_t* ids, const int32_t* basis_of,      // [T], [N]
    float scale, const float* adapter_scale,          // adapter_scale may be nullptr
    const int32_t* ranks,                             // may be nullptr
    float* workspace,                                 // at least num_tokens * rank floats, device memory
    int64_t num_tokens, int64_t d_in, int64_t d_out, int64_t rank,
    int64_t num_adapters, int64_t num_clusters,
    DType dtype, cudaStream_t stream);

// the largest num_tokens the decode kernels are tuned for
constexpr int64_t kDecodeMaxTokens = 64;

// The largest rank accepted (the expand kernel keeps 2 * rank fp32 values in dynamic
// shared memory and stays under the 48 KiB that needs no opt-in).
constexpr int64_t kMaxRank = 4096;

}  // namespace lola::cuda
