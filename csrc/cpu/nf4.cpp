// Planner for the CPU nf4 ops: splits the work over threads and picks the kernel table.
// See nf4.h for the contract.
#include "nf4.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/bf16.h"
#include "microkernels.h"
#include "nf4_kernels.h"

namespace lola::cpu {
namespace {

Nf4Kernels kernels_for(Isa isa) {
  return isa == Isa::Scalar ? nf4_scalar_kernels() : nf4_avx512_kernels(isa == Isa::Avx512Bf16);
}

// The fp32 tile kernels of the shared-basis op: the LoRA shrink and the lora_b panel transpose.
MicroKernels lora_kernels_for(Isa isa) { return isa == Isa::Scalar ? scalar_kernels(false) : avx512_kernels(false, false); }

int64_t element_size(Nf4Element type) { return type == Nf4Element::Float32 ? 4 : 2; }

bool is_power_of_two(int64_t value) { return value > 0 && (value & (value - 1)) == 0; }

// Weight rows a work item decodes into one tile: the tile (rows × kp) stays within ~256 KiB of L2.
int64_t tile_rows_for(int64_t kp, Nf4Element compute) {
  const int64_t budget = int64_t{256} * 1024 / (kp * element_size(compute));
  return std::clamp<int64_t>(budget / kNf4TileRows * kNf4TileRows, kNf4TileRows, 64);
}

float element_as_float(const void* data, int64_t index, Nf4Element type) {
  return type == Nf4Element::BFloat16 ? bf16_to_float(static_cast<const uint16_t*>(data)[index])
                                      : static_cast<const float*>(data)[index];
}

}  // namespace

std::string nf4_dequantize(const Nf4Storage& weight, int64_t begin, int64_t count, void* out, Nf4Element out_type,
                           Isa isa, int num_threads) {
  if (count <= 0) return "";
  const Nf4Kernels kernels = kernels_for(isa);
  // Chunks start at even elements so that every chunk but the first begins on a byte.
  constexpr int64_t kChunk = int64_t{1} << 16;
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  char* target = static_cast<char*>(out);
  const int64_t size = element_size(out_type);
#pragma omp parallel for schedule(static) num_threads(std::max(1, num_threads)) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t offset = c * kChunk;
    kernels.dequantize(weight, begin + offset, std::min(kChunk, count - offset), target + offset * size, out_type);
  }
  return "";
}

