// Reading a tensor's description from a DLPack capsule (torch.utils.dlpack.to_dlpack), so that a
// binding can check and launch a call from one C++ function instead of reading each tensor's
// shape, dtype, device and pointer through Python (~35 attribute reads on the per-layer CPU path,
// ~60 µs right after a cache-evicting GEMM, against ~20 µs for the seven capsules).
//
// The structs are the DLPack C ABI (dmlc/dlpack, dlpack.h, "legacy" unversioned DLManagedTensor
// in a capsule named "dltensor"), which every version of torch exports and which does not change
// between releases, so the extension still loads under any PyTorch.
#pragma once
#include <Python.h>

#include <cstdint>
#include <utility>

namespace lola::dlpack {

struct Device {
  int32_t device_type;  // kDLCPU = 1
  int32_t device_id;
};

struct DataType {
  uint8_t code;  // kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; nullptr means compact row-major
  uint64_t byte_offset;
};

struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};

constexpr int32_t kCpu = 1;
constexpr uint8_t kInt = 0;
constexpr uint8_t kFloat = 2;
constexpr uint8_t kBfloat = 4;

// The tensor a "dltensor" capsule describes, or nullptr if `object` is not one. The capsule keeps
// its tensor alive and frees it when Python drops the capsule (it is not consumed here).
inline const Tensor* tensor_of(PyObject* object) {
  if (!PyCapsule_IsValid(object, "dltensor")) return nullptr;
  return &static_cast<ManagedTensor*>(PyCapsule_GetPointer(object, "dltensor"))->dl_tensor;
}

inline bool is_cpu(const Tensor& t) { return t.device.device_type == kCpu; }

inline bool has_type(const Tensor& t, uint8_t code, uint8_t bits) {
  return t.dtype.code == code && t.dtype.bits == bits && t.dtype.lanes == 1;
}

inline int64_t stride(const Tensor& t, int dim) {
  if (t.strides != nullptr) return t.strides[dim];
  int64_t compact = 1;
  for (int d = t.ndim - 1; d > dim; --d) compact *= t.shape[d];
  return compact;
}

// torch's is_contiguous: row-major strides on every dimension of size > 1, or no elements.
inline bool is_contiguous(const Tensor& t) {
  if (t.strides == nullptr) return true;
  for (int d = 0; d < t.ndim; ++d)
    if (t.shape[d] == 0) return true;
  int64_t expected = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    if (t.shape[d] != 1 && t.strides[d] != expected) return false;
    expected *= t.shape[d];
  }
  return true;
}

inline const void* data(const Tensor& t) { return static_cast<const char*>(t.data) + t.byte_offset; }

// [first, last) bytes the tensor's elements span (non-negative strides, as torch's); empty if no elements.
inline std::pair<uintptr_t, uintptr_t> byte_span(const Tensor& t) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(data(t));
  int64_t last_element = 0;
  for (int d = 0; d < t.ndim; ++d) {
    if (t.shape[d] == 0) return {first, first};
    last_element += (t.shape[d] - 1) * stride(t, d);
  }
  return {first, first + static_cast<uintptr_t>((last_element + 1) * ((t.dtype.bits + 7) / 8))};
}

inline bool overlap(const Tensor& a, const Tensor& b) {
  const auto [a_first, a_last] = byte_span(a);
  const auto [b_first, b_last] = byte_span(b);
  return a_first < a_last && b_first < b_last && a_first < b_last && b_first < a_last;
}

}  // namespace lola::dlpack
