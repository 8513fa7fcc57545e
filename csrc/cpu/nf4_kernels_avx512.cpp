// AVX-512 nf4 kernels. Like microkernels_avx512.cpp, this translation unit alone is compiled with
// AVX-512 enabled and uses no STL.
//
// Decoding: 16 packed bytes (32 weights) are widened to 16 dwords; the byte itself indexes the low
// nibble and the byte >> 4 the high one, because VPERMPS only reads the low 4 bits of each index.
// The lookup table of a block is its 16 code values times the block's absmax, rounded once to the
// target type, so each weight costs one permute and nothing else; the table is rebuilt when the
// block changes (every blocksize / 32 groups).
#include <immintrin.h>

#include "../common/bf16.h"
#include "../common/fp16.h"
#include "nf4_kernels.h"

namespace lola::cpu {
namespace {

constexpr float kCode[16] = {LOLA_NF4_CODE_VALUES};

inline __m512 code_vector() { return _mm512_loadu_ps(kCode); }

inline __mmask16 low_mask16(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1u);
}

// fp32 -> nearest-even bf16, kept as fp32 (low 16 bits zero); NaN stays a (quiet) NaN.
inline __m512 round_bf16(__m512 values) {
  const __m512i bits = _mm512_castps_si512(values);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 is_nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
  const __m512i quiet_nan = _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000));
  const __m512i chosen = _mm512_mask_blend_epi32(is_nan, rounded, quiet_nan);
  return _mm512_castsi512_ps(_mm512_and_si512(chosen, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

inline __m512 round_half(__m512 values) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline __m512 round_to(__m512 values, Nf4Element type) {
  switch (type) {
    case Nf4Element::BFloat16: return round_bf16(values);
    case Nf4Element::Float16: return round_half(values);
    default: return values;
  }
}

inline __m512 block_table(const Nf4Storage& w, int64_t block, Nf4Element type) {
  return round_to(_mm512_mul_ps(code_vector(), _mm512_set1_ps(nf4_absmax(w, block))), type);
}

// absmax of the double-quantized blocks [first, first + count), each exactly as nf4_absmax: a
// lookup in the 256-entry code, then a product and a sum, each rounded once. 16 blocks a step:
// the code lookup is eight 32-entry VPERMT2PS selected by the index's top 3 bits, and the 16
// blocks lie in at most two absmax groups (groups of ≥ 16 blocks; smaller ones decode one by one).
void decode_absmax(const Nf4Storage& w, int64_t first, int64_t count, float* out) {
  const int shift = w.absmax_block_shift;
  if (shift < 4) {
    for (int64_t i = 0; i < count; ++i) out[i] = nf4_absmax(w, first + i);
    return;
  }
  __m512 code[16];
  for (int j = 0; j < 16; ++j) code[j] = _mm512_loadu_ps(w.absmax_code + 16 * j);
  const __m512 offset = _mm512_set1_ps(*w.absmax_offset);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 mask = low_mask16(count - i);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, w.absmax_q + first + i));
    const __m512i quarter = _mm512_srli_epi32(q, 5);
    __m512 value = _mm512_permutex2var_ps(code[0], q, code[1]);
    for (int j = 1; j < 8; ++j)
      value = _mm512_mask_mov_ps(value, _mm512_cmpeq_epi32_mask(quarter, _mm512_set1_epi32(j)),
                                 _mm512_permutex2var_ps(code[2 * j], q, code[2 * j + 1]));
    const int64_t group = (first + i) >> shift;
    const int64_t split = ((group + 1) << shift) - (first + i);  // lanes from here on: group + 1
    __m512 scale = _mm512_set1_ps(w.absmax_scale[group]);
    if (split < 16 && split < count - i)
      scale = _mm512_mask_mov_ps(scale, _mm512_cmpge_epi32_mask(lane, _mm512_set1_epi32(static_cast<int>(split))),
                                 _mm512_set1_ps(w.absmax_scale[group + 1]));
    _mm512_mask_storeu_ps(out + i, mask, _mm512_add_ps(_mm512_mul_ps(value, scale), offset));
  }
}

// The bf16 GEMV's absmax over a chunk of k for each of its rows: decoded ahead of the steps that
// use it when double-quantized, else read in place. Decoded inline, the dependent scalar loads
// took 18.6 cycles per row and 128 weights against 15.9 with this pass (one thread, 4096 × 4096,
// L2-resident: the GEMV is bound by its shuffles, which the register broadcasts of inline-decoded
// values compete for). The fp32 GEMV keeps the inline decode: its lookups hide it.
constexpr int64_t kAbsmaxChunk = 4096;

