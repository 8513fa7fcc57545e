// AVX-512 tile kernels. This translation unit alone is compiled with AVX-512 enabled and uses no
// STL, so no AVX-512 instantiation of a shared inline function can leak into the portable code.
//
// shrink: a register block of up to 4 tokens × 6 ranks of dot products over d_in (24 zmm
//         accumulators), so every loaded vector of x or lora_a feeds 4-6 FMAs.
// expand: a packed fp32 panel of lora_b (R × 32 columns) times up to 6 tokens' g rows, i.e. an
//         outer-product update of 6 × 32 accumulators per rank step.
// bf16 inputs use VDPBF16PS (pairs of bf16 products summed into fp32) where the CPU has it, else
// they are widened to fp32; accumulation is fp32 either way. With VDPBF16PS the expand's g is
// rounded to bf16 first (PEFT's bf16 path rounds its intermediate the same way).
#include <immintrin.h>

#include "microkernels.h"

namespace lola::cpu {
namespace {

// How many 16-column blocks of lora_b ahead the row expand prefetches (4 KiB at R = 16, fp32).
constexpr int64_t kRowPrefetchBlocks = 4;
// How far ahead along each lora_a row the dot-product shrink prefetches.
constexpr int64_t kShrinkPrefetchBytes = 1024;

inline __mmask16 low_mask16(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1u);
}
inline __mmask32 low_mask32(int64_t count) {
  return count >= 32 ? static_cast<__mmask32>(0xffffffffu) : static_cast<__mmask32>((1u << count) - 1u);
}

inline __m512 widen_bf16(__m256i packed) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(packed), 16));
}

// fp32 -> bf16 with round-to-nearest-even and quiet NaNs, without AVX512-BF16.
inline __m256i narrow_to_bf16(__m512 values) {
  const __m512i bits = _mm512_castps_si512(values);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 is_nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
  const __m512i quiet_nan = _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000));
  const __m512i chosen = _mm512_mask_blend_epi32(is_nan, rounded, quiet_nan);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(chosen, 16));
}

template <int Tokens, int Ranks>
void shrink_f32(const void* const* x_rows, const void* a_rows, int64_t a_stride, int64_t d_in, float* h,
                int64_t h_stride) {
  const float* x[Tokens];
  for (int i = 0; i < Tokens; ++i) x[i] = static_cast<const float*>(x_rows[i]);
  const float* a = static_cast<const float*>(a_rows);
  __m512 acc[Tokens][Ranks];
  for (int i = 0; i < Tokens; ++i)
    for (int k = 0; k < Ranks; ++k) acc[i][k] = _mm512_setzero_ps();
  for (int64_t d = 0; d < d_in; d += 16) {
    const __mmask16 mask = low_mask16(d_in - d);
    __m512 xv[Tokens];
    for (int i = 0; i < Tokens; ++i) xv[i] = _mm512_maskz_loadu_ps(mask, x[i] + d);
    for (int k = 0; k < Ranks; ++k) {
      _mm_prefetch(reinterpret_cast<const char*>(a + k * a_stride + d) + kShrinkPrefetchBytes, _MM_HINT_T1);
      const __m512 av = _mm512_maskz_loadu_ps(mask, a + k * a_stride + d);
      for (int i = 0; i < Tokens; ++i) acc[i][k] = _mm512_fmadd_ps(xv[i], av, acc[i][k]);
    }
  }
  for (int i = 0; i < Tokens; ++i)
    for (int k = 0; k < Ranks; ++k) h[i * h_stride + k] += _mm512_reduce_add_ps(acc[i][k]);
}

template <int Tokens, int Ranks>
void shrink_bf16_widen(const void* const* x_rows, const void* a_rows, int64_t a_stride, int64_t d_in, float* h,
                       int64_t h_stride) {
  const uint16_t* x[Tokens];
  for (int i = 0; i < Tokens; ++i) x[i] = static_cast<const uint16_t*>(x_rows[i]);
  const uint16_t* a = static_cast<const uint16_t*>(a_rows);
  __m512 acc[Tokens][Ranks];
  for (int i = 0; i < Tokens; ++i)
    for (int k = 0; k < Ranks; ++k) acc[i][k] = _mm512_setzero_ps();
  for (int64_t d = 0; d < d_in; d += 16) {
    const __mmask16 mask = low_mask16(d_in - d);
    __m512 xv[Tokens];
    for (int i = 0; i < Tokens; ++i) xv[i] = widen_bf16(_mm256_maskz_loadu_epi16(mask, x[i] + d));
    for (int k = 0; k < Ranks; ++k) {
      if (d % 32 == 0)  // one prefetch per 64-byte line
        _mm_prefetch(reinterpret_cast<const char*>(a + k * a_stride + d) + kShrinkPrefetchBytes, _MM_HINT_T1);
      const __m512 av = widen_bf16(_mm256_maskz_loadu_epi16(mask, a + k * a_stride + d));
      for (int i = 0; i < Tokens; ++i) acc[i][k] = _mm512_fmadd_ps(xv[i], av, acc[i][k]);
    }
  }
  for (int i = 0; i < Tokens; ++i)
    for (int k = 0; k < Ranks; ++k) h[i * h_stride + k] += _mm512_reduce_add_ps(acc[i][k]);
}

