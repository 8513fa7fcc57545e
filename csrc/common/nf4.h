// bitsandbytes' nf4 storage, read as is (header-only, shared by the CPU and CUDA kernels).
//
// A weight of `numel` elements, flattened row-major, is cut into blocks of `blocksize` elements
// over the flat index (so a block crosses rows when K % blocksize != 0). Element j is the 4-bit
// code index in byte j / 2, the high nibble for even j, and its value is
//     W[j] = dtype(kNf4Code[index] * absmax[j / blocksize])      (fp32 product, one rounding)
// With double quantization the absmax values are themselves stored as uint8 codes:
//     absmax[b] = absmax_code[absmax_q[b]] * absmax_scale[b / absmax_blocksize] + absmax_offset
// (two fp32 roundings, product first: exactly what bitsandbytes' dequantize_blockwise + offset do).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LOLA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LOLA_HOST_DEVICE inline
#endif

// The 16 nf4 values, index order (bitsandbytes' NF4 table, fp32).
#define LOLA_NF4_CODE_VALUES                                                                        \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f, \
      -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f, \
      0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,         \
      0.7229568362236023f, 1.0f

namespace lola {

// Raw view of one nf4 weight (a bitsandbytes Params4bit + QuantState), valid on host or device.
struct Nf4Storage {
  const uint8_t* packed;          // (numel + 1) / 2 bytes
  int64_t numel;
  int64_t blocksize;
  const float* absmax;            // [blocks] fp32, or nullptr when double-quantized
  const uint8_t* absmax_q;        // [blocks] uint8 codes (double quantization)
  const float* absmax_code;       // [256] fp32 code of the absmax quantization
  const float* absmax_scale;      // [ceil(blocks / absmax_blocksize)] fp32
  int64_t absmax_blocksize;
  const float* absmax_offset;     // [1] fp32 (double quantization): a pointer, so that a device copy needs no
                                  // host read (which would sync the stream and break CUDA graph capture)
  int absmax_block_shift;         // log2(absmax_blocksize) when a power of two (always, in bitsandbytes), else -1
};

// log2(value) for a power of two, else -1.
LOLA_HOST_DEVICE int power_of_two_shift(int64_t value) {
  if (value <= 0 || (value & (value - 1)) != 0) return -1;
  int shift = 0;
  while ((int64_t{1} << shift) < value) ++shift;
  return shift;
}

LOLA_HOST_DEVICE int64_t nf4_num_blocks(const Nf4Storage& w) { return (w.numel + w.blocksize - 1) / w.blocksize; }

// absmax of block b. The product and the sum are separate statements, and the files that use this
// are compiled with -ffp-contract=off, so no fused multiply-add changes the rounding.
LOLA_HOST_DEVICE float nf4_absmax(const Nf4Storage& w, int64_t block) {
  if (w.absmax != nullptr) return w.absmax[block];
  // A 64-bit division here would cost more than decoding the block's weights.
  const int64_t group = w.absmax_block_shift >= 0 ? block >> w.absmax_block_shift : block / w.absmax_blocksize;
  const float scaled = w.absmax_code[w.absmax_q[block]] * w.absmax_scale[group];
  return scaled + *w.absmax_offset;
}

LOLA_HOST_DEVICE int nf4_index(const uint8_t* packed, int64_t j) {
  const int byte = packed[j >> 1];
  return (j & 1) ? (byte & 15) : (byte >> 4);
}

}  // namespace lola