template <int Rows>
struct ChunkAbsmax {
  float decoded[Rows][kAbsmaxChunk / 32 + 1];  // the GEMVs take blocksizes ≥ 32
  const float* of_row[Rows];                   // of_row[r][b]: block first_block[r] + b
  int64_t first_block[Rows];

  // Rows row0 + r, weights [begin, end) of each.
  void load(const Nf4Storage& w, int64_t k, int64_t row0, int64_t begin, int64_t end, int shift) {
    for (int r = 0; r < Rows; ++r) {
      const int64_t flat = (row0 + r) * k;
      first_block[r] = (flat + begin) >> shift;
      if (w.absmax != nullptr) {
        of_row[r] = w.absmax + first_block[r];
      } else {
        decode_absmax(w, first_block[r], ((flat + end - 1) >> shift) - first_block[r] + 1, decoded[r]);
        of_row[r] = decoded[r];
      }
    }
  }
  // absmax of the block holding flat weight index `flat` of row r, and of the blocks after it.
  const float* at(int r, int64_t flat, int shift) const { return of_row[r] + ((flat >> shift) - first_block[r]); }
};

// Indices of the 32 weights stored in 16 bytes: {even-k (high nibbles), odd-k (low nibbles)}.
struct NibblePair {
  __m512i high;
  __m512i low;
};
inline NibblePair load_nibbles(const uint8_t* bytes) {
  const __m512i low = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  return {_mm512_srli_epi32(low, 4), low};
}

