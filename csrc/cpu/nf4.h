// nf4 (bitsandbytes 4-bit) kernels on the CPU: dequantize, and the fused linear + LoRA / DoRA
// forward. The contract is lolakernels/reference/nf4.py; the storage format is csrc/common/nf4.h.
//
// nf4_lora_linear, for each token i and output column n (all accumulation fp32):
//     base   = out_type(compute(Σ_k x[i, k] · compute(W[n, k]) + bias[n]))
//     t      = Σ_r h[i, r] · lora_b[n, r]                           (h = dropout(x) · lora_aᵀ, fp32)
//     LoRA:  out = out_type(base + out_type(t · scale))
//     DoRA:  out = out_type(base + ((s[n] − 1) · (base − bias[n]) + (s[n] · t) · scale))
// which is the rounding sequence of bitsandbytes' Linear4bit followed by PEFT's LoRA / DoRA
// update (s = magnitude / weight norm). The weight is read once per call and never stored whole:
// a register-blocked GEMV straight from the packed bytes for a few tokens, tiles of dequantized
// rows (L2-sized) reused by every token otherwise.
#pragma once
#include <cstdint>
#include <string>

#include "../common/nf4.h"
#include "shared_basis_lora.h"

namespace lola::cpu {

// Element types crossing from Python (codes 0 and 1 match DType).
enum class Nf4Element : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

struct Nf4LinearProblem {
  Nf4Storage weight;        // W [n, k]
  int64_t n, k, m;
  const void* x;            // [m, k] in the compute type, row stride x_row_stride, unit column stride
  int64_t x_row_stride;
  Nf4Element compute;       // Float32 or BFloat16
  const void* bias;         // [n] in the compute type, or nullptr
  const float* lora_h;      // [m, rank] fp32, or nullptr (no LoRA term)
  const float* lora_b;      // [n, rank] fp32 contiguous
  int64_t rank;
  float scale;
  const float* dora_scale;  // [n] fp32 magnitude / weight norm, or nullptr (plain LoRA)
  void* out;                // [m, n] row stride out_row_stride, in out_type (Float32 or BFloat16)
  int64_t out_row_stride;
  Nf4Element out_type;
  // With lora_h nullptr and lora_a given, the kernel forms h = lora_x · lora_aᵀ itself (m ≤
  // kNf4ShrinkMaxTokens): at decode sizes a separate BLAS call costs more than the product.
  const float* lora_a = nullptr;  // [rank, k] fp32 contiguous
  const void* lora_x = nullptr;   // [m, k] the adapter's input (fp32 or bf16), unit column stride
  int64_t lora_x_row_stride = 0;
  Nf4Element lora_x_type = Nf4Element::Float32;
};

// out[i] = W[begin + i] (flat index) in out_type for i < count, bit for bit as bitsandbytes.
std::string nf4_dequantize(const Nf4Storage& weight, int64_t begin, int64_t count, void* out, Nf4Element out_type,
                           Isa isa, int num_threads);

std::string nf4_lora_linear(const Nf4LinearProblem& problem, Isa isa, int num_threads);

// Largest token count served by the GEMV path (more tokens use dequantized tiles).
constexpr int64_t kNf4GemvMaxTokens = 4;
// Largest token count for which the kernel forms the LoRA shrink itself (Nf4LinearProblem::lora_a).
constexpr int64_t kNf4ShrinkMaxTokens = 8;
// The same for bf16 compute where VDPBF16PS decodes straight from the packed bytes.
constexpr int64_t kNf4GemvBf16MaxTokens = 8;

}  // namespace lola::cpu
