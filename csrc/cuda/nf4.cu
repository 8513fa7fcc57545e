// nf4 decode GEMV (CUDA, fp16 / bf16 activations, fp32 math). Contract: nf4.cuh.
//
// Design (decode: memory bound on the 0.5 byte per weight of the packed matrix, docs/design.md §7):
//
//   grid ceil(N / kRowsPerBlock), kRowsPerBlock warps per block; warp w owns output row
//   n = blockIdx.x * kRowsPerBlock + w for all M tokens, so every packed byte is read exactly once.
//
//   Fast path (K % 32 == 0, 16-byte aligned x rows): lane l streams 16-byte chunks l, l + 32, ...
//   of the row's K / 2 packed bytes with one 128-bit load each (a warp load instruction reads 512
//   contiguous bytes). A chunk is 32 consecutive elements starting at a flat index that is a
//   multiple of 32, so it lies in one quantization block (bitsandbytes' blocksizes are powers of
//   two >= 32): one absmax per chunk. The 16 nf4 values live in registers, one per lane (lane & 15),
//   and a code index is looked up with a warp shuffle, so there is no table in memory at all. The
//   matching 32 x values of each token come in as four 128-bit loads (L1 / L2 resident: x is tiny).
//
//   Generic path (any K, odd K included, where rows start in the middle of a byte): lane l decodes
//   elements l, l + 32, ... of the row one by one, its block found per element.
//
//   Each lane keeps one fp32 accumulator per token; a butterfly shuffle reduction leaves the row's
//   sums in every lane, and lane m writes token m's output after the epilogue (bias, roundings,
//   LoRA expand over the rank, DoRA).
//
// Numerics: W[n, k] = T(code * absmax) exactly as bitsandbytes (the product is a separate
// __fmul_rn; the double-quantized absmax uses __fmul_rn then __fadd_rn, so no contraction to a
// fused multiply-add can change the rounding). The epilogue's products and sums likewise use the
// _rn intrinsics to round where the reference rounds. The order of the fp32 dot-product additions
// differs from cuBLAS (expected round-off only).

#include "nf4.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace lola::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;  // warps (output rows) per block
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Rounds an fp32 value to T and back (the value a T tensor would hold).
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// absmax of block `block` with the rounding of bitsandbytes' dequantize_blockwise + offset.
__device__ __forceinline__ float block_absmax(const Nf4Storage& w, int64_t block) {
  if (w.absmax != nullptr) return __ldg(w.absmax + block);
  const int64_t group = block >> w.absmax_block_shift;
  const float scaled = __fmul_rn(__ldg(w.absmax_code + __ldg(w.absmax_q + block)), __ldg(w.absmax_scale + group));
  return __fadd_rn(scaled, __ldg(w.absmax_offset));
}

// The nf4 value of code index `index`, looked up in the lanes' registers (lane i holds code[i & 15]).
__device__ __forceinline__ float lookup(float code_in_lane, int index) {
  return __shfl_sync(kFullMask, code_in_lane, index);
}