template <int Tokens, int Ranks>
__attribute__((target("avx512bf16"))) void shrink_bf16_dot(const void* const* x_rows, const void* a_rows,
                                                         int64_t a_stride, int64_t d_in, float* h,
                                                         int64_t h_stride) {
  const uint16_t* x[Tokens];
  for (int i = 0; i < Tokens; ++i) x[i] = static_cast<const uint16_t*>(x_rows[i]);
  const uint16_t* a = static_cast<const uint16_t*>(a_rows);
  __m512 acc[Tokens][Ranks];
  for (int i = 0; i < Tokens; ++i)
    for (int k = 0; k < Ranks; ++k) acc[i][k] = _mm512_setzero_ps();
  for (int64_t d = 0; d < d_in; d += 32) {
    const __mmask32 mask = low_mask32(d_in - d);
    __m512i xv[Tokens];
    for (int i = 0; i < Tokens; ++i) xv[i] = _mm512_maskz_loadu_epi16(mask, x[i] + d);
    for (int k = 0; k < Ranks; ++k) {
      _mm_prefetch(reinterpret_cast<const char*>(a + k * a_stride + d) + kShrinkPrefetchBytes, _MM_HINT_T1);
      const __m512i av = _mm512_maskz_loadu_epi16(mask, a + k * a_stride + d);
      for (int i = 0; i < Tokens; ++i)
        acc[i][k] = _mm512_dpbf16_ps(acc[i][k], (__m512bh)xv[i], (__m512bh)av);
    }
  }
  for (int i = 0; i < Tokens; ++i)
    for (int k = 0; k < Ranks; ++k) h[i * h_stride + k] += _mm512_reduce_add_ps(acc[i][k]);
}

using ShrinkTile = void (*)(const void* const*, const void*, int64_t, int64_t, float*, int64_t);

// Tables of all (tokens, ranks) tile shapes of one kernel template, indexed [tokens-1][ranks-1].
#define LOLA_SHRINK_ROW(kernel, tokens) \
  {&kernel<tokens, 1>, &kernel<tokens, 2>, &kernel<tokens, 3>, &kernel<tokens, 4>, &kernel<tokens, 5>, &kernel<tokens, 6>}
#define LOLA_SHRINK_TABLE(name, kernel)                                                     \
  const ShrinkTile name[kShrinkTokens][kShrinkRanks] = {                                    \
      LOLA_SHRINK_ROW(kernel, 1), LOLA_SHRINK_ROW(kernel, 2), LOLA_SHRINK_ROW(kernel, 3), \
      LOLA_SHRINK_ROW(kernel, 4)};

LOLA_SHRINK_TABLE(kShrinkF32, shrink_f32)
LOLA_SHRINK_TABLE(kShrinkBf16Widen, shrink_bf16_widen)
LOLA_SHRINK_TABLE(kShrinkBf16Dot, shrink_bf16_dot)

void shrink_f32_any(const void* const* x_rows, const void* a_rows, int64_t a_stride, int64_t d_in, int num_tokens,
                    int num_ranks, float* h, int64_t h_stride) {
  kShrinkF32[num_tokens - 1][num_ranks - 1](x_rows, a_rows, a_stride, d_in, h, h_stride);
}
void shrink_bf16_widen_any(const void* const* x_rows, const void* a_rows, int64_t a_stride, int64_t d_in, int num_tokens,
                           int num_ranks, float* h, int64_t h_stride) {
  kShrinkBf16Widen[num_tokens - 1][num_ranks - 1](x_rows, a_rows, a_stride, d_in, h, h_stride);
}
void shrink_bf16_dot_any(const void* const* x_rows, const void* a_rows, int64_t a_stride, int64_t d_in, int num_tokens,
                         int num_ranks, float* h, int64_t h_stride) {
  kShrinkBf16Dot[num_tokens - 1][num_ranks - 1](x_rows, a_rows, a_stride, d_in, h, h_stride);
}

