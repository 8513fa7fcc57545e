// Planner for the CPU shared-basis LoRA op: validation, bucketing tokens by cluster, and the three
// parallel phases (shrink tiles, per-token Σ, expand panels). See shared_basis_lora.h.
#include "shared_basis_lora.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "../common/bf16.h"
#include "microkernels.h"

namespace lola::cpu {

Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    // The VDPBF16PS kernels also narrow with VCVTNEPS2BF16 and test for denormals with VFPCLASSPS
    // (AVX512DQ, which every CPU with AVX512-BF16 has).
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512dq") ? Isa::Avx512Bf16
                                                                                    : Isa::Avx512;
  }
  return Isa::Scalar;
}

bool isa_supported(Isa isa) { return static_cast<int>(isa) <= static_cast<int>(best_isa()); }

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Bf16: return "avx512_bf16";
    case Isa::Avx512: return "avx512";
    default: return "scalar";
  }
}

namespace {

// A run of tokens, sorted by cluster, that all use lora_a[cluster] and lora_b[cluster].
struct Group {
  int64_t cluster;
  int64_t begin;  // into the sorted token order
  int64_t end;
};

// Whether a group's shrink runs on a packed panel (shrink_packed_groups) or on dot-product tiles.
inline bool takes_packed_shrink(const Group& group) { return group.end - group.begin >= kPackedShrinkMinTokens; }

// The dot-product shrink of one small group over ranks [rank_begin, rank_end): all of the
// group's tokens, so that each rank range of lora_a[cluster] is read from memory by one item.
// Thread `part` runs the items of its part.
struct ShrinkItem {
  int32_t group;
  int32_t rank_begin;
  int32_t rank_end;
  int32_t part;
};

struct ExpandItem {
  int32_t group;
  int64_t col_begin;
};

int64_t element_size_of(DType dtype) { return dtype == DType::Float32 ? 4 : 2; }

float element(const void* data, DType dtype, int64_t index) {
  return dtype == DType::Float32 ? static_cast<const float*>(data)[index]
                                 : bf16_to_float(static_cast<const uint16_t*>(data)[index]);
}

std::string out_of_range(const char* what, int64_t index, int64_t value, const char* range) {
  return std::string(what) + "[" + std::to_string(index) + "] = " + std::to_string(value) +
         " is outside " + range;
}

// Checks every entry of basis_of and ranks, whether or not a token uses its adapter, so that a
// bank that is wrong anywhere is refused on the first call (the Python checks this replaces on
// the CPU path did the same). N entries of int32: a few µs even at N = 4096.
std::string check_tables(const LoraProblem& p) {
  for (int64_t a = 0; a < p.num_adapters; ++a) {
    if (p.basis_of[a] < 0 || p.basis_of[a] >= p.num_clusters)
      return out_of_range("basis_of", a, p.basis_of[a],
                          ("[0, " + std::to_string(p.num_clusters) + ") (C = " + std::to_string(p.num_clusters) +
                           " bases)").c_str());
  }
  if (p.ranks) {
    for (int64_t a = 0; a < p.num_adapters; ++a) {
      if (p.ranks[a] < 0 || p.ranks[a] > p.rank)
        return out_of_range("ranks", a, p.ranks[a],
                            ("[0, " + std::to_string(p.rank) + "] (R = " + std::to_string(p.rank) + ")").c_str());
    }
  }
  return "";
}

// Checks ids (basis_of and ranks were checked whole) and buckets tokens by cluster.
std::string plan_groups(const LoraProblem& p, std::vector<int64_t>& order, std::vector<Group>& groups) {
  std::vector<int64_t> count(p.num_clusters + 1, 0);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t adapter = p.ids[t];
    if (adapter == -1) continue;
    if (adapter < -1 || adapter >= p.num_adapters)
      return out_of_range("ids", t, adapter,
                          ("[-1, " + std::to_string(p.num_adapters) + ") (N = " + std::to_string(p.num_adapters) +
                           " adapters; -1 = no adapter)").c_str());
    ++count[p.basis_of[adapter] + 1];
  }
  for (int64_t c = 0; c < p.num_clusters; ++c) count[c + 1] += count[c];
  order.resize(count[p.num_clusters]);
  std::vector<int64_t> cursor(count.begin(), count.end() - 1);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    if (p.ids[t] >= 0) order[cursor[p.basis_of[p.ids[t]]]++] = t;
  }
  for (int64_t c = 0; c < p.num_clusters; ++c) {
    if (count[c + 1] > count[c]) groups.push_back({c, count[c], count[c + 1]});
  }
  return "";
}