template <typename T, int kTokens>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock) nf4_gemv_kernel(
    T* __restrict__ out, int64_t out_row_stride, const T* __restrict__ x, int64_t x_row_stride, Nf4Storage w,
    int64_t n, int64_t k, int block_shift, bool vector_path, const T* __restrict__ bias,
    const float* __restrict__ lora_h, const float* __restrict__ lora_b, int64_t rank, float scale,
    const float* __restrict__ dora_scale, int num_tokens) {
  constexpr float kCode[16] = {LOLA_NF4_CODE_VALUES};
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  // Whole warps leave together, so the shuffles below always see all 32 lanes.
  if (row >= n) return;
  const float code_in_lane = kCode[lane & 15];

  float acc[kTokens];
#pragma unroll
  for (int m = 0; m < kTokens; ++m) acc[m] = 0.0f;

  const int64_t row_begin = row * k;  // flat index of W[row, 0]
  if (vector_path) {
    const uint4* packed_row = reinterpret_cast<const uint4*>(w.packed + row_begin / 2);
    const int64_t chunks = k / 32;
    for (int64_t chunk = lane; chunk < chunks; chunk += kWarp) {
      const uint4 bytes = __ldg(packed_row + chunk);
      const float absmax = block_absmax(w, (row_begin + chunk * 32) >> block_shift);
      // Decode the 32 weights of the chunk to T once; byte b holds elements 2b (high) and 2b + 1 (low).
      float weights[32];
      const uint32_t words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        const int byte = (words[b / 4] >> (8 * (b % 4))) & 0xff;
        weights[2 * b] = round_to<T>(__fmul_rn(lookup(code_in_lane, byte >> 4), absmax));
        weights[2 * b + 1] = round_to<T>(__fmul_rn(lookup(code_in_lane, byte & 15), absmax));
      }
#pragma unroll
      for (int m = 0; m < kTokens; ++m) {
        if (m < num_tokens) {
          const uint4* x_chunk = reinterpret_cast<const uint4*>(x + m * x_row_stride + chunk * 32);
#pragma unroll
          for (int v = 0; v < 4; ++v) {
            const uint4 packed_x = __ldg(x_chunk + v);
            const T* values = reinterpret_cast<const T*>(&packed_x);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[m] += to_float(values[e]) * weights[8 * v + e];
          }
        }
      }
    }
  } else {
    // The shuffle-based lookup needs every lane active: lanes past the end decode a dummy index.
    for (int64_t c0 = 0; c0 < k; c0 += kWarp) {
      const int64_t c = c0 + lane;
      const bool inside = c < k;
      const int64_t j = row_begin + (inside ? c : 0);
      const float value = __fmul_rn(lookup(code_in_lane, nf4_index(w.packed, j)), block_absmax(w, j >> block_shift));
      const float weight = round_to<T>(value);
      if (inside) {
#pragma unroll
        for (int m = 0; m < kTokens; ++m)
          if (m < num_tokens) acc[m] += to_float(x[m * x_row_stride + c]) * weight;
      }
    }
  }

#pragma unroll
  for (int m = 0; m < kTokens; ++m) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) acc[m] += __shfl_xor_sync(kFullMask, acc[m], offset);
  }

  // Lane m finishes token m (a compile-time indexed select keeps acc in registers).
  float sum = 0.0f;
#pragma unroll
  for (int m = 0; m < kTokens; ++m)
    if (lane == m) sum = acc[m];
  if (lane >= num_tokens) return;
  const int m = lane;
  const float bias_n = bias != nullptr ? to_float(bias[row]) : 0.0f;
  float value = round_to<T>(bias != nullptr ? __fadd_rn(sum, bias_n) : sum);
  if (lora_h != nullptr || dora_scale != nullptr) {  // rank 0: no h, but DoRA's magnitude still applies
    float t = 0.0f;
    for (int64_t r = 0; lora_h != nullptr && r < rank; ++r) t += lora_h[m * rank + r] * lora_b[row * rank + r];
    if (dora_scale != nullptr) {
      const float s = dora_scale[row];
      const float base = bias != nullptr ? round_to<T>(__fsub_rn(value, bias_n)) : value;
      const float kept = __fmul_rn(__fsub_rn(s, 1.0f), base);
      const float added = __fmul_rn(__fmul_rn(s, t), scale);
      value = round_to<T>(__fadd_rn(value, __fadd_rn(kept, added)));
    } else {
      value = round_to<T>(__fadd_rn(value, round_to<T>(__fmul_rn(t, scale))));
    }
  }
  out[m * out_row_stride + row] = from_float<T>(value);
}