// fp32 -> bf16 as narrow_to_bf16 with VCVTNEPS2BF16, on CPUs with AVX512-BF16. The instruction
// rounds to nearest even and quiets NaNs the same way, but flushes fp32 denormals to zero, so a
// vector holding one takes narrow_to_bf16 instead. One conversion where narrow_to_bf16 takes
// nine operations, several of them on the ports the products need: in the epilogue of a 6-token
// expand tile that is 8% of the tile's time at R = 64 and 15% at R = 16. Inline assembly, so that
// the shared row-expand template can call it without an avx512bf16 target of its own.
inline __m256i narrow_to_bf16_native(__m512 values) {
  __mmask16 denormal;
  asm("vfpclassps $0x20, %1, %0" : "=k"(denormal) : "v"(values));
  if (__builtin_expect(denormal != 0, 0)) return narrow_to_bf16(values);
  __m256i narrowed;
  asm("vcvtneps2bf16 %1, %0" : "=v"(narrowed) : "v"(values));
  return narrowed;
}

// How a kernel rounds its fp32 sums into an output row: an fp32 row; bf16 in software; bf16 with
// VCVTNEPS2BF16 (the kernels that only run where the CPU has AVX512-BF16).
enum class OutRow { Float32, Bf16, Bf16Native };

// Adds 16 fp32 sums (the first num_cols of them) into an output row of the op's dtype.
template <OutRow Kind>
inline void add_sums_to_row(void* out_row, __m512 sums, int num_cols) {
  const __mmask16 mask = low_mask16(num_cols);
  if constexpr (Kind != OutRow::Float32) {
    uint16_t* out = static_cast<uint16_t*>(out_row);
    const __m512 sum = _mm512_add_ps(widen_bf16(_mm256_maskz_loadu_epi16(mask, out)), sums);
    _mm256_mask_storeu_epi16(out, mask,
                             Kind == OutRow::Bf16Native ? narrow_to_bf16_native(sum) : narrow_to_bf16(sum));
  } else {
    float* out = static_cast<float*>(out_row);
    _mm512_mask_storeu_ps(out, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), sums));
  }
}

// Adds a tile's 32-column sums into its output rows (one rounding).
template <int Tokens, OutRow Kind>
inline void add_tile_to_rows(__m512 (&acc)[Tokens][2], void* const* out_rows, int num_cols) {
  const int element_size = Kind == OutRow::Float32 ? 4 : 2;
  for (int i = 0; i < Tokens; ++i) {
    add_sums_to_row<Kind>(out_rows[i], acc[i][0], num_cols);
    if (num_cols > 16) add_sums_to_row<Kind>(static_cast<char*>(out_rows[i]) + 16 * element_size, acc[i][1], num_cols - 16);
  }
}

template <int Tokens, bool Bf16>
void expand_tile(const void* g_rows, int64_t g_stride, const void* panel_data, int64_t rank, void* const* out_rows,
                 int num_cols) {
  const float* g = static_cast<const float*>(g_rows);
  const float* panel = static_cast<const float*>(panel_data);
  __m512 acc[Tokens][2];
  for (int i = 0; i < Tokens; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < rank; ++k) {
    const __m512 low = _mm512_loadu_ps(panel + k * kExpandCols);
    const __m512 high = _mm512_loadu_ps(panel + k * kExpandCols + 16);
    for (int i = 0; i < Tokens; ++i) {
      const __m512 coefficient = _mm512_set1_ps(g[i * g_stride + k]);
      acc[i][0] = _mm512_fmadd_ps(coefficient, low, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(coefficient, high, acc[i][1]);
    }
  }
  add_tile_to_rows<Tokens, Bf16 ? OutRow::Bf16 : OutRow::Float32>(acc, out_rows, num_cols);
}

// bf16 pairs: per pair of ranks, one VDPBF16PS of the token's (g[k], g[k + 1]) with 32 columns'
// pairs of lora_b, so a rank step costs half the instructions of the fp32 tile.
template <int Tokens>
__attribute__((target("avx512bf16"))) void expand_tile_dot(const void* g_rows, int64_t g_stride,
                                                          const void* panel_data, int64_t rank,
                                                          void* const* out_rows, int num_cols) {
  const uint16_t* g = static_cast<const uint16_t*>(g_rows);
  const uint32_t* panel = static_cast<const uint32_t*>(panel_data);
  __m512 acc[Tokens][2];
  for (int i = 0; i < Tokens; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t pair = 0; pair < (rank + 1) / 2; ++pair) {
    const __m512i low = _mm512_loadu_si512(panel + pair * kExpandCols);
    const __m512i high = _mm512_loadu_si512(panel + pair * kExpandCols + 16);
    for (int i = 0; i < Tokens; ++i) {
      int32_t both;
      __builtin_memcpy(&both, g + i * g_stride + 2 * pair, sizeof(both));
      const __m512i coefficients = _mm512_set1_epi32(both);
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)low, (__m512bh)coefficients);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)high, (__m512bh)coefficients);
    }
  }
  add_tile_to_rows<Tokens, OutRow::Bf16Native>(acc, out_rows, num_cols);
}