// g = s · Σ_a(h), with h and g zeroed past the adapter's true rank.
void apply_sigma(const LoraProblem& p, const MicroKernels& kernels, int64_t adapter, float* h, float* g) {
  const int64_t rank = p.rank;
  const int64_t true_rank = p.ranks ? p.ranks[adapter] : rank;
  const float s = p.scale * (p.adapter_scale ? p.adapter_scale[adapter] : 1.0f);
  std::fill(h + true_rank, h + rank, 0.0f);
  switch (p.sigma_kind) {
    case SigmaKind::None:
      for (int64_t k = 0; k < rank; ++k) g[k] = s * h[k];
      break;
    case SigmaKind::Diagonal:
      for (int64_t k = 0; k < rank; ++k) g[k] = s * element(p.sigma, p.dtype, adapter * rank + k) * h[k];
      break;
    case SigmaKind::Full: {
      kernels.sigma_full(static_cast<const char*>(p.sigma) + adapter * rank * rank * element_size_of(p.dtype), h, rank,
                         true_rank, g);
      for (int64_t j = 0; j < rank; ++j) g[j] *= s;
      break;
    }
  }
  std::fill(g + true_rank, g + rank, 0.0f);
}

// Splits the dot-product shrink of the small groups (those not taking the packed shrink) into one
// contiguous run of lora_a rows per thread, in address order (groups are in cluster order), each
// costing about the same: a row of lora_a costs one read of d_in elements plus one dot product
// per token, weighed as kShrinkTokens + tokens. Runs are cut at any row, not at whole groups or
// rank tiles: with 5-8 groups of 1-7 tokens (T = 16 spread over 8 clusters) on 2 threads, whole
// groups left one thread reading a third to a half more of lora_a than the other.
std::vector<ShrinkItem> split_small_shrink(const std::vector<Group>& groups, int64_t rank, int num_threads) {
  int64_t total = 0;
  for (const Group& group : groups)
    if (!takes_packed_shrink(group)) total += rank * (kShrinkTokens + group.end - group.begin);
  std::vector<ShrinkItem> items;
  if (total == 0) return items;
  const int64_t parts = std::max(1, num_threads);
  // Row k of a group starting at weight `base` (row weight w) belongs to the part whose range
  // [total * part / parts, total * (part + 1) / parts) holds base + k * w.
  const auto first_row_at = [](int64_t bound, int64_t base, int64_t w, int64_t rows) {
    return std::clamp<int64_t>(bound <= base ? 0 : (bound - base + w - 1) / w, 0, rows);
  };
  for (int64_t part = 0; part < parts; ++part) {
    const int64_t lower = total * part / parts, upper = total * (part + 1) / parts;
    int64_t base = 0;
    for (int32_t gi = 0; gi < static_cast<int32_t>(groups.size()); ++gi) {
      if (takes_packed_shrink(groups[gi])) continue;
      const int64_t w = kShrinkTokens + groups[gi].end - groups[gi].begin;
      const int64_t begin = first_row_at(lower, base, w, rank), end = first_row_at(upper, base, w, rank);
      if (begin < end)
        items.push_back({gi, static_cast<int32_t>(begin), static_cast<int32_t>(end), static_cast<int32_t>(part)});
      base += rank * w;
    }
  }
  return items;
}

