// Portable tile kernels: the fallback on CPUs without AVX-512 and the cross-check for the fast ones.
#include "../common/bf16.h"
#include "microkernels.h"

namespace lola::cpu {
namespace {

template <typename Element>
float load_as_float(const Element* data, int64_t index);
template <>
float load_as_float<float>(const float* data, int64_t index) { return data[index]; }
template <>
float load_as_float<uint16_t>(const uint16_t* data, int64_t index) { return bf16_to_float(data[index]); }

inline void store_from_float(float* data, int64_t index, float value) { data[index] = value; }
inline void store_from_float(uint16_t* data, int64_t index, float value) { data[index] = float_to_bf16(value); }

template <typename Element>
void shrink(const void* const* x_rows, const void* a_rows, int64_t a_stride, int64_t length, int num_tokens,
            int num_ranks, float* h, int64_t h_stride) {
  const auto* a = static_cast<const Element*>(a_rows);
  for (int i = 0; i < num_tokens; ++i) {
    const auto* x = static_cast<const Element*>(x_rows[i]);
    for (int k = 0; k < num_ranks; ++k) {
      float sum = 0.0f;
      for (int64_t d = 0; d < length; ++d) sum += load_as_float(x, d) * load_as_float(a, k * a_stride + d);
      h[i * h_stride + k] += sum;
    }
  }
}

template <typename Element>
void expand(const void* g_rows, int64_t g_stride, const void* panel_data, int64_t rank,
            void* const* out_rows, int num_tokens, int num_cols) {
  const auto* g = static_cast<const float*>(g_rows);
  const auto* panel = static_cast<const float*>(panel_data);
  for (int i = 0; i < num_tokens; ++i) {
    auto* out = static_cast<Element*>(out_rows[i]);
    for (int j = 0; j < num_cols; ++j) {
      float sum = 0.0f;
      for (int64_t k = 0; k < rank; ++k) sum += g[i * g_stride + k] * panel[k * kExpandCols + j];
      store_from_float(out, j, load_as_float(out, j) + sum);
    }
  }
}

template <typename Element>
void expand_rows(const void* g_rows, int64_t g_stride, const void* b_rows, int64_t rank, void* const* out_rows,
                 int num_tokens, int num_cols) {
  const auto* g = static_cast<const float*>(g_rows);
  const auto* b = static_cast<const Element*>(b_rows);
  for (int i = 0; i < num_tokens; ++i) {
    auto* out = static_cast<Element*>(out_rows[i]);
    for (int j = 0; j < num_cols; ++j) {
      float sum = 0.0f;
      for (int64_t k = 0; k < rank; ++k) sum += g[i * g_stride + k] * load_as_float(b, j * rank + k);
      store_from_float(out, j, load_as_float(out, j) + sum);
    }
  }
}

template <typename Element>
void sigma_full(const void* sigma_rows, const float* h, int64_t rank, int64_t true_rank, float* g) {
  const auto* sigma = static_cast<const Element*>(sigma_rows);
  for (int64_t j = 0; j < rank; ++j) {
    float sum = 0.0f;
    for (int64_t k = 0; k < true_rank; ++k) sum += load_as_float(sigma, j * rank + k) * h[k];
    g[j] = sum;
  }
}

template <typename Element>
void shrink_packed(const void* const* x_rows, const void* panel_data, int64_t stride, int64_t length,
                   int num_tokens, int num_ranks, float* h, int64_t h_stride) {
  const auto* panel = static_cast<const float*>(panel_data);
  for (int i = 0; i < num_tokens; ++i) {
    const auto* x = static_cast<const Element*>(x_rows[i]);
    for (int k = 0; k < num_ranks; ++k) {
      float sum = 0.0f;
      for (int64_t d = 0; d < length; ++d) sum += load_as_float(x, d) * panel[d * stride + k];
      h[i * h_stride + k] += sum;
    }
  }
}

void transpose(const void* src, int64_t src_row_bytes, bool widen_bf16, int64_t rows, int64_t cols, uint32_t* dst,
               int64_t dst_stride) {
  const auto* bytes = static_cast<const char*>(src);
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = bytes + r * src_row_bytes;
    for (int64_t c = 0; c < cols; ++c) {
      uint32_t word;
      if (widen_bf16) {
        uint16_t bits;
        __builtin_memcpy(&bits, row + 2 * c, sizeof(bits));
        word = static_cast<uint32_t>(bits) << 16;
      } else {
        __builtin_memcpy(&word, row + 4 * c, sizeof(word));
      }
      dst[c * dst_stride + r] = word;
    }
  }
}

}  // namespace

MicroKernels scalar_kernels(bool bf16) {
  if (bf16)
    return {&shrink<uint16_t>, &expand<uint16_t>, &expand_rows<uint16_t>, &sigma_full<uint16_t>,
            &shrink_packed<uint16_t>, PanelLayout::Float32Rows, &transpose};
  return {&shrink<float>, &expand<float>, &expand_rows<float>, &sigma_full<float>, &shrink_packed<float>,
          PanelLayout::Float32Rows, &transpose};
}

}  // namespace lola::cpu