using ExpandTile = void (*)(const void*, int64_t, const void*, int64_t, void* const*, int);

template <bool Bf16>
void expand_any(const void* g, int64_t g_stride, const void* panel, int64_t rank, void* const* out_rows,
                int num_tokens, int num_cols) {
  static const ExpandTile kTiles[kExpandTokens] = {
      &expand_tile<1, Bf16>, &expand_tile<2, Bf16>, &expand_tile<3, Bf16>,
      &expand_tile<4, Bf16>, &expand_tile<5, Bf16>, &expand_tile<6, Bf16>};
  kTiles[num_tokens - 1](g, g_stride, panel, rank, out_rows, num_cols);
}

void expand_dot_any(const void* g, int64_t g_stride, const void* panel, int64_t rank, void* const* out_rows,
                    int num_tokens, int num_cols) {
  static const ExpandTile kTiles[kExpandTokens] = {&expand_tile_dot<1>, &expand_tile_dot<2>, &expand_tile_dot<3>,
                                                   &expand_tile_dot<4>, &expand_tile_dot<5>, &expand_tile_dot<6>};
  kTiles[num_tokens - 1](g, g_stride, panel, rank, out_rows, num_cols);
}

template <bool Bf16>
inline __m512 load_row_chunk(const void* rows, int64_t index, __mmask16 mask) {
  if constexpr (Bf16) {
    return widen_bf16(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(rows) + index));
  } else {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(rows) + index);
  }
}

// The first three levels of sum_lanes_of_16: per 128-bit lane of halves[i], the sums of
// v[8i .. 8i+3] over 128-bit lanes 0-1 (dwords 0-7), then over lanes 2-3 (dwords 8-15), then the
// same of v[8i+4 .. 8i+7].
inline void sum_lane_halves_of_16(const __m512 (&v)[16], __m512 (&halves)[2]) {
  __m512 pairs[8];  // per 128-bit lane: partial sums of v[2i], v[2i+1], v[2i], v[2i+1]
  for (int i = 0; i < 8; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  __m512 quads[4];  // per 128-bit lane: that lane's sums of v[4i .. 4i + 3]
  for (int i = 0; i < 4; ++i) {
    const __m512d low = _mm512_castps_pd(pairs[2 * i]), high = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(low, high)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(low, high)));
  }
  for (int i = 0; i < 2; ++i)
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xdd));
}

// sums[j] = the sum of the 16 lanes of v[j], for j < 16. A tree of interleaves halves the
// vectors at each level (15 adds, 30 shuffles), where 16 separate horizontal sums would take 64
// dependent shuffle-add pairs.
inline __m512 sum_lanes_of_16(const __m512 (&v)[16]) {
  __m512 halves[2];
  sum_lane_halves_of_16(v, halves);
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                       _mm512_shuffle_f32x4(halves[0], halves[1], 0xdd));
}

// One fp32 step of a lora_b row: 16 ranks from k, widened from bf16 when the op is bf16.
template <bool Bf16>
struct RowStepF32 {
  using Mask = __mmask16;
  static constexpr int64_t kRanks = 16;
  static constexpr int64_t kGElementSize = 4;
  static constexpr int64_t kOutElementSize = Bf16 ? 2 : 4;
  static constexpr OutRow kOutRow = Bf16 ? OutRow::Bf16 : OutRow::Float32;
  static Mask mask(int64_t remaining) { return low_mask16(remaining); }
  static __m512 load_g(const void* g, int64_t k, Mask mask) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(g) + k);
  }
  static __m512 fma(const void* b_row, int64_t k, Mask mask, __m512 g, __m512 acc) {
    return _mm512_fmadd_ps(load_row_chunk<Bf16>(b_row, k, mask), g, acc);
  }
};

// One VDPBF16PS step: 32 ranks of a bf16 lora_b row against bf16 g, summed in pairs. Written as
// inline assembly so that the shared row-expand template needs no avx512bf16 target of its own
// (GCC will not inline a target-specific step into it); the table hands this step out only when
// the CPU has AVX512-BF16.
struct RowStepBf16Dot {
  using Mask = __mmask32;
  static constexpr int64_t kRanks = 32;
  static constexpr int64_t kGElementSize = 2;
  static constexpr int64_t kOutElementSize = 2;
  static constexpr OutRow kOutRow = OutRow::Bf16Native;
  static Mask mask(int64_t remaining) { return low_mask32(remaining); }
  static __m512 load_g(const void* g, int64_t k, Mask mask) {
    return _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(g) + k));
  }
  static __m512 fma(const void* b_row, int64_t k, Mask mask, __m512 g, __m512 acc) {
    const __m512i row = _mm512_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(b_row) + k);
    asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(row), "v"(g));
    return acc;
  }
};

