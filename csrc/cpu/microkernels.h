// Tile kernels behind the CPU shared-basis LoRA op. Each ISA provides the same two entry points
// on raw pointers; the planner in shared_basis_lora.cpp picks the table at run time, so the
// AVX-512 translation unit is the only code compiled with AVX-512 enabled.
#pragma once
#include <cstdint>

namespace lola::cpu {

// Largest tiles any ISA asks for; the planner cuts work into tiles of at most this size.
constexpr int kShrinkTokens = 4;   // tokens per shrink tile
constexpr int kShrinkRanks = 6;    // ranks per shrink tile
constexpr int kExpandTokens = 6;   // tokens per expand tile
constexpr int kExpandCols = 32;    // output columns per expand tile (packed panel width)
// d_in chunk of the shrink: a tile of x rows (4 × 1024 fp32 = 16 KiB) stays in L1 while every
// rank tile of the chunk passes over it, and lora_a's chunk (R × 4 KiB) stays in L2.
constexpr int64_t kShrinkChunk = 1024;
// Groups of at most kRowExpandGroupTokens tokens (multi-LoRA decode, one adapter per token; a
// batch spread over several clusters) expand straight from lora_b's rows, kRowExpandTokens tokens
// a call: below that size transposing a panel costs more than it saves, and the row items read
// lora_b in address order (with 8 clusters of 4-6 tokens each, 15-30% less time than panels, of
// 8 tokens 2-10%; a single group of 12-16 tokens is 5-10% faster on panels).
constexpr int kRowExpandTokens = 2;
constexpr int kRowExpandGroupTokens = 8;

// Packed shrink, for clusters with at least kPackedShrinkMinTokens tokens in the batch: lora_a[c]
// is transposed once per call into a panel with d as rows (ranks contiguous, padded to 16), so a
// tile is an outer-product update like the expand's (one vector of ranks feeds one FMA per token,
// no horizontal sums) and a d_in chunk of the panel stays in L2 across a thread's token tiles.
constexpr int kPackedTokens = 6;         // tokens per packed-shrink tile
constexpr int kPackedRanks = 64;         // ranks per packed-shrink tile (4 vectors)
// From 16 tokens the packed tiles beat the dot-product ones (4-8% of the call at R = 64, T = 16,
// cold); at 8-12 the transpose costs about what it saves.
constexpr int kPackedShrinkMinTokens = 16;

// How a packed panel stores panel(d, k) = lora_a[c, k, d], with `stride` ranks (a multiple of 16):
//   Float32Rows: fp32 panel[d * stride + k];
//   Bf16Pairs:   bf16 panel[(d / 2) * 2 * stride + 2 * k + d % 2], the operand layout of VDPBF16PS
//                (zero past d_in when d_in is odd).
// Bf16Pairs also means the expand runs on VDPBF16PS: g is rounded to bf16 first, as PEFT rounds
// its rank-r intermediate in bf16.
enum class PanelLayout : int { Float32Rows = 0, Bf16Pairs = 1 };

struct MicroKernels {
  // h[i * h_stride + k] += Σ_{d < length} x_rows[i][d] · a_rows[k * a_stride + d]
  // for i < num_tokens (≤ kShrinkTokens), k < num_ranks (≤ kShrinkRanks): one d_in chunk.
  void (*shrink)(const void* const* x_rows, const void* a_rows, int64_t a_stride, int64_t length,
                 int num_tokens, int num_ranks, float* h, int64_t h_stride);
  // out_rows[i][j] += Σ_k g[i * g_stride + k] · panel(k, j), one rounding, for i < num_tokens
  // (≤ kExpandTokens), j < num_cols (≤ kExpandCols). With Float32Rows g is fp32 and the panel is
  // fp32 panel[k * kExpandCols + j]; with Bf16Pairs g is bf16 (an even g_stride, zero past rank)
  // and the panel holds bf16 pairs, word (k / 2) * kExpandCols + j = (lora_b[j, k], lora_b[j, k + 1]).
  void (*expand)(const void* g, int64_t g_stride, const void* panel, int64_t rank,
                 void* const* out_rows, int num_tokens, int num_cols);
  // out_rows[i][j] += Σ_k g[i * g_stride + k] · b_rows[j * rank + k], one rounding,
  // for i < num_tokens (≤ kRowExpandTokens), j < num_cols (≤ kExpandCols); b_rows in the op's
  // dtype, g as for expand.
  void (*expand_rows)(const void* g, int64_t g_stride, const void* b_rows, int64_t rank, void* const* out_rows,
                      int num_tokens, int num_cols);
  // g[j] = Σ_{k < true_rank} sigma_rows[j * rank + k] · h[k] for j < rank (one adapter's full Σ).
  void (*sigma_full)(const void* sigma_rows, const float* h, int64_t rank, int64_t true_rank, float* g);
  // h[i * h_stride + k] += Σ_{d < length} x_rows[i][d] · panel(d, k) for i < num_tokens
  // (≤ kPackedTokens), k < num_ranks (≤ kPackedRanks); `panel` points at panel(0, 0) of the chunk
  // (an even d for Bf16Pairs) and the tile's first rank.
  void (*shrink_packed)(const void* const* x_rows, const void* panel, int64_t stride, int64_t length,
                        int num_tokens, int num_ranks, float* h, int64_t h_stride);
  PanelLayout panel_layout;
  // dst[c * dst_stride + r] = src(r, c) for r < rows, c < cols: row r of src starts at
  // src + r * src_row_bytes and holds 32-bit words, or bf16 values widened to fp32 when
  // widen_bf16. Packs the shrink and expand panels; the AVX-512 one moves 16 × 16 blocks
  // through registers instead of one strided store per element.
  void (*transpose)(const void* src, int64_t src_row_bytes, bool widen_bf16, int64_t rows, int64_t cols,
                    uint32_t* dst, int64_t dst_stride);
};

MicroKernels scalar_kernels(bool bf16);
MicroKernels avx512_kernels(bool bf16, bool native_bf16_dot);

}  // namespace lola::cpu