// The expand panel of lora_b[cluster, col_begin : col_begin + 32, :] in the kernels' layout (see
// MicroKernels::expand): fp32 panel[k * 32 + j], or bf16 pairs of ranks, zero past d_out (and
// past an odd rank).
void pack_expand_panel(const LoraProblem& p, const MicroKernels& kernels, int64_t cluster, int64_t col_begin,
                       uint32_t* panel) {
  const bool pairs = kernels.panel_layout == PanelLayout::Bf16Pairs;
  const int64_t cols = std::min<int64_t>(kExpandCols, p.d_out - col_begin);
  const int64_t words = pairs ? p.rank / 2 : p.rank;  // whole words per lora_b row
  const int64_t panel_rows = pairs ? (p.rank + 1) / 2 : p.rank;
  if (cols < kExpandCols) std::fill(panel, panel + panel_rows * kExpandCols, 0u);
  const int64_t element_size = element_size_of(p.dtype);
  const char* rows = static_cast<const char*>(p.lora_b) + (cluster * p.d_out + col_begin) * p.rank * element_size;
  kernels.transpose(rows, p.rank * element_size, !pairs && p.dtype == DType::BFloat16, cols, words, panel,
                    kExpandCols);
  if (pairs && p.rank % 2 == 1) {
    const auto* b16 = reinterpret_cast<const uint16_t*>(rows);
    for (int64_t j = 0; j < cols; ++j) panel[words * kExpandCols + j] = b16[j * p.rank + p.rank - 1];
  }
}

// Ranks [rank_begin, rank_end) of one d_in chunk [d_begin, d_begin + length) of the packed-shrink
// panel of lora_a[cluster] ([rank, d_in] rows) as 32-bit words: fp32 values (Float32Rows, word
// (d - d_begin) * stride + k) or bf16 pairs (Bf16Pairs, word (d - d_begin) / 2 * stride + k holds
// lora_a[k, d..d + 1], which is one 32-bit word of the row already; d_begin is even). Other ranks
// are left as the caller zeroed them.
void pack_shrink_chunk(const LoraProblem& p, const MicroKernels& kernels, int64_t cluster, int64_t d_begin,
                       int64_t length, int64_t rank_begin, int64_t rank_end, int64_t stride, uint32_t* panel) {
  const bool pairs = kernels.panel_layout == PanelLayout::Bf16Pairs;
  const int64_t element_size = element_size_of(p.dtype);
  const char* a =
      static_cast<const char*>(p.lora_a) + ((cluster * p.rank + rank_begin) * p.d_in + d_begin) * element_size;
  const int64_t words = pairs ? length / 2 : length;  // whole words per row
  const int64_t rows = rank_end - rank_begin;
  kernels.transpose(a, p.d_in * element_size, !pairs && p.dtype == DType::BFloat16, rows, words, panel + rank_begin,
                    stride);
  if (pairs && length % 2 == 1) {  // an odd d_in's last pair holds lora_a[k, d_in - 1] and a zero
    const auto* a16 = reinterpret_cast<const uint16_t*>(a);
    for (int64_t k = 0; k < rows; ++k) panel[words * stride + rank_begin + k] = a16[k * p.d_in + length - 1];
  }
}

