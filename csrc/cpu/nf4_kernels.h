// Kernels behind the CPU nf4 ops, one table per ISA (see microkernels.h for why a table): the
// planner in nf4.cpp picks one at run time, so nf4_kernels_avx512.cpp is the only code compiled
// with AVX-512 enabled.
//
// Tiles of dequantized rows hold W[row, 0:kp] in natural k order, in the compute type (fp32 or
// bf16), zero past k; kp = k rounded up to 32. The GEMV reads x in a "split" fp32 layout: each
// group of 32 values stores its 16 even-k entries, then its 16 odd-k entries, which is the order in
// which the high and low nibbles of 16 packed bytes come out.
#pragma once
#include <cstdint>

#include "nf4.h"

namespace lola::cpu {

constexpr int kNf4TileTokens = 4;  // tokens per dot / GEMV call
constexpr int kNf4TileRows = 4;    // weight rows per dot / GEMV call

constexpr int kNf4GemvBf16Tokens = 8;  // tokens per bf16 GEMV call

// Where the bf16 GEMV reads x[c]: within each 128 values, 4 vectors of 32, vector j holding
// c = 4u + (j ^ 1) at word u, the order in which the kernel's table lookups produce the weights
// (the 16-bit words of the packed bytes hold the nibbles of k = 4u + 1, 4u, 4u + 3, 4u + 2).
inline int64_t nf4_gemv_bf16_position(int64_t c) {
  const int64_t within = c % 128;
  return c - within + ((within % 4) ^ 1) * 32 + within / 4;
}

struct Nf4Epilogue {
  Nf4Element compute;
  Nf4Element out_type;
  const void* bias;         // [n] compute type, or nullptr
  const float* h;           // [rank] of this token, or nullptr
  int64_t rank;
  float scale;
  const float* dora_scale;  // [n], or nullptr
};

struct Nf4Kernels {
  // out[i] = W[begin + i] in out_type, i < count (any begin and count).
  void (*dequantize)(const Nf4Storage& w, int64_t begin, int64_t count, void* out, Nf4Element out_type);
  // tile[r * tile_stride + i] = compute(W[row0 + r, i]), r < rows, i < k (k % 32 == 0, blocksize a power of 2).
  void (*decode_rows)(const Nf4Storage& w, int64_t k, int64_t row0, int64_t rows, void* tile, int64_t tile_stride,
                      Nf4Element compute);
  // acc[i * acc_stride + r] = Σ_{c < kp} x[i * x_stride + c] · tile[r * tile_stride + c],
  // i < tokens ≤ kNf4TileTokens, r < rows ≤ kNf4TileRows, kp % 32 == 0; x and tile in the compute type.
  void (*dot)(const void* x, int64_t x_stride, const void* tile, int64_t tile_stride, int64_t kp, int tokens, int rows,
              float* acc, int64_t acc_stride, Nf4Element compute);
  // The same product straight from the packed weight (k % 32 == 0, blocksize a power of 2), x in
  // the split fp32 layout, weights rounded to bf16 first when round_bf16; nullptr if the ISA has none.
  void (*gemv)(const Nf4Storage& w, int64_t k, int64_t row0, int rows, const float* x, int64_t x_stride, int tokens,
               float* acc, int64_t acc_stride, bool round_bf16);
  // The same product for bf16 compute with VDPBF16PS (k % 128 == 0, blocksize a power of 2 ≥ 32),
  // x in bf16 permuted by nf4_gemv_bf16_position, tokens ≤ kNf4GemvBf16Tokens; nullptr if the ISA has none.
  void (*gemv_bf16)(const Nf4Storage& w, int64_t k, int64_t row0, int rows, const uint16_t* x, int64_t x_stride,
                    int tokens, float* acc, int64_t acc_stride);
  // out[j] for j < count: columns n0 + j of one token from its fp32 sums acc[j]; bt is lora_b's
  // panel transposed, bt[r * count + j] = lora_b[n0 + j, r].
  void (*epilogue)(const Nf4Epilogue& e, const float* acc, int64_t n0, int64_t count, const float* bt, void* out);
};

Nf4Kernels nf4_scalar_kernels();
Nf4Kernels nf4_avx512_kernels(bool native_bf16_dot);

// Portable decode of any rows (any k, any blocksize) into a tile of row stride tile_stride,
// zero-filled up to round_up(k, 32); used for the shapes the fast decoders do not take.
void nf4_decode_rows_generic(const Nf4Storage& w, int64_t k, int64_t row0, int64_t rows, void* tile,
                             int64_t tile_stride, Nf4Element compute);

}  // namespace lola::cpu