template <typename T, int kTokens>
void launch(void* out, int64_t out_row_stride, const void* x, int64_t x_row_stride, const Nf4Storage& w, int64_t n,
            int64_t k, int block_shift, bool vector_path, const void* bias, const float* lora_h, const float* lora_b,
            int64_t rank, float scale, const float* dora_scale, int num_tokens, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + kRowsPerBlock - 1) / kRowsPerBlock));
  nf4_gemv_kernel<T, kTokens><<<grid, kWarp * kRowsPerBlock, 0, stream>>>(
      static_cast<T*>(out), out_row_stride, static_cast<const T*>(x), x_row_stride, w, n, k, block_shift,
      vector_path, static_cast<const T*>(bias), lora_h, lora_b, rank, scale, dora_scale, num_tokens);
}

template <typename T>
void launch_for_tokens(int num_tokens, void* out, int64_t out_row_stride, const void* x, int64_t x_row_stride,
                       const Nf4Storage& w, int64_t n, int64_t k, int block_shift, bool vector_path, const void* bias,
                       const float* lora_h, const float* lora_b, int64_t rank, float scale,
                       const float* dora_scale, cudaStream_t stream) {
  // Accumulator counts rounded up to a power of two: few instantiations, little wasted work.
  if (num_tokens <= 1) {
    launch<T, 1>(out, out_row_stride, x, x_row_stride, w, n, k, block_shift, vector_path, bias, lora_h, lora_b, rank,
                 scale, dora_scale, num_tokens, stream);
  } else if (num_tokens <= 2) {
    launch<T, 2>(out, out_row_stride, x, x_row_stride, w, n, k, block_shift, vector_path, bias, lora_h, lora_b, rank,
                 scale, dora_scale, num_tokens, stream);
  } else if (num_tokens <= 4) {
    launch<T, 4>(out, out_row_stride, x, x_row_stride, w, n, k, block_shift, vector_path, bias, lora_h, lora_b, rank,
                 scale, dora_scale, num_tokens, stream);
  } else if (num_tokens <= 8) {
    launch<T, 8>(out, out_row_stride, x, x_row_stride, w, n, k, block_shift, vector_path, bias, lora_h, lora_b, rank,
                 scale, dora_scale, num_tokens, stream);
  } else {
    launch<T, 16>(out, out_row_stride, x, x_row_stride, w, n, k, block_shift, vector_path, bias, lora_h, lora_b,
                  rank, scale, dora_scale, num_tokens, stream);
  }
}

bool aligned16(const void* pointer) { return reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0; }

}  // namespace

cudaError_t nf4_gemv(void* out, int64_t out_row_stride, const void* x, int64_t x_row_stride, const Nf4Storage& weight,
                     int64_t n, int64_t k, const void* bias, const float* lora_h, const float* lora_b, int64_t rank,
                     float scale, const float* dora_scale, int64_t num_tokens, DType dtype, cudaStream_t stream) {
  const int block_shift = power_of_two_shift(weight.blocksize);
  const bool nested = weight.absmax == nullptr;
  if (num_tokens < 1 || num_tokens > kNf4GemvMaxTokens || n < 0 || k < 0 || n * k != weight.numel ||
      block_shift < 1 || (nested && weight.absmax_block_shift < 0) || (lora_h != nullptr && rank <= 0) ||
      (dora_scale != nullptr && lora_h == nullptr) || out == nullptr || x == nullptr || weight.packed == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  // 32-element chunks stay inside one block only for blocksizes >= 32 (all of bitsandbytes').
  const bool vector_path = k % 32 == 0 && weight.blocksize >= 32 && aligned16(weight.packed) && aligned16(x) &&
                           x_row_stride % 8 == 0;
  const int tokens = static_cast<int>(num_tokens);
  if (dtype == DType::Float16) {
    launch_for_tokens<__half>(tokens, out, out_row_stride, x, x_row_stride, weight, n, k, block_shift, vector_path,
                              bias, lora_h, lora_b, rank, scale, dora_scale, stream);
  } else if (dtype == DType::BFloat16) {
    launch_for_tokens<__nv_bfloat16>(tokens, out, out_row_stride, x, x_row_stride, weight, n, k, block_shift,
                                     vector_path, bias, lora_h, lora_b, rank, scale, dora_scale, stream);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace lola::cuda