// acc[j] += row j (its first `rank` elements) ⊙ g, lane-wise, for j < cols (≤ 16); rows lie
// row_length elements apart (lora_b's rows: row_length = rank; Σ's: rank, over true_rank). Steps
// > 0 is the number of rank steps known at compile time (g held in registers, everything
// unrolled); Steps = 0 walks any rank.
template <typename Step, int Steps>
__attribute__((always_inline)) inline void row_products(const char* rows, int64_t row_length, int64_t rank, int cols,
                                                        const void* g, __m512 (&acc)[16]) {
  const int64_t row_bytes = row_length * Step::kOutElementSize;
  if constexpr (Steps > 0) {
    __m512 g_steps[Steps];
    typename Step::Mask masks[Steps];
    for (int s = 0; s < Steps; ++s) {
      masks[s] = Step::mask(rank - s * Step::kRanks);
      g_steps[s] = Step::load_g(g, s * Step::kRanks, masks[s]);
    }
    // Unrolled over the 16 columns so that every acc[j] is a register, not a stack slot.
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (j >= cols) break;
      for (int s = 0; s < Steps; ++s)
        acc[j] = Step::fma(rows + j * row_bytes, s * Step::kRanks, masks[s], g_steps[s], acc[j]);
    }
  } else {
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (j >= cols) break;
      for (int64_t k = 0; k < rank; k += Step::kRanks) {
        const typename Step::Mask mask = Step::mask(rank - k);
        acc[j] = Step::fma(rows + j * row_bytes, k, mask, Step::load_g(g, k, mask), acc[j]);
      }
    }
  }
}

// Row expand: each lora_b row j (contiguous in k) is multiplied lane-wise with the token's g into
// its own accumulator, row by row so the reads run through lora_b in address order, and 16
// columns' accumulators are summed across lanes together. Tokens are taken one at a time so the
// 16 accumulators stay in registers; the second token rereads the columns' rows from L1.
template <typename Step, int Steps>
void expand_rows_tree(const void* g_rows, int64_t g_stride, const void* b_rows, int64_t rank, void* const* out_rows,
                      int num_tokens, int num_cols) {
  const auto* b = static_cast<const char*>(b_rows);
  const int64_t block_bytes = 16 * rank * Step::kOutElementSize;
  for (int j0 = 0; j0 < num_cols; j0 += 16) {
    const int cols = num_cols - j0 < 16 ? num_cols - j0 : 16;
    const char* rows = b + j0 * rank * Step::kOutElementSize;
    // The rows a few blocks on (past this item too: the planner hands a thread its row items in
    // lora_b's address order) are fetched into L2 now; a decode batch reads each row once, so
    // these reads are the whole cost.
    for (int64_t line = 0; line < block_bytes; line += 64)
      _mm_prefetch(rows + kRowPrefetchBlocks * block_bytes + line, _MM_HINT_T1);
    for (int i = 0; i < num_tokens; ++i) {
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      row_products<Step, Steps>(rows, rank, rank, cols, static_cast<const char*>(g_rows) + i * g_stride * Step::kGElementSize,
                                acc);
      add_sums_to_row<Step::kOutRow>(static_cast<char*>(out_rows[i]) + j0 * Step::kOutElementSize,
                                     sum_lanes_of_16(acc), cols);
    }
  }
}

