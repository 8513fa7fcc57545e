// Shared-basis / multi-LoRA apply on the CPU: the contract is lolakernels/reference/shared_basis_lora.py.
//
//   for each token t with a = ids[t] >= 0, c = basis_of[a], s = scale * adapter_scale[a]:
//     h = lora_a[c] · x[t]            (shrink, [R], zero past ranks[a])
//     g = s · Σ_a(h)                  (none / diagonal / full R×R, zero past ranks[a])
//     out[t, offset : offset + d_out] += lora_b[c] · g      (expand, one rounding)
//
// The work is split in three phases so that each dense phase runs over all tokens of one cluster
// at once: tokens are bucketed by cluster (counting sort), the shrink and expand run as small
// GEMMs per cluster, and the tiny per-adapter Σ is applied in between on fp32 rows.
#pragma once
#include <cstdint>
#include <string>

namespace lola::cpu {

enum class SigmaKind : int { None = 0, Diagonal = 1, Full = 2 };
enum class DType : int { Float32 = 0, BFloat16 = 1 };
enum class Isa : int { Scalar = 0, Avx512 = 1, Avx512Bf16 = 2 };

struct LoraProblem {
  void* out;                 // [T, >= out_offset + d_out], row stride out_row_stride
  int64_t out_row_stride;
  int64_t out_offset;
  const void* x;             // [T, d_in], row stride x_row_stride
  int64_t x_row_stride;
  const void* lora_a;        // [C, R, d_in] contiguous
  const void* lora_b;        // [C, d_out, R] contiguous
  const void* sigma;         // nullptr, [N, R] or [N, R, R] contiguous
  SigmaKind sigma_kind;
  const int32_t* ids;        // [T], -1 = no adapter
  const int32_t* basis_of;   // [N]
  float scale;
  const float* adapter_scale;  // [N] or nullptr
  const int32_t* ranks;        // [N] or nullptr
  int64_t num_tokens, d_in, d_out, rank, num_adapters, num_clusters;
  DType dtype;
};

// Best instruction set this CPU supports, and whether a given one can run here.
Isa best_isa();
bool isa_supported(Isa isa);
std::string isa_name(Isa isa);

// Runs the op. Returns an empty string on success, else a message naming the bad argument
// (ids, or any entry of basis_of or ranks, out of range; checked even when T = 0): nothing is
// written to `out` in that case. These are all of the op's value checks, so the Python side
// skips its own on this backend.
std::string shared_basis_lora(const LoraProblem& problem, Isa isa, int num_threads);

}  // namespace lola::cpu
