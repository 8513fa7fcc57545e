// pybind11 module lolakernels._C: the CPU kernels on raw pointers (no torch headers, so the
// extension loads under any PyTorch). Torch integration lives in lolakernels/_ops.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>

#include "../cpu/shared_basis_lora.h"

namespace py = pybind11;
using lola::cpu::DType;
using lola::cpu::Isa;
using lola::cpu::SigmaKind;

namespace {

template <typename T>
T* as_pointer(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void shared_basis_lora(std::uintptr_t out, int64_t out_row_stride, int64_t out_offset, std::uintptr_t x,
                       int64_t x_row_stride, std::uintptr_t lora_a, std::uintptr_t lora_b, std::uintptr_t sigma,
                       int sigma_kind, std::uintptr_t ids, std::uintptr_t basis_of, float scale,
                       std::uintptr_t adapter_scale, std::uintptr_t ranks, int64_t num_tokens, int64_t d_in,
                       int64_t d_out, int64_t rank, int64_t num_adapters, int64_t num_clusters, int dtype,
                       int isa, int num_threads) {
  if (!lola::cpu::isa_supported(static_cast<Isa>(isa)))
    throw std::invalid_argument("isa " + lola::cpu::isa_name(static_cast<Isa>(isa)) + " is not supported by this CPU");
  lola::cpu::LoraProblem problem{as_pointer<void>(out), out_row_stride, out_offset,
                                 as_pointer<const void>(x), x_row_stride,
                                 as_pointer<const void>(lora_a), as_pointer<const void>(lora_b),
                                 as_pointer<const void>(sigma), static_cast<SigmaKind>(sigma_kind),
                                 as_pointer<const int32_t>(ids), as_pointer<const int32_t>(basis_of), scale,
                                 as_pointer<const float>(adapter_scale), as_pointer<const int32_t>(ranks),
                                 num_tokens, d_in, d_out, rank, num_adapters, num_clusters,
                                 static_cast<DType>(dtype)};
  std::string error;
  {
    py::gil_scoped_release release;
    error = lola::cpu::shared_basis_lora(problem, static_cast<Isa>(isa), num_threads);
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
  m.doc() = "lolakernels CPU kernels (raw pointers; see lolakernels/cpu.py)";
  m.def("shared_basis_lora", &shared_basis_lora);
  m.def("cpu_features", &cpu_features);
  m.def("best_isa", [] { return static_cast<int>(lola::cpu::best_isa()); });
  m.attr("ISA_SCALAR") = static_cast<int>(Isa::Scalar);
  m.attr("ISA_AVX512") = static_cast<int>(Isa::Avx512);
  m.attr("ISA_AVX512_BF16") = static_cast<int>(Isa::Avx512Bf16);
  m.def("isa_name", [](int isa) { return lola::cpu::isa_name(static_cast<Isa>(isa)); });
}