// The row expand of two tokens with bf16 pairs at rank <= 16, where a lora_b row (at most 16
// bf16, 32 bytes) fills half a VDPBF16PS operand: the row goes into both 256-bit halves and the
// two tokens' g into the two halves of the other operand, so one instruction and one load serve
// both tokens, and the tree stops a level early, where the dwords 0-7 (the first token) and 8-15
// (the second) of every column are summed apart. Half the loads, products and shuffles of two
// calls of expand_rows_tree for the same sums: at bf16 C = 8, R = 16, T = 16 the expand took 59 µs
// cold against 37 µs for the shrink over as many bytes, and 51 µs this way (A/B in one process).
__attribute__((target("avx512bf16"))) void expand_rows_bf16_two_tokens(const void* g_rows, int64_t g_stride,
                                                                       const void* b_rows, int64_t rank,
                                                                       void* const* out_rows, int num_cols) {
  const auto* g = static_cast<const uint16_t*>(g_rows);
  const __mmask16 rank_mask = low_mask16(rank);
  const __m512i both_g = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_maskz_loadu_epi16(rank_mask, g)),
                                            _mm256_maskz_loadu_epi16(rank_mask, g + g_stride), 1);
  const auto* b = static_cast<const char*>(b_rows);
  const int64_t row_bytes = rank * 2;
  const int64_t block_bytes = 16 * row_bytes;
  for (int j0 = 0; j0 < num_cols; j0 += 16) {
    const int cols = num_cols - j0 < 16 ? num_cols - j0 : 16;
    const char* rows = b + j0 * row_bytes;
    for (int64_t line = 0; line < block_bytes; line += 64)
      _mm_prefetch(rows + kRowPrefetchBlocks * block_bytes + line, _MM_HINT_T1);
    __m512 acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      acc[j] = _mm512_setzero_ps();
      if (j < cols) {
        const __m512i row = _mm512_broadcast_i64x4(_mm256_maskz_loadu_epi16(rank_mask, rows + j * row_bytes));
        acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)row, (__m512bh)both_g);
      }
    }
    __m512 halves[2];
    sum_lane_halves_of_16(acc, halves);
    add_sums_to_row<OutRow::Bf16Native>(static_cast<char*>(out_rows[0]) + j0 * 2,
                                        _mm512_shuffle_f32x4(halves[0], halves[1], 0x88), cols);
    add_sums_to_row<OutRow::Bf16Native>(static_cast<char*>(out_rows[1]) + j0 * 2,
                                        _mm512_shuffle_f32x4(halves[0], halves[1], 0xdd), cols);
  }
}

// The row expand for any rank, with the rank steps unrolled up to four.
template <typename Step>
void expand_rows_any(const void* g, int64_t g_stride, const void* b_rows, int64_t rank, void* const* out_rows,
                     int num_tokens, int num_cols) {
  using Kernel = void (*)(const void*, int64_t, const void*, int64_t, void* const*, int, int);
  static const Kernel kByRankSteps[5] = {&expand_rows_tree<Step, 0>, &expand_rows_tree<Step, 1>,
                                         &expand_rows_tree<Step, 2>, &expand_rows_tree<Step, 3>,
                                         &expand_rows_tree<Step, 4>};
  const int64_t steps = (rank + Step::kRanks - 1) / Step::kRanks;
  kByRankSteps[steps <= 4 ? steps : 0](g, g_stride, b_rows, rank, out_rows, num_tokens, num_cols);
}

// g = Σ h for one adapter's full Σ ([rank, rank] rows, columns past true_rank ignored): the row
// expand's products, 16 rows of Σ at a time against h, and the 16 sums taken together by
// sum_lanes_of_16 (one horizontal sum per row cost ~4x as many shuffles; at T = 256, R = 64 that
// was 50-80 us of the call).
template <bool Bf16>
void sigma_full(const void* sigma_rows, const float* h, int64_t rank, int64_t true_rank, float* g) {
  const auto* rows = static_cast<const char*>(sigma_rows);
  for (int64_t j0 = 0; j0 < rank; j0 += 16) {
    const int count = rank - j0 < 16 ? static_cast<int>(rank - j0) : 16;
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    row_products<RowStepF32<Bf16>, 0>(rows + j0 * rank * RowStepF32<Bf16>::kOutElementSize, rank, true_rank, count, h,
                                      acc);
    _mm512_mask_storeu_ps(g + j0, low_mask16(count), sum_lanes_of_16(acc));
  }
}

// Adds a tile's accumulators into h (first num_ranks of each token's row).
template <int Tokens, int Vecs>
inline void add_to_h(__m512 (&acc)[Tokens][Vecs], int num_ranks, float* h, int64_t h_stride) {
  for (int i = 0; i < Tokens; ++i)
    for (int v = 0; v < Vecs; ++v) {
      const __mmask16 mask = low_mask16(num_ranks - 16 * v);
      float* row = h + i * h_stride + 16 * v;
      _mm512_mask_storeu_ps(row, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, row), acc[i][v]));
    }
}

inline __m512 broadcast_as_f32(const float* x, int64_t d) { return _mm512_set1_ps(x[d]); }
inline __m512 broadcast_as_f32(const uint16_t* x, int64_t d) {
  return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(x[d]) << 16)));
}