inline __m512i pack_bf16_pairs(__m512 even, __m512 odd) {
  // Both hold bf16 values as fp32: even k goes in the low half of each dword.
  return _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(even), 16),
                         _mm512_and_si512(_mm512_castps_si512(odd), _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

inline __m512i pack_half_pairs(__m512 even, __m512 odd) {
  const __m512i even_half = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(even, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m512i odd_half = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(odd, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return _mm512_or_si512(even_half, _mm512_slli_epi32(odd_half, 16));
}

// Stores 32 consecutive weights (even-k values, odd-k values) in natural order.
inline void store_group(void* out, __m512 even, __m512 odd, Nf4Element type) {
  if (type == Nf4Element::Float32) {
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    float* target = static_cast<float*>(out);
    _mm512_storeu_ps(target, _mm512_permutex2var_ps(even, first, odd));
    _mm512_storeu_ps(target + 16, _mm512_permutex2var_ps(even, second, odd));
  } else if (type == Nf4Element::BFloat16) {
    _mm512_storeu_si512(out, pack_bf16_pairs(even, odd));
  } else {
    _mm512_storeu_si512(out, pack_half_pairs(even, odd));
  }
}

inline void store_one(void* out, int64_t index, float value, Nf4Element type) {
  switch (type) {
    case Nf4Element::Float32: static_cast<float*>(out)[index] = value; break;
    case Nf4Element::BFloat16: static_cast<uint16_t*>(out)[index] = float_to_bf16(value); break;
    case Nf4Element::Float16: static_cast<uint16_t*>(out)[index] = float_to_half(value); break;
  }
}

int64_t element_size(Nf4Element type) { return type == Nf4Element::Float32 ? 4 : 2; }

void dequantize(const Nf4Storage& w, int64_t begin, int64_t count, void* out, Nf4Element out_type) {
  const int64_t end = begin + count;
  const int64_t size = element_size(out_type);
  char* target = static_cast<char*>(out);
  int64_t j = begin;
  while (j < end) {
    const int64_t block = j / w.blocksize;
    const int64_t block_end = (block + 1) * w.blocksize < end ? (block + 1) * w.blocksize : end;
    const float absmax = nf4_absmax(w, block);
    const __m512 table = block_table(w, block, out_type);
    // An odd start sits in a low nibble: one scalar step realigns to bytes.
    if ((j & 1) && j < block_end) {
      store_one(target, j - begin, kCode[nf4_index(w.packed, j)] * absmax, out_type);
      ++j;
    }
    for (; j + 32 <= block_end; j += 32) {
      const NibblePair nibbles = load_nibbles(w.packed + j / 2);
      store_group(target + (j - begin) * size, _mm512_permutexvar_ps(nibbles.high, table),
                  _mm512_permutexvar_ps(nibbles.low, table), out_type);
    }
    for (; j < block_end; ++j) store_one(target, j - begin, kCode[nf4_index(w.packed, j)] * absmax, out_type);
  }
}

int log2_of(int64_t value) {
  int shift = 0;
  while ((int64_t{1} << shift) < value) ++shift;
  return shift;
}

void decode_rows(const Nf4Storage& w, int64_t k, int64_t row0, int64_t rows, void* tile, int64_t tile_stride,
                 Nf4Element compute) {
  const int shift = log2_of(w.blocksize);
  const int64_t size = element_size(compute);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t first = (row0 + r) * k;
    char* target = static_cast<char*>(tile) + r * tile_stride * size;
    int64_t block = -1;
    __m512 table = _mm512_setzero_ps();
    for (int64_t c = 0; c < k; c += 32) {
      const int64_t j = first + c;
      if ((j >> shift) != block) {
        block = j >> shift;
        table = block_table(w, block, compute);
      }
      const NibblePair nibbles = load_nibbles(w.packed + j / 2);
      store_group(target + c * size, _mm512_permutexvar_ps(nibbles.high, table),
                  _mm512_permutexvar_ps(nibbles.low, table), compute);
    }
  }
}

template <int Tokens, int Rows>
void dot_f32(const void* x_data, int64_t x_stride, const void* tile_data, int64_t tile_stride, int64_t kp,
             float* acc, int64_t acc_stride) {
  const float* x = static_cast<const float*>(x_data);
  const float* tile = static_cast<const float*>(tile_data);
  __m512 sums[Tokens][Rows];
  for (int i = 0; i < Tokens; ++i)
    for (int r = 0; r < Rows; ++r) sums[i][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < kp; c += 16) {
    __m512 xv[Tokens];
    for (int i = 0; i < Tokens; ++i) xv[i] = _mm512_loadu_ps(x + i * x_stride + c);
    for (int r = 0; r < Rows; ++r) {
      const __m512 wv = _mm512_loadu_ps(tile + r * tile_stride + c);
      for (int i = 0; i < Tokens; ++i) sums[i][r] = _mm512_fmadd_ps(xv[i], wv, sums[i][r]);
    }
  }
  for (int i = 0; i < Tokens; ++i)
    for (int r = 0; r < Rows; ++r) acc[i * acc_stride + r] = _mm512_reduce_add_ps(sums[i][r]);
}

// bf16 without VDPBF16PS: each dword holds (even k, odd k); both halves are widened exactly.
template <int Tokens, int Rows>
void dot_bf16_widen(const void* x_data, int64_t x_stride, const void* tile_data, int64_t tile_stride, int64_t kp,
                    float* acc, int64_t acc_stride) {
  const uint16_t* x = static_cast<const uint16_t*>(x_data);
  const uint16_t* tile = static_cast<const uint16_t*>(tile_data);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 sums[Tokens][Rows];
  for (int i = 0; i < Tokens; ++i)
    for (int r = 0; r < Rows; ++r) sums[i][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < kp; c += 32) {
    __m512 x_even[Tokens], x_odd[Tokens];
    for (int i = 0; i < Tokens; ++i) {
      const __m512i pairs = _mm512_loadu_si512(x + i * x_stride + c);
      x_even[i] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      x_odd[i] = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
    }
    for (int r = 0; r < Rows; ++r) {
      const __m512i pairs = _mm512_loadu_si512(tile + r * tile_stride + c);
      const __m512 w_even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 w_odd = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
      for (int i = 0; i < Tokens; ++i) {
        sums[i][r] = _mm512_fmadd_ps(x_even[i], w_even, sums[i][r]);
        sums[i][r] = _mm512_fmadd_ps(x_odd[i], w_odd, sums[i][r]);
      }
    }
  }
  for (int i = 0; i < Tokens; ++i)
    for (int r = 0; r < Rows; ++r) acc[i * acc_stride + r] = _mm512_reduce_add_ps(sums[i][r]);
}

template <int Tokens, int Rows>
__attribute__((target("avx512bf16"))) void dot_bf16_native(const void* x_data, int64_t x_stride,
                                                          const void* tile_data, int64_t tile_stride, int64_t kp,
                                                          float* acc, int64_t acc_stride) {
  const uint16_t* x = static_cast<const uint16_t*>(x_data);
  const uint16_t* tile = static_cast<const uint16_t*>(tile_data);
  __m512 sums[Tokens][Rows];
  for (int i = 0; i < Tokens; ++i)
    for (int r = 0; r < Rows; ++r) sums[i][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < kp; c += 32) {
    __m512i xv[Tokens];
    for (int i = 0; i < Tokens; ++i) xv[i] = _mm512_loadu_si512(x + i * x_stride + c);
    for (int r = 0; r < Rows; ++r) {
      const __m512i wv = _mm512_loadu_si512(tile + r * tile_stride + c);
      for (int i = 0; i < Tokens; ++i) sums[i][r] = _mm512_dpbf16_ps(sums[i][r], (__m512bh)xv[i], (__m512bh)wv);
    }
  }
  for (int i = 0; i < Tokens; ++i)
    for (int r = 0; r < Rows; ++r) acc[i * acc_stride + r] = _mm512_reduce_add_ps(sums[i][r]);
}

// The GEMVs read a few rows at a time, one cache line of each per step, and prefetch into L2 the
// same line of the row `rows` further on (what the next call reads). A row is only a few KB, too
// short for the hardware stream prefetcher to ramp up, so without this every row group would
// start with misses to memory (measured: cold-cache M = 1 went from 0.80 to 0.58 ms at 4096²).
inline const uint8_t* next_group_row(const Nf4Storage& w, int64_t k, int64_t row, int rows) {
  const uint8_t* own = w.packed + row * k / 2;
  return (row + rows + 1) * k <= w.numel ? own + rows * k / 2 : own;
}

inline void prefetch_l2(const uint8_t* address) { _mm_prefetch(reinterpret_cast<const char*>(address), _MM_HINT_T1); }

// Straight from the packed bytes: every weight row keeps its own table.
template <int Tokens, int Rows>
void gemv_rows(const Nf4Storage& w, int64_t k, int64_t row0, const float* x, int64_t x_stride, float* acc,
               int64_t acc_stride, bool round_bf16_weights) {
  const int shift = log2_of(w.blocksize);
  const Nf4Element table_type = round_bf16_weights ? Nf4Element::BFloat16 : Nf4Element::Float32;
  __m512 sums[Rows][Tokens];
  __m512 tables[Rows];
  int64_t blocks[Rows];
  const uint8_t* rows[Rows];
  const uint8_t* ahead[Rows];
  for (int r = 0; r < Rows; ++r) {
    for (int i = 0; i < Tokens; ++i) sums[r][i] = _mm512_setzero_ps();
    blocks[r] = -1;
    tables[r] = _mm512_setzero_ps();
    rows[r] = w.packed + (row0 + r) * k / 2;
    ahead[r] = next_group_row(w, k, row0 + r, Rows);
  }
  for (int64_t c = 0; c < k; c += 32) {
    __m512 x_even[Tokens], x_odd[Tokens];
    for (int i = 0; i < Tokens; ++i) {
      x_even[i] = _mm512_loadu_ps(x + i * x_stride + c);
      x_odd[i] = _mm512_loadu_ps(x + i * x_stride + c + 16);
    }
    for (int r = 0; r < Rows; ++r) {
      const int64_t block = ((row0 + r) * k + c) >> shift;
      if (block != blocks[r]) {
        blocks[r] = block;
        tables[r] = block_table(w, block, table_type);
      }
      // A cache line every 4 steps; one token only: with more, the kernel is compute-bound and
      // the prefetch's registers cost more than it saves (measured 1.0 → 1.45 ms at M = 4, 4096²).
      if (Tokens == 1 && c % 128 == 0) prefetch_l2(ahead[r] + c / 2);
      const NibblePair nibbles = load_nibbles(rows[r] + c / 2);
      const __m512 even = _mm512_permutexvar_ps(nibbles.high, tables[r]);
      const __m512 odd = _mm512_permutexvar_ps(nibbles.low, tables[r]);
      for (int i = 0; i < Tokens; ++i) {
        sums[r][i] = _mm512_fmadd_ps(even, x_even[i], sums[r][i]);
        sums[r][i] = _mm512_fmadd_ps(odd, x_odd[i], sums[r][i]);
      }
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int i = 0; i < Tokens; ++i) acc[i * acc_stride + r] = _mm512_reduce_add_ps(sums[r][i]);
}

// bf16 GEMV with VDPBF16PS, 128 weights (64 packed bytes) per row and step. The table of a block
// is its 16 bf16 weights, code · absmax rounded once: exactly the dequantized values. The 16-bit
// words of the packed bytes hold 4 nibbles each; shifting the words and masking each nibble gives
// word indices into the tables of the step's blocks (VPERMW over 32 words: two blocks; VPERMT2W
// over 64: four), and the lookups are already bf16 weights in dword pairs. x is permuted once to
// the same order (nf4_gemv_bf16_position).
// 32 bf16 words: the 16 weights of the block of absmax0, then those of absmax1. VCVTNE2PS2BF16
// flushes denormal results to zero where round_bf16 keeps them, but VDPBF16PS treats denormal
// inputs as zero all the same (as the tile dot does), so the product is unchanged.
__attribute__((target("avx512bf16"))) inline __m512i bf16_tables(float absmax0, float absmax1) {
  const __m512 first = _mm512_mul_ps(code_vector(), _mm512_set1_ps(absmax0));
  const __m512 second = _mm512_mul_ps(code_vector(), _mm512_set1_ps(absmax1));
  return (__m512i)_mm512_cvtne2ps_pbh(second, first);
}

template <int Blocks, int Tokens, int Rows>
__attribute__((target("avx512bf16"))) void gemv_bf16_rows(const Nf4Storage& w, int64_t k, int64_t row0,
                                                          const uint16_t* x, int64_t x_stride, float* acc,
                                                          int64_t acc_stride) {
  // Two accumulator sets when there are few, so that the VDPBF16PS latency chains overlap.
  constexpr int kSets = Rows * Tokens <= 4 ? 2 : 1;
  const int shift = log2_of(w.blocksize);
  // Word u of the 64 bytes lies in block u / 8 of the step (32 weights a block) or u / 16 (64 or more).
  const __m512i block_bits = Blocks == 4 ? _mm512_slli_epi16(_mm512_srli_epi16(_mm512_set_epi16(
                                               31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15,
                                               14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 3), 4)
                                         : _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(16), 1);
  const __m512i nibble = _mm512_set1_epi16(15);
  __m512 sums[kSets][Rows][Tokens];
  const uint8_t* rows[Rows];
  const uint8_t* ahead[Rows];
  for (int r = 0; r < Rows; ++r) {
    for (int s = 0; s < kSets; ++s)
      for (int i = 0; i < Tokens; ++i) sums[s][r][i] = _mm512_setzero_ps();
    rows[r] = w.packed + (row0 + r) * k / 2;
    ahead[r] = next_group_row(w, k, row0 + r, Rows);
  }
  ChunkAbsmax<Rows> absmax;
  for (int64_t c = 0; c < k; c += 128) {
    if (c % kAbsmaxChunk == 0) absmax.load(w, k, row0, c, c + kAbsmaxChunk < k ? c + kAbsmaxChunk : k, shift);
#pragma GCC unroll 4
    for (int r = 0; r < Rows; ++r) {
      prefetch_l2(ahead[r] + c / 2);
      const float* block_absmax = absmax.at(r, (row0 + r) * k + c, shift);
      __m512i low_tables, high_tables;
      if (Blocks == 4) {
        low_tables = bf16_tables(block_absmax[0], block_absmax[1]);
        high_tables = bf16_tables(block_absmax[2], block_absmax[3]);
      } else {
        low_tables = bf16_tables(block_absmax[0], Blocks == 2 ? block_absmax[1] : block_absmax[0]);
        high_tables = low_tables;
      }
      const __m512i words = _mm512_loadu_si512(rows[r] + c / 2);
      // Word u holds, from bit 0, the nibbles of k = 4u + 1, 4u, 4u + 3, 4u + 2 (even k high).
      // 0xEA: (a & b) | c, with the nibble field and the block bits disjoint.
      const __m512i index[4] = {
          _mm512_ternarylogic_epi32(words, nibble, block_bits, 0xEA),
          _mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 4), nibble, block_bits, 0xEA),
          _mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 8), nibble, block_bits, 0xEA),
          _mm512_or_si512(_mm512_srli_epi16(words, 12), block_bits)};
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        const __m512i weights = Blocks == 4 ? _mm512_permutex2var_epi16(low_tables, index[v], high_tables)
                                            : _mm512_permutexvar_epi16(index[v], low_tables);
#pragma GCC unroll 8
        for (int i = 0; i < Tokens; ++i) {
          const __m512i xv = _mm512_loadu_si512(x + i * x_stride + c + v * 32);
          __m512& sum = sums[v % kSets][r][i];
          sum = _mm512_dpbf16_ps(sum, (__m512bh)weights, (__m512bh)xv);
        }
      }
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int i = 0; i < Tokens; ++i) {
      __m512 total = sums[0][r][i];
      if (kSets == 2) total = _mm512_add_ps(total, sums[kSets - 1][r][i]);
      acc[i * acc_stride + r] = _mm512_reduce_add_ps(total);
    }
}

