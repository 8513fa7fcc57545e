// Portable nf4 kernels: the fallback on CPUs without AVX-512, and the decoder for odd shapes.
#include <algorithm>

#include "../common/bf16.h"
#include "../common/fp16.h"
#include "nf4_kernels.h"

namespace lola::cpu {
namespace {

constexpr float kCode[16] = {LOLA_NF4_CODE_VALUES};

float round_to(float value, Nf4Element type) {
  switch (type) {
    case Nf4Element::BFloat16: return bf16_to_float(float_to_bf16(value));
    default: return value;
  }
}

float load(const void* data, int64_t index, Nf4Element type) {
  return type == Nf4Element::BFloat16 ? bf16_to_float(static_cast<const uint16_t*>(data)[index])
                                      : static_cast<const float*>(data)[index];
}

void store(void* data, int64_t index, float value, Nf4Element type) {
  switch (type) {
    case Nf4Element::Float32: static_cast<float*>(data)[index] = value; break;
    case Nf4Element::BFloat16: static_cast<uint16_t*>(data)[index] = float_to_bf16(value); break;
    case Nf4Element::Float16: static_cast<uint16_t*>(data)[index] = float_to_half(value); break;
  }
}

void dequantize(const Nf4Storage& w, int64_t begin, int64_t count, void* out, Nf4Element out_type) {
  int64_t block = -1;
  float absmax = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t j = begin + i;
    if (j / w.blocksize != block) {
      block = j / w.blocksize;
      absmax = nf4_absmax(w, block);
    }
    const float value = kCode[nf4_index(w.packed, j)] * absmax;
    store(out, i, value, out_type);
  }
}

void dot(const void* x, int64_t x_stride, const void* tile, int64_t tile_stride, int64_t kp, int tokens, int rows,
         float* acc, int64_t acc_stride, Nf4Element compute) {
  for (int i = 0; i < tokens; ++i) {
    for (int r = 0; r < rows; ++r) {
      float sum = 0.0f;
      for (int64_t c = 0; c < kp; ++c)
        sum += load(x, i * x_stride + c, compute) * load(tile, r * tile_stride + c, compute);
      acc[i * acc_stride + r] = sum;
    }
  }
}

void epilogue(const Nf4Epilogue& e, const float* acc, int64_t n0, int64_t count, const float* bt, void* out) {
  // DoRA's (base − bias) is formed in the promoted type of the two, as PEFT's subtraction does.
  const Nf4Element promoted = (e.out_type == Nf4Element::BFloat16 && e.compute == Nf4Element::BFloat16)
                                  ? Nf4Element::BFloat16 : Nf4Element::Float32;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t n = n0 + j;
    const float bias = e.bias ? load(e.bias, n, e.compute) : 0.0f;
    float value = acc[j];
    if (e.bias) value = value + bias;
    value = round_to(round_to(value, e.compute), e.out_type);
    // A rank-0 adapter has no h, but DoRA still rescales the base by its magnitude.
    if (e.h || e.dora_scale) {
      float t = 0.0f;
      for (int64_t r = 0; e.h && r < e.rank; ++r) t += e.h[r] * bt[r * count + j];
      if (e.dora_scale) {
        const float s = e.dora_scale[n];
        const float base = e.bias ? round_to(value - bias, promoted) : value;
        const float kept = (s - 1.0f) * base;
        const float added = (s * t) * e.scale;
        value = round_to(value + (kept + added), e.out_type);
      } else {
        value = round_to(value + round_to(t * e.scale, e.out_type), e.out_type);
      }
    }
    store(out, j, value, e.out_type);
  }
}

}  // namespace

void nf4_decode_rows_generic(const Nf4Storage& w, int64_t k, int64_t row0, int64_t rows, void* tile,
                             int64_t tile_stride, Nf4Element compute) {
  const int64_t kp = (k + 31) / 32 * 32;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t first = (row0 + r) * k;
    int64_t block = -1;
    float absmax = 0.0f;
    for (int64_t c = 0; c < k; ++c) {
      const int64_t j = first + c;
      if (j / w.blocksize != block) {
        block = j / w.blocksize;
        absmax = nf4_absmax(w, block);
      }
      const float value = kCode[nf4_index(w.packed, j)] * absmax;
      store(tile, r * tile_stride + c, round_to(value, compute), compute);
    }
    for (int64_t c = k; c < kp; ++c) store(tile, r * tile_stride + c, 0.0f, compute);
  }
}

Nf4Kernels nf4_scalar_kernels() {
  return Nf4Kernels{&dequantize, &nf4_decode_rows_generic, &dot, nullptr, nullptr, &epilogue};
}

}  // namespace lola::cpu