// fp32 panel rows: per d, Vecs loads of 16 ranks and one broadcast per token feed Tokens × Vecs FMAs.
template <int Tokens, int Vecs, typename XElement>
void shrink_packed_f32(const void* const* x_rows, const void* panel_data, int64_t stride, int64_t length,
                       int num_ranks, float* h, int64_t h_stride) {
  const XElement* x[Tokens];
  for (int i = 0; i < Tokens; ++i) x[i] = static_cast<const XElement*>(x_rows[i]);
  const float* panel = static_cast<const float*>(panel_data);
  __m512 acc[Tokens][Vecs];
  for (int i = 0; i < Tokens; ++i)
    for (int v = 0; v < Vecs; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < length; ++d) {
    __m512 ranks[Vecs];
    for (int v = 0; v < Vecs; ++v) ranks[v] = _mm512_loadu_ps(panel + d * stride + 16 * v);
    for (int i = 0; i < Tokens; ++i) {
      const __m512 xv = broadcast_as_f32(x[i], d);
      for (int v = 0; v < Vecs; ++v) acc[i][v] = _mm512_fmadd_ps(xv, ranks[v], acc[i][v]);
    }
  }
  add_to_h<Tokens, Vecs>(acc, num_ranks, h, h_stride);
}

// One pair row of the panel times every token's broadcast pair.
template <int Tokens, int Vecs>
__attribute__((target("avx512bf16"), always_inline)) inline void packed_bf16_step(const uint16_t* pair_row,
                                                                                 const __m512i (&pairs)[Tokens],
                                                                                 __m512 (&acc)[Tokens][Vecs]) {
  for (int v = 0; v < Vecs; ++v) {
    const __m512i ranks = _mm512_loadu_si512(pair_row + 32 * v);
    for (int i = 0; i < Tokens; ++i) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)ranks, (__m512bh)pairs[i]);
  }
}

// bf16 pairs: per pair of d, one VDPBF16PS of the token's (x[d], x[d + 1]) with 16 ranks' pairs.
template <int Tokens, int Vecs>
__attribute__((target("avx512bf16"))) void shrink_packed_bf16_dot(const void* const* x_rows, const void* panel_data,
                                                                 int64_t stride, int64_t length, int num_ranks,
                                                                 float* h, int64_t h_stride) {
  const uint16_t* x[Tokens];
  for (int i = 0; i < Tokens; ++i) x[i] = static_cast<const uint16_t*>(x_rows[i]);
  const uint16_t* panel = static_cast<const uint16_t*>(panel_data);
  __m512 acc[Tokens][Vecs];
  for (int i = 0; i < Tokens; ++i)
    for (int v = 0; v < Vecs; ++v) acc[i][v] = _mm512_setzero_ps();
  const int64_t even = length & ~int64_t{1};
  for (int64_t d = 0; d < even; d += 2) {
    __m512i pairs[Tokens];  // (x[d], x[d + 1]) as one dword, broadcast
    for (int i = 0; i < Tokens; ++i) {
      int32_t both;
      __builtin_memcpy(&both, x[i] + d, sizeof(both));
      pairs[i] = _mm512_set1_epi32(both);
    }
    packed_bf16_step<Tokens, Vecs>(panel + d * stride, pairs, acc);
  }
  if (even < length) {  // an odd chunk ends with x[d] alone; the panel's pair is zero past d_in
    __m512i pairs[Tokens];
    for (int i = 0; i < Tokens; ++i) pairs[i] = _mm512_set1_epi32(x[i][even]);
    packed_bf16_step<Tokens, Vecs>(panel + even * stride, pairs, acc);
  }
  add_to_h<Tokens, Vecs>(acc, num_ranks, h, h_stride);
}

using PackedTile = void (*)(const void* const*, const void*, int64_t, int64_t, int, float*, int64_t);

#define LOLA_PACKED_ROW(tokens, ...) \
  {&__VA_ARGS__<tokens, 1>, &__VA_ARGS__<tokens, 2>, &__VA_ARGS__<tokens, 3>, &__VA_ARGS__<tokens, 4>}
#define LOLA_PACKED_TABLE(name, ...)                                                             \
  const PackedTile name[kPackedTokens][kPackedRanks / 16] = {                                    \
      LOLA_PACKED_ROW(1, __VA_ARGS__), LOLA_PACKED_ROW(2, __VA_ARGS__), LOLA_PACKED_ROW(3, __VA_ARGS__), \
      LOLA_PACKED_ROW(4, __VA_ARGS__), LOLA_PACKED_ROW(5, __VA_ARGS__), LOLA_PACKED_ROW(6, __VA_ARGS__)};

template <int Tokens, int Vecs>
void shrink_packed_f32_x32(const void* const* x_rows, const void* panel, int64_t stride, int64_t length, int num_ranks,
                           float* h, int64_t h_stride) {
  shrink_packed_f32<Tokens, Vecs, float>(x_rows, panel, stride, length, num_ranks, h, h_stride);
}
template <int Tokens, int Vecs>
void shrink_packed_f32_x16(const void* const* x_rows, const void* panel, int64_t stride, int64_t length, int num_ranks,
                           float* h, int64_t h_stride) {
  shrink_packed_f32<Tokens, Vecs, uint16_t>(x_rows, panel, stride, length, num_ranks, h, h_stride);
}