using GemvBf16Tile = void (*)(const Nf4Storage&, int64_t, int64_t, const uint16_t*, int64_t, float*, int64_t);

#define LOLA_NF4_BF16_ROW4(blocks, tokens)                                                           \
  {&gemv_bf16_rows<blocks, tokens, 1>, &gemv_bf16_rows<blocks, tokens, 2>, &gemv_bf16_rows<blocks, tokens, 3>, \
   &gemv_bf16_rows<blocks, tokens, 4>}
#define LOLA_NF4_BF16_ROW2(blocks, tokens) {&gemv_bf16_rows<blocks, tokens, 1>, &gemv_bf16_rows<blocks, tokens, 2>}
#define LOLA_NF4_BF16_TABLES(blocks)                                                                          \
  const GemvBf16Tile kGemvBf16Few##blocks[4][4] = {LOLA_NF4_BF16_ROW4(blocks, 1), LOLA_NF4_BF16_ROW4(blocks, 2),   \
                                                   LOLA_NF4_BF16_ROW4(blocks, 3), LOLA_NF4_BF16_ROW4(blocks, 4)};  \
  const GemvBf16Tile kGemvBf16Many##blocks[4][2] = {LOLA_NF4_BF16_ROW2(blocks, 5), LOLA_NF4_BF16_ROW2(blocks, 6), \
                                                    LOLA_NF4_BF16_ROW2(blocks, 7), LOLA_NF4_BF16_ROW2(blocks, 8)};

