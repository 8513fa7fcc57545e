// pybind11 module `lolakernels._cuda`: the CUDA decode backend on raw device pointers.
//
// No torch header is used (the build may see only a CPU PyTorch): Python passes
// tensor.data_ptr() integers, sizes, strides and the integer handle of the CUDA stream
// (torch.cuda.current_stream(device).cuda_stream). The calling Python code is
// responsible for validation and for making the tensors' device current.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

#include "../cuda/nf4.cuh"
#include "../cuda/shared_basis_lora.cuh"

namespace py = pybind11;

namespace {

#define LOLA_STRINGIFY_IMPL(...) #__VA_ARGS__
#define LOLA_STRINGIFY(...) LOLA_STRINGIFY_IMPL(__VA_ARGS__)

#ifdef LOLA_CUDA_ARCHS
// One CMake-style architecture entry in nvcc terms: "80-real" -> "sm_80",
// "90-virtual" -> "compute_90", "90a" / "90" -> "sm_90a" / "sm_90"; "sm_*" and
// "compute_*" entries are kept as they are.
std::string normalize_arch(std::string arch) {
  const auto strip = [](std::string& text) {
    const char* blanks = " \t\"";
    text.erase(0, text.find_first_not_of(blanks));
    const auto end = text.find_last_not_of(blanks);
    text.erase(end == std::string::npos ? 0 : end + 1);
  };
  strip(arch);
  if (arch.empty() || arch.rfind("sm_", 0) == 0 || arch.rfind("compute_", 0) == 0) return arch;
  const auto ends_with = [&arch](const std::string& tail) {
    return arch.size() > tail.size() && arch.compare(arch.size() - tail.size(), tail.size(), tail) == 0;
  };
  if (ends_with("-virtual")) return "compute_" + arch.substr(0, arch.size() - 8);
  if (ends_with("-real")) return "sm_" + arch.substr(0, arch.size() - 5);
  return "sm_" + arch;
}
#endif

// LOLA_CUDA_ARCHS may be defined bare (-DLOLA_CUDA_ARCHS=sm_80,sm_90) or as a string
// literal (CMake: LOLA_CUDA_ARCHS="80-real,90-real,90-virtual"); ',' or ';' separated.
std::string compiled_archs() {
#ifdef LOLA_CUDA_ARCHS
  const std::string raw = LOLA_STRINGIFY(LOLA_CUDA_ARCHS);
  std::string result;
  std::string entry;
  for (size_t i = 0; i <= raw.size(); ++i) {
    if (i == raw.size() || raw[i] == ',' || raw[i] == ';') {
      entry = normalize_arch(entry);
      if (!entry.empty()) result += (result.empty() ? "" : ",") + entry;
      entry.clear();
    } else {
      entry += raw[i];
    }
  }
  return result.empty() ? std::string("unknown") : result;
#else
  return "unknown";
#endif
}

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
  }
}