LOLA_PACKED_TABLE(kPackedF32, shrink_packed_f32_x32)
LOLA_PACKED_TABLE(kPackedBf16Widen, shrink_packed_f32_x16)
LOLA_PACKED_TABLE(kPackedBf16Dot, shrink_packed_bf16_dot)

template <const PackedTile (&Table)[kPackedTokens][kPackedRanks / 16]>
void shrink_packed_any(const void* const* x_rows, const void* panel, int64_t stride, int64_t length, int num_tokens,
                       int num_ranks, float* h, int64_t h_stride) {
  Table[num_tokens - 1][(num_ranks + 15) / 16 - 1](x_rows, panel, stride, length, num_ranks, h, h_stride);
}

// Transposes 16 rows of 16 dwords in place: three rounds of interleaves, each doubling the size of
// the transposed sub-blocks (1 -> 2 dwords, 2 -> 4, 4 -> 8 and 8 -> 16 across 128-bit lanes).
inline void transpose_16x16(__m512i (&v)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    v[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    v[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    v[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    v[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // v[4q + j] now holds column j of every 4-row quarter q, one 128-bit lane per 4-column group.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(v[i], v[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(v[i], v[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_i32x4(v[8 + i], v[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(v[8 + i], v[12 + i], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    v[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    v[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
  }
}

inline uint32_t load_word(const char* row, int64_t c, bool widen_bf16) {
  if (widen_bf16) {
    uint16_t bits;
    __builtin_memcpy(&bits, row + 2 * c, sizeof(bits));
    return static_cast<uint32_t>(bits) << 16;
  }
  uint32_t word;
  __builtin_memcpy(&word, row + 4 * c, sizeof(word));
  return word;
}

void transpose(const void* src, int64_t src_row_bytes, bool widen_bf16, int64_t rows, int64_t cols, uint32_t* dst,
               int64_t dst_stride) {
  const auto* bytes = static_cast<const char*>(src);
  const int64_t full_rows = rows & ~int64_t{15}, full_cols = cols & ~int64_t{15};
  for (int64_t r0 = 0; r0 < full_rows; r0 += 16) {
    for (int64_t c0 = 0; c0 < full_cols; c0 += 16) {
      __m512i block[16];
      for (int i = 0; i < 16; ++i) {
        const char* row = bytes + (r0 + i) * src_row_bytes;
        block[i] = widen_bf16 ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                                      reinterpret_cast<const __m256i*>(row + 2 * c0))), 16)
                              : _mm512_loadu_si512(row + 4 * c0);
      }
      transpose_16x16(block);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (c0 + i) * dst_stride + r0, block[i]);
    }
  }
  // Edges past the last whole 16 x 16 block, one word at a time.
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = bytes + r * src_row_bytes;
    for (int64_t c = r < full_rows ? full_cols : 0; c < cols; ++c) dst[c * dst_stride + r] = load_word(row, c, widen_bf16);
  }
}

}  // namespace

// The bf16-pair row expand: two tokens at rank <= 16 share their loads and products.
void expand_rows_bf16_dot(const void* g, int64_t g_stride, const void* b_rows, int64_t rank, void* const* out_rows,
                          int num_tokens, int num_cols) {
  if (num_tokens == 2 && rank > 0 && rank <= 16)
    expand_rows_bf16_two_tokens(g, g_stride, b_rows, rank, out_rows, num_cols);
  else
    expand_rows_any<RowStepBf16Dot>(g, g_stride, b_rows, rank, out_rows, num_tokens, num_cols);
}

MicroKernels avx512_kernels(bool bf16, bool native_bf16_dot) {
  if (!bf16)
    return {&shrink_f32_any, &expand_any<false>, &expand_rows_any<RowStepF32<false>>, &sigma_full<false>,
            &shrink_packed_any<kPackedF32>, PanelLayout::Float32Rows, &transpose};
  if (native_bf16_dot)
    return {&shrink_bf16_dot_any, &expand_dot_any, &expand_rows_bf16_dot, &sigma_full<true>,
            &shrink_packed_any<kPackedBf16Dot>, PanelLayout::Bf16Pairs, &transpose};
  return {&shrink_bf16_widen_any, &expand_any<true>, &expand_rows_any<RowStepF32<true>>, &sigma_full<true>,
          &shrink_packed_any<kPackedBf16Widen>, PanelLayout::Float32Rows, &transpose};
}

}  // namespace lola::cpu