LOLA_NF4_BF16_TABLES(1)
LOLA_NF4_BF16_TABLES(2)
LOLA_NF4_BF16_TABLES(4)

void gemv_bf16(const Nf4Storage& w, int64_t k, int64_t row0, int rows, const uint16_t* x, int64_t x_stride,
               int tokens, float* acc, int64_t acc_stride) {
  const int64_t lanes_per_block = w.blocksize / 32;
  const auto& few = lanes_per_block == 1 ? kGemvBf16Few4 : lanes_per_block == 2 ? kGemvBf16Few2 : kGemvBf16Few1;
  const auto& many = lanes_per_block == 1 ? kGemvBf16Many4 : lanes_per_block == 2 ? kGemvBf16Many2 : kGemvBf16Many1;
  if (tokens <= 4) {
    few[tokens - 1][rows - 1](w, k, row0, x, x_stride, acc, acc_stride);
    return;
  }
  // More tokens keep more accumulators: two rows at a time.
  for (int r = 0; r < rows; r += 2)
    many[tokens - 5][(rows - r >= 2 ? 2 : 1) - 1](w, k, row0 + r, x, x_stride, acc + r, acc_stride);
}

using DotTile = void (*)(const void*, int64_t, const void*, int64_t, int64_t, float*, int64_t);
using GemvTile = void (*)(const Nf4Storage&, int64_t, int64_t, const float*, int64_t, float*, int64_t, bool);