// The shrink of the large groups. Each thread transposes lora_a[cluster] one d_in chunk at a time
// into its own panel (which stays in L2) and passes its tiles of that group over it; no thread
// waits on another, and no panel goes out to memory and back. With at least two token tiles per
// thread the tiles are split into one contiguous run per thread, each over all ranks (the widest
// register tile). With fewer (a prefill of a few dozen tokens) that would leave threads idle or
// have several transpose all of lora_a for one tile each, so the ranks are cut too, into slices
// of whole vectors: a thread then transposes only its slice, for its share of the tiles.
void shrink_packed_groups(const LoraProblem& p, const MicroKernels& kernels, const std::vector<Group>& groups,
                          const std::vector<int64_t>& order, float* h, int num_threads) {
  struct Run { int64_t group, first_tile, tile_count; };
  std::vector<Run> tiles_of;  // every packed group's tiles, in group order
  int64_t total_tiles = 0;
  for (int64_t gi = 0; gi < static_cast<int64_t>(groups.size()); ++gi) {
    if (!takes_packed_shrink(groups[gi])) continue;
    const int64_t count = (groups[gi].end - groups[gi].begin + kPackedTokens - 1) / kPackedTokens;
    tiles_of.push_back({gi, total_tiles, count});
    total_tiles += count;
  }
  if (total_tiles == 0) return;
  const int64_t rank = p.rank;
  const int64_t rank_vectors = (rank + 15) / 16;
  const int64_t stride = rank_vectors * 16;
  // rank_parts × tile_parts pieces of work, one per thread (a thread takes several if the
  // runtime gives fewer threads than asked for). rank_parts <= rank_vectors, so every rank slice
  // holds at least one vector.
  const int64_t rank_parts = total_tiles >= 2 * num_threads
      ? 1 : std::min<int64_t>(rank_vectors, (2 * num_threads + total_tiles - 1) / total_tiles);
  const int64_t tile_parts = std::min<int64_t>(total_tiles, std::max<int64_t>(1, num_threads / rank_parts));
  const int64_t pieces = rank_parts * tile_parts;
  const bool pairs = kernels.panel_layout == PanelLayout::Bf16Pairs;
  const int64_t element_size = element_size_of(p.dtype);
  const auto* x_bytes = static_cast<const char*>(p.x);
#pragma omp parallel num_threads(static_cast<int>(pieces))
  {
    std::vector<uint32_t> panel((pairs ? kShrinkChunk / 2 : kShrinkChunk) * stride, 0u);
    for (int64_t piece = omp_get_thread_num(); piece < pieces; piece += omp_get_num_threads()) {
      const int64_t rank_part = piece % rank_parts, tile_part = piece / rank_parts;
      const int64_t rank_begin = std::min(rank, rank_vectors * rank_part / rank_parts * 16);
      const int64_t rank_end = std::min(rank, rank_vectors * (rank_part + 1) / rank_parts * 16);
      const int64_t first = total_tiles * tile_part / tile_parts, last = total_tiles * (tile_part + 1) / tile_parts;
      for (const Run& run : tiles_of) {
        const int64_t begin_tile = std::max(first, run.first_tile) - run.first_tile;
        const int64_t end_tile = std::min(last, run.first_tile + run.tile_count) - run.first_tile;
        if (begin_tile >= end_tile) continue;
        const Group& group = groups[run.group];
        for (int64_t chunk = 0; chunk < p.d_in; chunk += kShrinkChunk) {
          const int64_t length = std::min(kShrinkChunk, p.d_in - chunk);
          pack_shrink_chunk(p, kernels, group.cluster, chunk, length, rank_begin, rank_end, stride, panel.data());
          for (int64_t k = rank_begin; k < rank_end; k += kPackedRanks) {
            const int ranks = static_cast<int>(std::min<int64_t>(kPackedRanks, rank_end - k));
            const uint32_t* panel_at = panel.data() + k;  // one word per rank in either layout
            for (int64_t tile = begin_tile; tile < end_tile; ++tile) {
              const int64_t begin = group.begin + tile * kPackedTokens;
              const int tokens = static_cast<int>(std::min<int64_t>(kPackedTokens, group.end - begin));
              const void* x_rows[kPackedTokens];
              for (int i = 0; i < tokens; ++i)
                x_rows[i] = x_bytes + (order[begin + i] * p.x_row_stride + chunk) * element_size;
              kernels.shrink_packed(x_rows, panel_at, stride, length, tokens, ranks, h + begin * rank + k, rank);
            }
          }
        }
      }
    }
  }
}

}  // namespace