void shared_basis_lora_decode(
    std::uintptr_t out_ptr, int64_t out_row_stride, int64_t out_offset,
    std::uintptr_t x_ptr, int64_t x_row_stride,
    std::uintptr_t lora_a_ptr, std::uintptr_t lora_b_ptr,
    std::uintptr_t sigma_ptr, int sigma_kind,
    std::uintptr_t ids_ptr, std::uintptr_t basis_of_ptr,
    float scale, std::uintptr_t adapter_scale_ptr, std::uintptr_t ranks_ptr,
    std::uintptr_t workspace_ptr,
    int64_t num_tokens, int64_t d_in, int64_t d_out, int64_t rank,
    int64_t num_adapters, int64_t num_clusters,
    int dtype, std::uintptr_t stream) {
  if (sigma_kind < 0 || sigma_kind > 2) {
    throw std::invalid_argument("shared_basis_lora_decode: sigma_kind must be 0 (none), 1 (diagonal) or 2 (full)");
  }
  if (dtype < 0 || dtype > 1) {
    throw std::invalid_argument("shared_basis_lora_decode: dtype must be 0 (float16) or 1 (bfloat16)");
  }
  cudaError_t err;
  {
    // The launch is asynchronous; release the GIL only around the enqueue.
    py::gil_scoped_release release;
    err = lola::cuda::shared_basis_lora_decode(
        as_ptr<void>(out_ptr), out_row_stride, out_offset,
        as_ptr<const void>(x_ptr), x_row_stride,
        as_ptr<const void>(lora_a_ptr), as_ptr<const void>(lora_b_ptr),
        as_ptr<const void>(sigma_ptr), static_cast<lola::cuda::SigmaKind>(sigma_kind),
        as_ptr<const int32_t>(ids_ptr), as_ptr<const int32_t>(basis_of_ptr),
        scale, as_ptr<const float>(adapter_scale_ptr),
        as_ptr<const int32_t>(ranks_ptr),
        as_ptr<float>(workspace_ptr),
        num_tokens, d_in, d_out, rank, num_adapters, num_clusters,
        static_cast<lola::cuda::DType>(dtype), reinterpret_cast<cudaStream_t>(stream));
  }
  check(err, "shared_basis_lora_decode");
}

void nf4_gemv(
    std::uintptr_t out_ptr, int64_t out_row_stride,
    std::uintptr_t x_ptr, int64_t x_row_stride,
    std::uintptr_t packed_ptr, int64_t numel, int64_t blocksize,
    std::uintptr_t absmax_ptr, std::uintptr_t absmax_q_ptr, std::uintptr_t absmax_code_ptr,
    std::uintptr_t absmax_scale_ptr, int64_t absmax_blocksize, std::uintptr_t absmax_offset_ptr,
    int64_t n, int64_t k,
    std::uintptr_t bias_ptr, std::uintptr_t lora_h_ptr, std::uintptr_t lora_b_ptr, int64_t rank, float scale,
    std::uintptr_t dora_scale_ptr, int64_t num_tokens, int dtype, std::uintptr_t stream) {
  if (dtype < 0 || dtype > 1) {
    throw std::invalid_argument("nf4_gemv: dtype must be 0 (float16) or 1 (bfloat16)");
  }
  if (num_tokens < 1 || num_tokens > lola::cuda::kNf4GemvMaxTokens) {
    throw std::invalid_argument("nf4_gemv: num_tokens must be in [1, " +
                                std::to_string(lola::cuda::kNf4GemvMaxTokens) + "]");
  }
  if (lola::power_of_two_shift(blocksize) < 1) {
    throw std::invalid_argument("nf4_gemv: blocksize must be a power of two >= 2, got " + std::to_string(blocksize));
  }
  if (absmax_ptr == 0 && lola::power_of_two_shift(absmax_blocksize) < 0) {
    throw std::invalid_argument("nf4_gemv: a double-quantized absmax needs a power-of-two absmax_blocksize, got " +
                                std::to_string(absmax_blocksize));
  }
  const lola::Nf4Storage weight{as_ptr<const uint8_t>(packed_ptr), numel, blocksize, as_ptr<const float>(absmax_ptr),
                                as_ptr<const uint8_t>(absmax_q_ptr), as_ptr<const float>(absmax_code_ptr),
                                as_ptr<const float>(absmax_scale_ptr), absmax_blocksize,
                                as_ptr<const float>(absmax_offset_ptr),
                                lola::power_of_two_shift(absmax_blocksize)};
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = lola::cuda::nf4_gemv(
        as_ptr<void>(out_ptr), out_row_stride, as_ptr<const void>(x_ptr), x_row_stride, weight, n, k,
        as_ptr<const void>(bias_ptr), as_ptr<const float>(lora_h_ptr), as_ptr<const float>(lora_b_ptr), rank, scale,
        as_ptr<const float>(dora_scale_ptr), num_tokens, static_cast<lola::cuda::DType>(dtype),
        reinterpret_cast<cudaStream_t>(stream));
  }
  check(err, "nf4_gemv");
}