std::string nf4_lora_linear(const Nf4LinearProblem& p, Isa isa, int num_threads) {
  if (p.m == 0 || p.n == 0) return "";
  if (p.compute != Nf4Element::Float32 && p.compute != Nf4Element::BFloat16)
    return "compute type must be float32 or bfloat16";
  if (p.out_type != Nf4Element::Float32 && p.out_type != Nf4Element::BFloat16)
    return "out type must be float32 or bfloat16";
  const bool shrink_here = p.lora_h == nullptr && p.lora_a != nullptr;
  if (shrink_here && p.m > kNf4ShrinkMaxTokens)
    return "the kernel forms the LoRA shrink for at most " + std::to_string(kNf4ShrinkMaxTokens) +
           " tokens; pass lora_h for more";
  if (shrink_here && p.lora_x_type != Nf4Element::Float32 && p.lora_x_type != Nf4Element::BFloat16)
    return "lora_x type must be float32 or bfloat16";
  const Nf4Kernels kernels = kernels_for(isa);
  const MicroKernels lora_kernels = lora_kernels_for(isa);
  num_threads = std::max(1, num_threads);
  const int64_t kp = (p.k + 31) / 32 * 32;
  const bool aligned = p.k % 32 == 0 && is_power_of_two(p.weight.blocksize) && p.weight.blocksize >= 32;
  const bool use_gemv_bf16 = aligned && p.k % 128 == 0 && kernels.gemv_bf16 != nullptr &&
                             p.compute == Nf4Element::BFloat16 && p.m <= kNf4GemvBf16MaxTokens;
  const bool use_gemv = use_gemv_bf16 || (aligned && kernels.gemv != nullptr && p.m <= kNf4GemvMaxTokens);
  const int64_t x_size = element_size(p.compute);

  // x as the kernels read it: bf16 permuted to the lookup order for the bf16 GEMV, the split fp32
  // layout for the other GEMV; for tiles x itself when its rows need no padding, else a zero-padded copy.
  std::vector<float> x_split;
  std::vector<uint16_t> x_permuted;
  std::vector<char> x_padded;
  const void* x_rows = p.x;
  int64_t x_stride = p.x_row_stride;
  if (use_gemv_bf16) {
    x_permuted.resize(p.m * p.k);
    const uint16_t* x = static_cast<const uint16_t*>(p.x);
    for (int64_t i = 0; i < p.m; ++i)
      for (int64_t c = 0; c < p.k; ++c) x_permuted[i * p.k + nf4_gemv_bf16_position(c)] = x[i * p.x_row_stride + c];
    x_rows = x_permuted.data();
    x_stride = p.k;
  } else if (use_gemv) {
    x_split.assign(p.m * kp, 0.0f);
    for (int64_t i = 0; i < p.m; ++i)
      for (int64_t c = 0; c < p.k; ++c) {
        const int64_t group = c / 32, lane = c % 32;
        x_split[i * kp + group * 32 + (lane & 1) * 16 + lane / 2] =
            element_as_float(p.x, i * p.x_row_stride + c, p.compute);
      }
    x_rows = x_split.data();
    x_stride = kp;
  } else if (kp != p.k) {
    x_padded.assign(p.m * kp * x_size, 0);
    for (int64_t i = 0; i < p.m; ++i)
      std::memcpy(x_padded.data() + i * kp * x_size, static_cast<const char*>(p.x) + i * p.x_row_stride * x_size,
                  p.k * x_size);
    x_rows = x_padded.data();
    x_stride = kp;
  }

  // The adapter's input widened to fp32 rows (as PEFT's x.to(lora_A.dtype)), and h = that · lora_aᵀ.
  std::vector<float> lora_x32(shrink_here ? p.m * p.k : 0);
  std::vector<float> own_h(shrink_here ? p.m * p.rank : 0, 0.0f);
  for (int64_t i = 0; shrink_here && i < p.m; ++i)
    for (int64_t c = 0; c < p.k; ++c)
      lora_x32[i * p.k + c] = element_as_float(p.lora_x, i * p.lora_x_row_stride + c, p.lora_x_type);
  const float* lora_h = shrink_here ? own_h.data() : p.lora_h;
  const int64_t shrink_rank_tiles = (p.rank + kShrinkRanks - 1) / kShrinkRanks;
  const int64_t shrink_tiles = shrink_here ? (p.m + kShrinkTokens - 1) / kShrinkTokens * shrink_rank_tiles : 0;

  // GEMV items are runs of 64 rows: the kernels prefetch the next row group as they go, which
  // only pays off within a thread's own run (at its end the next rows are another thread's).
  const int64_t rows_per_item = use_gemv ? 64 : tile_rows_for(kp, p.compute);
  const int64_t items = (p.n + rows_per_item - 1) / rows_per_item;
  const int64_t out_size = element_size(p.out_type);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<char> tile(use_gemv ? 0 : rows_per_item * kp * x_size);
    std::vector<float> acc(p.m * rows_per_item);
    std::vector<float> lora_bt(lora_h ? p.rank * rows_per_item : 0);
    // Tiles of tokens × ranks, each over all of k; the loop's barrier publishes h to the epilogues.
    // (Every thread takes the same branch, as a worksharing loop requires.)
    if (shrink_tiles > 0)
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < shrink_tiles; ++tile) {
      const int64_t i0 = tile / shrink_rank_tiles * kShrinkTokens, r0 = tile % shrink_rank_tiles * kShrinkRanks;
      const int tokens = static_cast<int>(std::min<int64_t>(kShrinkTokens, p.m - i0));
      const int ranks = static_cast<int>(std::min<int64_t>(kShrinkRanks, p.rank - r0));
      for (int64_t d = 0; d < p.k; d += kShrinkChunk) {
        const void* x_rows[kShrinkTokens];
        for (int i = 0; i < tokens; ++i) x_rows[i] = lora_x32.data() + (i0 + i) * p.k + d;
        lora_kernels.shrink(x_rows, p.lora_a + r0 * p.k + d, p.k, std::min(kShrinkChunk, p.k - d), tokens, ranks,
                            own_h.data() + i0 * p.rank + r0, p.rank);
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t n0 = item * rows_per_item;
      const int64_t rows = std::min(rows_per_item, p.n - n0);
      if (use_gemv_bf16) {
        for (int64_t r = 0; r < rows; r += kNf4TileRows)
          for (int64_t i = 0; i < p.m; i += kNf4GemvBf16Tokens)
            kernels.gemv_bf16(p.weight, p.k, n0 + r, static_cast<int>(std::min<int64_t>(kNf4TileRows, rows - r)),
                              static_cast<const uint16_t*>(x_rows) + i * x_stride, x_stride,
                              static_cast<int>(std::min<int64_t>(kNf4GemvBf16Tokens, p.m - i)),
                              acc.data() + i * rows + r, rows);
      } else if (use_gemv) {
        for (int64_t r = 0; r < rows; r += kNf4TileRows)
          for (int64_t i = 0; i < p.m; i += kNf4TileTokens)
            kernels.gemv(p.weight, p.k, n0 + r, static_cast<int>(std::min<int64_t>(kNf4TileRows, rows - r)),
                         static_cast<const float*>(x_rows) + i * x_stride, x_stride,
                         static_cast<int>(std::min<int64_t>(kNf4TileTokens, p.m - i)), acc.data() + i * rows + r,
                         rows, p.compute == Nf4Element::BFloat16);
      } else {
        if (aligned) {
          kernels.decode_rows(p.weight, p.k, n0, rows, tile.data(), kp, p.compute);
        } else {
          nf4_decode_rows_generic(p.weight, p.k, n0, rows, tile.data(), kp, p.compute);
        }
        // Tokens outer: a few tokens' x stays in L1 while the tile streams from L2 (with rows outer,
        // every row group would stream all of x, more than L2 for many tokens).
        for (int64_t i = 0; i < p.m; i += kNf4TileTokens)
          for (int64_t r = 0; r < rows; r += kNf4TileRows)
            kernels.dot(static_cast<const char*>(x_rows) + i * x_stride * x_size, x_stride,
                        tile.data() + r * kp * x_size, kp, kp,
                        static_cast<int>(std::min<int64_t>(kNf4TileTokens, p.m - i)),
                        static_cast<int>(std::min<int64_t>(kNf4TileRows, rows - r)), acc.data() + i * rows + r, rows,
                        p.compute);
      }
      if (lora_h)
        lora_kernels.transpose(p.lora_b + n0 * p.rank, p.rank * int64_t{sizeof(float)}, false, rows, p.rank,
                               reinterpret_cast<uint32_t*>(lora_bt.data()), rows);
      for (int64_t i = 0; i < p.m; ++i) {
        const Nf4Epilogue e{p.compute, p.out_type, p.bias, lora_h ? lora_h + i * p.rank : nullptr, p.rank,
                            p.scale, p.dora_scale};
        kernels.epilogue(e, acc.data() + i * rows, n0, rows, lora_bt.data(),
                         static_cast<char*>(p.out) + (i * p.out_row_stride + n0) * out_size);
      }
    }
  }
  return "";
}

}  // namespace lola::cpu