// [tokens-1][rows-1] tables of every tile shape of one template.
#define LOLA_NF4_ROW(kernel, tokens) {&kernel<tokens, 1>, &kernel<tokens, 2>, &kernel<tokens, 3>, &kernel<tokens, 4>}
#define LOLA_NF4_TABLE(type, name, kernel)                                                    \
  const type name[kNf4TileTokens][kNf4TileRows] = {LOLA_NF4_ROW(kernel, 1), LOLA_NF4_ROW(kernel, 2), \
                                                   LOLA_NF4_ROW(kernel, 3), LOLA_NF4_ROW(kernel, 4)};

LOLA_NF4_TABLE(DotTile, kDotF32, dot_f32)
LOLA_NF4_TABLE(DotTile, kDotBf16Widen, dot_bf16_widen)
LOLA_NF4_TABLE(DotTile, kDotBf16Native, dot_bf16_native)
LOLA_NF4_TABLE(GemvTile, kGemv, gemv_rows)

void dot_widen(const void* x, int64_t x_stride, const void* tile, int64_t tile_stride, int64_t kp, int tokens,
               int rows, float* acc, int64_t acc_stride, Nf4Element compute) {
  const auto& table = compute == Nf4Element::Float32 ? kDotF32 : kDotBf16Widen;
  table[tokens - 1][rows - 1](x, x_stride, tile, tile_stride, kp, acc, acc_stride);
}

