// pybind11 module lolakernels._C: the CPU kernels on DLPack capsules and raw pointers (no torch headers, so the
// extension loads under any PyTorch). Torch integration lives in lolakernels/_ops.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "../cpu/nf4.h"
#include "../cpu/shared_basis_lora.h"
#include "dlpack_view.h"

namespace py = pybind11;
using lola::cpu::DType;
using lola::cpu::Isa;
using lola::cpu::SigmaKind;

namespace {

template <typename T>
T* as_pointer(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Runs a checked problem with the GIL released; value errors raise ValueError.
void run_shared_basis_lora(const lola::cpu::LoraProblem& problem, Isa isa, int num_threads) {
  std::string error;
  {
    py::gil_scoped_release release;
    error = lola::cpu::shared_basis_lora(problem, isa, num_threads);
  }
  if (!error.empty()) throw std::invalid_argument(error);
}

// The per-layer CPU call, from DLPack capsules of its tensors (None for an absent optional one):
// runs it and returns true when every tensor is one the kernel takes as it is, else returns
// false having run nothing. Each condition is at least as strict as the Python check it stands
// for (lolakernels/_checks.py), so false only means "not vouched for": the caller then runs the
// full checks, which raise with the reason, or routes the call to the backend that takes it.
// Value errors (ids, basis_of or ranks out of range) raise ValueError, as shared_basis_lora does.
bool shared_basis_lora_from_capsules(py::handle out, int64_t out_offset, py::handle x, py::handle lora_a,
                                     py::handle lora_b, py::handle sigma, py::handle ids, py::handle basis_of,
                                     double scale, py::handle adapter_scale, py::handle ranks, int isa,
                                     int num_threads) {
  namespace dl = lola::dlpack;
  const dl::Tensor* x_t = dl::tensor_of(x.ptr());
  const dl::Tensor* a_t = dl::tensor_of(lora_a.ptr());
  const dl::Tensor* b_t = dl::tensor_of(lora_b.ptr());
  const dl::Tensor* ids_t = dl::tensor_of(ids.ptr());
  const dl::Tensor* basis_t = dl::tensor_of(basis_of.ptr());
  const dl::Tensor* out_t = dl::tensor_of(out.ptr());
  if (!x_t || !a_t || !b_t || !ids_t || !basis_t || !out_t) return false;
  // Optional tensors: None, or a capsule that passes the checks below.
  const dl::Tensor* sigma_t = sigma.is_none() ? nullptr : dl::tensor_of(sigma.ptr());
  const dl::Tensor* scale_t = adapter_scale.is_none() ? nullptr : dl::tensor_of(adapter_scale.ptr());
  const dl::Tensor* ranks_t = ranks.is_none() ? nullptr : dl::tensor_of(ranks.ptr());
  if ((!sigma.is_none() && !sigma_t) || (!adapter_scale.is_none() && !scale_t) || (!ranks.is_none() && !ranks_t))
    return false;

  // A last dimension of size 1 may have any stride (torch's view of a column): it is never stepped.
  if (x_t->ndim != 2 || !dl::is_cpu(*x_t) || (x_t->shape[1] > 1 && dl::stride(*x_t, 1) != 1)) return false;
  const bool bf16 = dl::has_type(*x_t, dl::kBfloat, 16);
  if (!bf16 && !dl::has_type(*x_t, dl::kFloat, 32)) return false;
  const uint8_t code = x_t->dtype.code, bits = x_t->dtype.bits;
  const auto is_dense = [](const dl::Tensor& t, int ndim, uint8_t type_code, uint8_t type_bits) {
    return t.ndim == ndim && dl::is_cpu(t) && dl::has_type(t, type_code, type_bits) && dl::is_contiguous(t);
  };
  const int64_t num_tokens = x_t->shape[0], d_in = x_t->shape[1];
  if (!is_dense(*a_t, 3, code, bits) || !is_dense(*b_t, 3, code, bits)) return false;
  const int64_t num_clusters = a_t->shape[0], rank = a_t->shape[1], d_out = b_t->shape[1];
  if (a_t->shape[2] != d_in || b_t->shape[0] != num_clusters || b_t->shape[2] != rank) return false;
  if (!is_dense(*ids_t, 1, dl::kInt, 32) || ids_t->shape[0] != num_tokens) return false;
  if (!is_dense(*basis_t, 1, dl::kInt, 32)) return false;
  const int64_t num_adapters = basis_t->shape[0];
  SigmaKind sigma_kind = SigmaKind::None;
  if (sigma_t) {
    if (!(sigma_t->ndim == 2 || sigma_t->ndim == 3) || !is_dense(*sigma_t, sigma_t->ndim, code, bits)) return false;
    if (sigma_t->shape[0] != num_adapters || sigma_t->shape[1] != rank ||
        (sigma_t->ndim == 3 && sigma_t->shape[2] != rank))
      return false;
    sigma_kind = sigma_t->ndim == 2 ? SigmaKind::Diagonal : SigmaKind::Full;
  }
  if (scale_t && (!is_dense(*scale_t, 1, dl::kFloat, 32) || scale_t->shape[0] != num_adapters)) return false;
  if (ranks_t && (!is_dense(*ranks_t, 1, dl::kInt, 32) || ranks_t->shape[0] != num_adapters)) return false;
  if (!std::isfinite(scale)) return false;
  if (out_t->ndim != 2 || !dl::is_cpu(*out_t) || !dl::has_type(*out_t, code, bits) ||
      (out_t->shape[1] > 1 && dl::stride(*out_t, 1) != 1) || out_t->shape[0] != num_tokens || out_offset < 0 ||
      out_offset + d_out > out_t->shape[1])
    return false;
  // Rows of out that share memory (an expanded view) or out over a weight the kernel reads while
  // it writes: the Python checks refuse these with the reason.
  if (num_tokens > 1 && dl::stride(*out_t, 0) < out_t->shape[1]) return false;
  for (const dl::Tensor* read : {x_t, a_t, b_t, sigma_t, ids_t, basis_t, scale_t, ranks_t})
    if (read && dl::overlap(*out_t, *read)) return false;
  if (!lola::cpu::isa_supported(static_cast<Isa>(isa))) return false;

  const lola::cpu::LoraProblem problem{
      const_cast<void*>(dl::data(*out_t)), dl::stride(*out_t, 0), out_offset,
      dl::data(*x_t), dl::stride(*x_t, 0),
      dl::data(*a_t), dl::data(*b_t),
      sigma_t ? dl::data(*sigma_t) : nullptr, sigma_kind,
      static_cast<const int32_t*>(dl::data(*ids_t)), static_cast<const int32_t*>(dl::data(*basis_t)),
      static_cast<float>(scale),
      scale_t ? static_cast<const float*>(dl::data(*scale_t)) : nullptr,
      ranks_t ? static_cast<const int32_t*>(dl::data(*ranks_t)) : nullptr,
      num_tokens, d_in, d_out, rank, num_adapters, num_clusters,
      bf16 ? DType::BFloat16 : DType::Float32};
  run_shared_basis_lora(problem, static_cast<Isa>(isa), num_threads);
  return true;
}

lola::Nf4Storage nf4_storage(std::uintptr_t packed, int64_t numel, int64_t blocksize, std::uintptr_t absmax,
                             std::uintptr_t absmax_q, std::uintptr_t absmax_code, std::uintptr_t absmax_scale,
                             int64_t absmax_blocksize, std::uintptr_t absmax_offset) {
  if (blocksize <= 0) throw std::invalid_argument("blocksize must be positive, got " + std::to_string(blocksize));
  if (absmax == 0 && (absmax_q == 0 || absmax_code == 0 || absmax_scale == 0 || absmax_offset == 0 ||
                      absmax_blocksize <= 0))
    throw std::invalid_argument(
        "nf4 weight needs absmax, or absmax_q + absmax_code + absmax_scale + absmax_offset (double quantization)");
  return lola::Nf4Storage{as_pointer<const uint8_t>(packed), numel, blocksize, as_pointer<const float>(absmax),
                          as_pointer<const uint8_t>(absmax_q), as_pointer<const float>(absmax_code),
                          as_pointer<const float>(absmax_scale), absmax_blocksize,
                          as_pointer<const float>(absmax_offset),
                          lola::power_of_two_shift(absmax_blocksize)};
}

void check_isa(int isa) {
  if (!lola::cpu::isa_supported(static_cast<Isa>(isa)))
    throw std::invalid_argument("isa " + lola::cpu::isa_name(static_cast<Isa>(isa)) + " is not supported by this CPU");
}

// Weight arguments shared by the nf4 entry points (see lola::Nf4Storage).
#define LOLA_NF4_WEIGHT_ARGS                                                                              \
  std::uintptr_t packed, int64_t numel, int64_t blocksize, std::uintptr_t absmax, std::uintptr_t absmax_q, \
      std::uintptr_t absmax_code, std::uintptr_t absmax_scale, int64_t absmax_blocksize, std::uintptr_t absmax_offset
#define LOLA_NF4_WEIGHT \
  nf4_storage(packed, numel, blocksize, absmax, absmax_q, absmax_code, absmax_scale, absmax_blocksize, absmax_offset)

void nf4_dequantize(LOLA_NF4_WEIGHT_ARGS, int64_t begin, int64_t count, std::uintptr_t out, int out_type, int isa,
                    int num_threads) {
  check_isa(isa);
  const lola::Nf4Storage weight = LOLA_NF4_WEIGHT;
  if (begin < 0 || count < 0 || begin + count > numel)
    throw std::invalid_argument("range [" + std::to_string(begin) + ", " + std::to_string(begin + count) +
                                ") is outside the weight's " + std::to_string(numel) + " elements");
  std::string error;
  {
    py::gil_scoped_release release;
    error = lola::cpu::nf4_dequantize(weight, begin, count, as_pointer<void>(out),
                                      static_cast<lola::cpu::Nf4Element>(out_type), static_cast<Isa>(isa), num_threads);
  }
  if (!error.empty()) throw std::invalid_argument(error);
}

void nf4_lora_linear(LOLA_NF4_WEIGHT_ARGS, int64_t n, int64_t k, std::uintptr_t x, int64_t x_row_stride, int64_t m,
                     int compute, std::uintptr_t bias, std::uintptr_t lora_h, std::uintptr_t lora_b, int64_t rank,
                     float scale, std::uintptr_t dora_scale, std::uintptr_t out, int64_t out_row_stride, int out_type,
                     std::uintptr_t lora_a, std::uintptr_t lora_x, int64_t lora_x_row_stride, int lora_x_type, int isa,
                     int num_threads) {
  check_isa(isa);
  if (n * k != numel)
    throw std::invalid_argument("weight has " + std::to_string(numel) + " elements, not n * k = " +
                                std::to_string(n) + " * " + std::to_string(k));
  const lola::cpu::Nf4LinearProblem problem{
      LOLA_NF4_WEIGHT, n, k, m, as_pointer<const void>(x), x_row_stride, static_cast<lola::cpu::Nf4Element>(compute),
      as_pointer<const void>(bias), as_pointer<const float>(lora_h), as_pointer<const float>(lora_b), rank, scale,
      as_pointer<const float>(dora_scale), as_pointer<void>(out), out_row_stride,
      static_cast<lola::cpu::Nf4Element>(out_type), as_pointer<const float>(lora_a), as_pointer<const void>(lora_x),
      lora_x_row_stride, static_cast<lola::cpu::Nf4Element>(lora_x_type)};
  std::string error;
  {
    py::gil_scoped_release release;
    error = lola::cpu::nf4_lora_linear(problem, static_cast<Isa>(isa), num_threads);
  }
  if (!error.empty()) throw std::invalid_argument(error);
}

py::dict cpu_features() {
  __builtin_cpu_init();
  py::dict features;
  features["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
  features["fma"] = static_cast<bool>(__builtin_cpu_supports("fma"));
  features["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
  features["avx512bw"] = static_cast<bool>(__builtin_cpu_supports("avx512bw"));
  features["avx512vl"] = static_cast<bool>(__builtin_cpu_supports("avx512vl"));
  features["avx512bf16"] = static_cast<bool>(__builtin_cpu_supports("avx512bf16"));
  return features;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lolakernels CPU kernels (DLPack capsules and raw pointers; see lolakernels/cpu.py)";
  m.def("shared_basis_lora_from_capsules", &shared_basis_lora_from_capsules);
  m.def("nf4_dequantize", &nf4_dequantize);
  m.def("nf4_lora_linear", &nf4_lora_linear);
  m.attr("NF4_GEMV_MAX_TOKENS") = lola::cpu::kNf4GemvMaxTokens;
  m.attr("NF4_SHRINK_MAX_TOKENS") = lola::cpu::kNf4ShrinkMaxTokens;
  m.def("cpu_features", &cpu_features);
  m.def("best_isa", [] { return static_cast<int>(lola::cpu::best_isa()); });
  m.attr("ISA_SCALAR") = static_cast<int>(Isa::Scalar);
  m.attr("ISA_AVX512") = static_cast<int>(Isa::Avx512);
  m.attr("ISA_AVX512_BF16") = static_cast<int>(Isa::Avx512Bf16);
  m.def("isa_name", [](int isa) { return lola::cpu::isa_name(static_cast<Isa>(isa)); });
}