// Number of CUDA devices visible to the runtime; 0 when there is no driver or device.
int device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // do not leave the error for the next runtime call
    return 0;
  }
  return count;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "lolakernels CUDA backend: shared-basis / multi-LoRA decode on raw device pointers.";

  m.def("shared_basis_lora_decode", &shared_basis_lora_decode,
        py::arg("out_ptr"), py::arg("out_row_stride"), py::arg("out_offset"),
        py::arg("x_ptr"), py::arg("x_row_stride"),
        py::arg("lora_a_ptr"), py::arg("lora_b_ptr"),
        py::arg("sigma_ptr"), py::arg("sigma_kind"),
        py::arg("ids_ptr"), py::arg("basis_of_ptr"),
        py::arg("scale"), py::arg("adapter_scale_ptr"), py::arg("ranks_ptr"),
        py::arg("workspace_ptr"),
        py::arg("num_tokens"), py::arg("d_in"), py::arg("d_out"), py::arg("rank"),
        py::arg("num_adapters"), py::arg("num_clusters"),
        py::arg("dtype"), py::arg("stream"),
        "out[t, out_offset:out_offset+d_out] += lora_b[c] @ (s * sigma_a(lora_a[c] @ x[t])) for each "
        "token t with a valid adapter (see lolakernels/reference/shared_basis_lora.py). Pointers are "
        "device addresses (0 for an absent sigma / adapter_scale / ranks); sigma_kind: 0 none, "
        "1 diagonal [N, R], 2 full [N, R, R]; dtype: 0 float16, 1 bfloat16; workspace: at least "
        "num_tokens * rank fp32; stream: cudaStream_t as an integer. Enqueues on the stream on the "
        "current device; raises RuntimeError with the CUDA error string on failure.");

  m.def("nf4_gemv", &nf4_gemv,
        py::arg("out_ptr"), py::arg("out_row_stride"), py::arg("x_ptr"), py::arg("x_row_stride"),
        py::arg("packed_ptr"), py::arg("numel"), py::arg("blocksize"),
        py::arg("absmax_ptr"), py::arg("absmax_q_ptr"), py::arg("absmax_code_ptr"), py::arg("absmax_scale_ptr"),
        py::arg("absmax_blocksize"), py::arg("absmax_offset_ptr"), py::arg("n"), py::arg("k"),
        py::arg("bias_ptr"), py::arg("lora_h_ptr"), py::arg("lora_b_ptr"), py::arg("rank"), py::arg("scale"),
        py::arg("dora_scale_ptr"), py::arg("num_tokens"), py::arg("dtype"), py::arg("stream"),
        "out[m, :] = nf4 linear of x[m, :] (+ bias, + LoRA expand of h = x . lora_a^T, DoRA when dora_scale) for "
        "m < num_tokens <= nf4_gemv_max_tokens (see csrc/cuda/nf4.cuh). Weight: bitsandbytes' packed nf4 bytes "
        "with fp32 absmax, or (absmax 0) uint8 absmax_q + absmax_code [256] + absmax_scale + the fp32 offset (a pointer, read on the device). Pointers are "
        "device addresses (0 when absent); h, lora_b and dora_scale are fp32; dtype: 0 float16, 1 bfloat16 (x, "
        "bias, out); stream: cudaStream_t as an integer. Raises RuntimeError with the CUDA error on failure.");
  m.attr("nf4_gemv_max_tokens") = py::int_(lola::cuda::kNf4GemvMaxTokens);

  m.attr("decode_max_tokens") = py::int_(lola::cuda::kDecodeMaxTokens);
  m.attr("max_rank") = py::int_(lola::cuda::kMaxRank);

  m.def("device_count", &device_count,
        "Number of CUDA devices visible to the CUDA runtime (0 when no driver or device).");
  m.def("compiled_archs", &compiled_archs,
        "Comma-separated CUDA architectures the extension was built for (e.g. 'sm_80,sm_90'), "
        "or 'unknown'.");
}