std::string shared_basis_lora(const LoraProblem& p, Isa isa, int num_threads) {
  std::string error = check_tables(p);
  if (!error.empty() || p.num_tokens == 0 || p.d_out == 0) return error;
  std::vector<int64_t> order;
  std::vector<Group> groups;
  error = plan_groups(p, order, groups);
  if (!error.empty()) return error;
  const int64_t active = static_cast<int64_t>(order.size());
  if (active == 0) return "";

  const bool bf16 = p.dtype == DType::BFloat16;
  const MicroKernels kernels =
      isa == Isa::Scalar ? scalar_kernels(bf16) : avx512_kernels(bf16, isa == Isa::Avx512Bf16);
  const int64_t element_size = element_size_of(p.dtype);
  const auto* x_bytes = static_cast<const char*>(p.x);
  const auto* a_bytes = static_cast<const char*>(p.lora_a);
  auto* out_bytes = static_cast<char*>(p.out);
  const int64_t rank = p.rank;
  num_threads = std::max(1, num_threads);

  std::vector<float> h(active * rank, 0.0f), g(active * rank, 0.0f);

  // Shrink of large groups: lora_a[cluster] transposed chunk by chunk (see shrink_packed_groups).
  if (rank > 0 && p.d_in > 0) shrink_packed_groups(p, kernels, groups, order, h.data(), num_threads);
  // Shrink of the other groups (fewer than kPackedShrinkMinTokens tokens each, so their x rows
  // of one d_in chunk fit in L2). An item walks d_in in chunks; in each chunk every rank tile of
  // lora_a (kShrinkRanks rows, kept in L1) passes over all of the group's token tiles, so lora_a
  // is read from memory once however many tokens the group has.
  if (rank > 0 && p.d_in > 0) {
    const std::vector<ShrinkItem> shrink_items = split_small_shrink(groups, rank, num_threads);
    const int64_t parts = shrink_items.empty() ? 0 : shrink_items.back().part + 1;
#pragma omp parallel num_threads(static_cast<int>(std::max<int64_t>(parts, 1))) if (parts > 1)
    for (int64_t part = omp_get_thread_num(); part < parts; part += omp_get_num_threads()) {
      for (const ShrinkItem& item : shrink_items) {
        if (item.part != part) continue;
        const Group& group = groups[item.group];
        const int64_t tokens = group.end - group.begin;
        // A group of one token tile is bound by reading lora_a: each rank tile's rows are then
        // read whole, in long runs the prefetchers follow, rather than in 1024-element pieces.
        const int64_t chunk_size = tokens <= kShrinkTokens ? p.d_in : kShrinkChunk;
        for (int64_t chunk = 0; chunk < p.d_in; chunk += chunk_size) {
          const int64_t length = std::min(chunk_size, p.d_in - chunk);
          const void* x_rows[kPackedShrinkMinTokens];
          for (int64_t i = 0; i < tokens; ++i)
            x_rows[i] = x_bytes + (order[group.begin + i] * p.x_row_stride + chunk) * element_size;
          for (int64_t k = item.rank_begin; k < item.rank_end; k += kShrinkRanks) {
            const int ranks = static_cast<int>(std::min<int64_t>(kShrinkRanks, item.rank_end - k));
            const void* a_rows = a_bytes + ((group.cluster * rank + k) * p.d_in + chunk) * element_size;
            for (int64_t i = 0; i < tokens; i += kShrinkTokens) {
              const int tile = static_cast<int>(std::min<int64_t>(kShrinkTokens, tokens - i));
              kernels.shrink(x_rows + i, a_rows, p.d_in, length, tile, ranks,
                             h.data() + (group.begin + i) * rank + k, rank);
            }
          }
        }
      }
    }
  }

  // The bf16-pair kernels take g as bf16 pairs (round to nearest even, zero past the rank),
  // rounded in the same parallel loop (serially it was 10-20 us of the call at T = 256, R = 64).
  const bool pairs = kernels.panel_layout == PanelLayout::Bf16Pairs;
  const int64_t g_stride = pairs ? (rank + 1) / 2 * 2 : rank;
  std::vector<uint16_t> g_bf16(pairs ? active * g_stride : 0, 0);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (active * rank * rank > 32768)
  for (int64_t i = 0; i < active; ++i) {
    apply_sigma(p, kernels, p.ids[order[i]], h.data() + i * rank, g.data() + i * rank);
    if (pairs)
      for (int64_t k = 0; k < rank; ++k) g_bf16[i * g_stride + k] = float_to_bf16(g[i * rank + k]);
  }
  const char* g_rows = pairs ? reinterpret_cast<const char*>(g_bf16.data()) : reinterpret_cast<const char*>(g.data());
  const int64_t g_element_size = pairs ? 2 : 4;

  // Expand. Groups of up to kRowExpandGroupTokens (decode: one adapter per token; a batch spread
  // over several clusters) read lora_b's rows as they are; each thread takes one contiguous run
  // of those items, so that it streams lora_b in address order and the prefetchers keep up (the
  // reads are most of the cost of these items). Larger groups pack one panel of lora_b per item
  // and reuse it for every token of the group; their items vary in cost with the group's size
  // and are handed out dynamically.
  std::vector<ExpandItem> row_items, panel_items;
  for (int32_t gi = 0; gi < static_cast<int32_t>(groups.size()); ++gi) {
    auto& items = groups[gi].end - groups[gi].begin <= kRowExpandGroupTokens ? row_items : panel_items;
    for (int64_t col = 0; col < p.d_out; col += kExpandCols) items.push_back({gi, col});
  }
  const auto expand_item = [&](const ExpandItem& item, uint32_t* panel, const ExpandItem* next) {
    const Group& group = groups[item.group];
    const int cols = static_cast<int>(std::min<int64_t>(kExpandCols, p.d_out - item.col_begin));
    const bool from_rows = panel == nullptr;
    const int tile = from_rows ? kRowExpandTokens : kExpandTokens;
    if (!from_rows) pack_expand_panel(p, kernels, group.cluster, item.col_begin, panel);
    // A panel item's reads all miss: its 32 rows of lora_b, and 32 columns of each of its group's
    // out rows, which lie one per token across out. The next item's are fetched while this one
    // computes. (Kept in this body: GCC drops a call to a lambda that only prefetches.)
    if (!from_rows && next != nullptr) {
      const Group& next_group = groups[next->group];
      const int64_t next_cols = std::min<int64_t>(kExpandCols, p.d_out - next->col_begin);
      const char* next_b = static_cast<const char*>(p.lora_b) +
                           (next_group.cluster * p.d_out + next->col_begin) * rank * element_size;
      for (int64_t i = next_group.begin; i < next_group.end; ++i) {
        const char* out_at = out_bytes + (order[i] * p.out_row_stride + p.out_offset + next->col_begin) * element_size;
        for (int64_t line = 0; line < next_cols * element_size; line += 64) __builtin_prefetch(out_at + line, 1, 3);
      }
      for (int64_t line = 0; line < next_cols * rank * element_size; line += 64) __builtin_prefetch(next_b + line, 0, 2);
    }
    // The group's tokens in tiles of as equal sizes as the tile bound allows (32 tokens: four of 5
    // and two of 6, not five of 6 and one of 2): a tile of two tokens holds too few accumulators
    // to cover the latency of the FMAs and runs at about two thirds of the rate of one of 5-6.
    const int64_t group_tokens = group.end - group.begin;
    const int64_t tiles = (group_tokens + tile - 1) / tile;
    for (int64_t tile_index = 0; tile_index < tiles; ++tile_index) {
      const int64_t i = group.begin + group_tokens * tile_index / tiles;
      const int tokens = static_cast<int>(group.begin + group_tokens * (tile_index + 1) / tiles - i);
      void* out_rows[kExpandTokens];
      for (int t = 0; t < tokens; ++t)
        out_rows[t] = out_bytes + (order[i + t] * p.out_row_stride + p.out_offset + item.col_begin) * element_size;
      const char* g_at = g_rows + i * g_stride * g_element_size;
      if (from_rows) {
        const char* b_rows =
            static_cast<const char*>(p.lora_b) + (group.cluster * p.d_out + item.col_begin) * rank * element_size;
        kernels.expand_rows(g_at, g_stride, b_rows, rank, out_rows, tokens, cols);
      } else {
        kernels.expand(g_at, g_stride, panel, rank, out_rows, tokens, cols);
      }
    }
  };
  const int64_t row_count = static_cast<int64_t>(row_items.size());
  const int64_t panel_count = static_cast<int64_t>(panel_items.size());
#pragma omp parallel num_threads(num_threads)
  {
    // The two kinds of items write disjoint rows of out (different groups), so neither loop waits.
#pragma omp for schedule(static) nowait
    for (int64_t w = 0; w < row_count; ++w) expand_item(row_items[w], nullptr, nullptr);
    if (panel_count > 0) {
      std::vector<uint32_t> panel(std::max<int64_t>(rank, 1) * kExpandCols);
#pragma omp for schedule(dynamic, 4) nowait
      for (int64_t w = 0; w < panel_count; ++w)
        expand_item(panel_items[w], panel.data(), w + 1 < panel_count ? &panel_items[w + 1] : nullptr);
    }
  }
  return "";
}

}  // namespace lola::cpu