void dot_native(const void* x, int64_t x_stride, const void* tile, int64_t tile_stride, int64_t kp, int tokens,
                int rows, float* acc, int64_t acc_stride, Nf4Element compute) {
  const auto& table = compute == Nf4Element::Float32 ? kDotF32 : kDotBf16Native;
  table[tokens - 1][rows - 1](x, x_stride, tile, tile_stride, kp, acc, acc_stride);
}

void gemv(const Nf4Storage& w, int64_t k, int64_t row0, int rows, const float* x, int64_t x_stride, int tokens,
          float* acc, int64_t acc_stride, bool round_bf16_weights) {
  kGemv[tokens - 1][rows - 1](w, k, row0, x, x_stride, acc, acc_stride, round_bf16_weights);
}

inline __m512 load_as_f32(const void* data, int64_t index, __mmask16 mask, Nf4Element type) {
  if (type == Nf4Element::BFloat16) {
    const __m256i packed = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(data) + index);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(packed), 16));
  }
  return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(data) + index);
}

inline void store_from_f32(void* data, int64_t index, __m512 values, __mmask16 mask, Nf4Element type) {
  if (type == Nf4Element::BFloat16) {
    // values are already bf16-rounded: keep the high halves.
    const __m256i halves = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(values), 16));
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(data) + index, mask, halves);
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(data) + index, mask, values);
  }
}

void epilogue(const Nf4Epilogue& e, const float* acc, int64_t n0, int64_t count, const float* bt, void* out) {
  const Nf4Element promoted = (e.out_type == Nf4Element::BFloat16 && e.compute == Nf4Element::BFloat16)
                                  ? Nf4Element::BFloat16 : Nf4Element::Float32;
  const __m512 scale = _mm512_set1_ps(e.scale);
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 mask = low_mask16(count - j);
    __m512 value = _mm512_maskz_loadu_ps(mask, acc + j);
    __m512 bias = _mm512_setzero_ps();
    if (e.bias) {
      bias = load_as_f32(e.bias, n0 + j, mask, e.compute);
      value = _mm512_add_ps(value, bias);
    }
    value = round_to(round_to(value, e.compute), e.out_type);
    if (e.h || e.dora_scale) {  // rank 0: no h, but DoRA's magnitude still applies
      __m512 t = _mm512_setzero_ps();
      for (int64_t r = 0; e.h && r < e.rank; ++r)
        t = _mm512_fmadd_ps(_mm512_set1_ps(e.h[r]), _mm512_maskz_loadu_ps(mask, bt + r * count + j), t);
      if (e.dora_scale) {
        const __m512 s = _mm512_maskz_loadu_ps(mask, e.dora_scale + n0 + j);
        const __m512 base = e.bias ? round_to(_mm512_sub_ps(value, bias), promoted) : value;
        const __m512 kept = _mm512_mul_ps(_mm512_sub_ps(s, one), base);
        const __m512 added = _mm512_mul_ps(_mm512_mul_ps(s, t), scale);
        value = round_to(_mm512_add_ps(value, _mm512_add_ps(kept, added)), e.out_type);
      } else {
        value = round_to(_mm512_add_ps(value, round_to(_mm512_mul_ps(t, scale), e.out_type)), e.out_type);
      }
    }
    store_from_f32(out, j, value, mask, e.out_type);
  }
}

}  // namespace

Nf4Kernels nf4_avx512_kernels(bool native_bf16_dot) {
  return Nf4Kernels{&dequantize, &decode_rows, native_bf16_dot ? &dot_native : &dot_widen, &gemv,
                    native_bf16_dot ? &gemv_bf16 : nullptr, &epilogue};
}

}  // namespace lola::cpu
