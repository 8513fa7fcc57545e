// Shared-basis / multi-LoRA decode kernels (CUDA, fp16 / bf16 storage, fp32 math).
//
// Math (lolakernels/reference/shared_basis_lora.py). For each token t with adapter
// a = ids[t] in [0, N) and cluster c = basis_of[a] in [0, C), s = scale * adapter_scale[a],
// r_a = clamp(ranks[a], 0, R):
//
//     h[k] = sum_i lora_a[c, k, i] * x[t, i]            k < r_a      (else 0)     [R]
//     g[j] = s * h[j]                                   sigma None
//          = s * (sigma[a, j] * h[j])                   sigma [N, R]       (diag)
//          = s * sum_{k < r_a} sigma[a, j, k] * h[k]    sigma [N, R, R]    (full)
//            for j < r_a                                                   (else 0)
//     out[t, out_offset + j] = round(float(out[t, out_offset + j])
//                                    + sum_{k < r_a} lora_b[c, j, k] * g[k])   j < d_out
//
// Shapes: x [T, d_in] (row stride x_row_stride), lora_a [C, R, d_in], lora_b [C, d_out, R],
// sigma [N, R] / [N, R, R], workspace [T, R] fp32, out [T, >= out_offset + d_out]
// (row stride out_row_stride). Every sum is an fp32 accumulation; out is rounded once.
//
// Design (decode: T <= kDecodeMaxTokens, memory bound on the adapter weights):
//
//   1. shrink   grid (T, ceil(R / ROWS)), 256 threads. The block owns ROWS consecutive
//      ranks k of one token. Because lora_a[c] is [R, d_in] with d_in contiguous, each
//      rank row is one contiguous stretch of memory: the 256 threads sweep it together in
//      16-byte vectors (8 elements), so every warp load is a fully coalesced 512-byte
//      segment, and the 16-byte x[t] vector loaded once is reused for the ROWS rows.
//      Per-thread fp32 partial sums -> warp shuffle reduction -> shared memory -> h[k] in
//      workspace [T, R]. Ranks k >= r_a are not read at all (h[k] = 0 is written).
//      lora_a[c] rows of a token are read exactly once per token; x[t] is re-read by the
//      ceil(R / ROWS) blocks of a token, from L2/L1 (it is tiny compared to lora_a[c]).
//
//   2. mix (only for a full sigma with R >= 64 and more than one d_out tile): one block
//      per token turns h into g in place in the workspace, so that the R x R matvec is
//      done once per token instead of once per (token, d_out tile) block.
//
//   3. expand   grid (T, ceil(d_out / tile_rows)), 256 threads, dynamic shared memory
//      R (or 2 R for a full sigma) floats. The block loads h[t] into shared memory, forms
//      g there (sigma, s, rank mask), then computes out rows j of its tile. lora_b[c] is
//      [d_out, R] with R contiguous, so a tile of consecutive rows j is ONE contiguous
//      block of memory: a group of G lanes (G = pow2ceil(R / 8) capped at 32) handles one
//      row with 16-byte vector loads, the 32 / G groups of a warp take consecutive rows,
//      so each warp load instruction reads one contiguous, fully used stretch of lora_b.
//      Group shuffle reduction, then one lane per row reads out, adds in fp32 and rounds
//      once. lora_b[c] is read once per token; columns k >= ceil8(r_a) are skipped.
//      A full sigma (R x R, row-major, same layout as lora_b) reuses the same row-dot
//      machinery with h as the vector.
//
// Vector (16-byte) paths are used only when the run-time check passes (base pointer
// 16-byte aligned and d_in / x_row_stride, or R, multiples of 8); otherwise a scalar
// path with coalesced 2-byte loads is taken. Odd d_in / d_out / R are all handled.
//
// Numerics: the order of the fp32 additions differs from the PyTorch oracle (expected
// round-off only). Weights beyond the true rank (lora_a rows k >= r_a, sigma columns
// k >= r_a) are never read; the oracle multiplies them by 0, which only differs if they
// hold Inf/NaN.

#include "shared_basis_lora.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lola::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kVec = 8;  // elements per 16-byte vector of 2-byte scalars

constexpr int kShrinkThreads = 256;
constexpr int kShrinkWarps = kShrinkThreads / kWarpSize;
constexpr int kShrinkMaxRows = 4;

constexpr int kExpandThreads = 256;
constexpr int kExpandWarps = kExpandThreads / kWarpSize;
constexpr int kExpandMaxPasses = 4;

// Enough blocks to give every SM of an H100 (132 SMs) about two blocks: below that the
// launch heuristics trade per-block reuse for more blocks in flight.
constexpr int64_t kTargetBlocks = 256;
// A full sigma at least this large is applied by the separate mix kernel.
constexpr int kMixMinRank = 64;

// ------------------------------------------------------------------------------------
// Scalar traits.

template <typename T>
struct Traits;

template <>
struct Traits<__half> {
  using T2 = __half2;
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Traits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// 8 consecutive elements (16 bytes, p must be 16-byte aligned) converted to fp32.
template <typename T>
__device__ __forceinline__ void load_vec8(const T* p, float (&f)[kVec]) {
  using T2 = typename Traits<T>::T2;
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    T2 pair;
    static_assert(sizeof(pair) == sizeof(uint32_t), "2 x 16-bit scalar");
    __builtin_memcpy(&pair, &words[i], sizeof(pair));
    const float2 v = Traits<T>::to_float2(pair);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

template <typename T>
__device__ __forceinline__ float load_scalar(const T* p) {
  return Traits<T>::to_float(__ldg(p));
}

// Sum over aligned groups of `group` lanes (a power of two <= 32); every lane of the warp
// must call it (full-mask shuffles); every lane of a group gets the group's sum.
__device__ __forceinline__ float group_sum(float v, int group) {
  for (int offset = group >> 1; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// ------------------------------------------------------------------------------------
// Launch parameters (one struct for every kernel: raw pointers, sizes, launch choices).

struct Params {
  void* out;
  int64_t out_row_stride;
  int64_t out_offset;
  const void* x;
  int64_t x_row_stride;
  const void* lora_a;
  const void* lora_b;
  const void* sigma;
  int sigma_kind;  // SigmaKind
  const int32_t* ids;
  const int32_t* basis_of;
  float scale;
  const float* adapter_scale;
  const int32_t* ranks;
  float* workspace;
  int64_t num_tokens;
  int64_t d_in;
  int64_t d_out;
  int rank;
  int64_t num_adapters;
  int64_t num_clusters;
  // Launch-time choices.
  int group;       // lanes per row in the row-dot kernels (power of two <= 32)
  int group_log2;  // log2(group): lane -> group index by shift (no run-time division)
  int passes;      // expand: rows handled per group in one block (<= kExpandMaxPasses)
  bool sigma_vec;  // full sigma rows readable with 16-byte vectors
  bool g_ready;    // workspace already holds g (mix kernel ran)
};

constexpr int kSigmaDiagonal = static_cast<int>(SigmaKind::Diagonal);
constexpr int kSigmaFull = static_cast<int>(SigmaKind::Full);

// Adapter, cluster and true rank of token t; false when the token is skipped.
__device__ __forceinline__ bool resolve_token(const Params& p, int64_t t, int64_t& adapter,
                                              int64_t& cluster, int& true_rank) {
  const int32_t id = p.ids[t];
  if (id < 0 || static_cast<int64_t>(id) >= p.num_adapters) return false;
  const int32_t c = p.basis_of[id];
  if (c < 0 || static_cast<int64_t>(c) >= p.num_clusters) return false;
  int r = p.rank;
  if (p.ranks != nullptr) {
    r = p.ranks[id];
    r = r < 0 ? 0 : (r > p.rank ? p.rank : r);
  }
  adapter = id;
  cluster = c;
  true_rank = r;
  return true;
}

__device__ __forceinline__ float token_scale(const Params& p, int64_t adapter) {
  return p.adapter_scale != nullptr ? p.scale * p.adapter_scale[adapter] : p.scale;
}

// ------------------------------------------------------------------------------------
// 1. shrink: h[t, k] = lora_a[c, k, :] . x[t, :] for the ROWS ranks of this block.

template <typename T, int ROWS, bool VEC>
__global__ void __launch_bounds__(kShrinkThreads) shrink_kernel(Params p) {
  const int64_t t = blockIdx.x;
  int64_t adapter, cluster;
  int true_rank;
  if (!resolve_token(p, t, adapter, cluster, true_rank)) return;

  const int rank = p.rank;
  const int k0 = static_cast<int>(blockIdx.y) * ROWS;
  float* __restrict__ h = p.workspace + t * rank;
  // Rows of this block below the true rank: the only ones read.
  int active = true_rank - k0;
  active = active < 0 ? 0 : (active > ROWS ? ROWS : active);
  if (active == 0) {  // block-uniform
    if (threadIdx.x < ROWS && k0 + static_cast<int>(threadIdx.x) < rank) h[k0 + threadIdx.x] = 0.f;
    return;
  }

  const int64_t d_in = p.d_in;
  const T* __restrict__ xr = static_cast<const T*>(p.x) + t * p.x_row_stride;
  const T* __restrict__ ar = static_cast<const T*>(p.lora_a) + (cluster * rank + k0) * d_in;

  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;

  if constexpr (VEC) {
    const int64_t chunks = d_in / kVec;
#pragma unroll 2
    for (int64_t i = threadIdx.x; i < chunks; i += kShrinkThreads) {
      float xv[kVec];
      load_vec8<T>(xr + i * kVec, xv);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r < active) {
          float av[kVec];
          load_vec8<T>(ar + r * d_in + i * kVec, av);
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[r] = fmaf(av[e], xv[e], acc[r]);
        }
      }
    }
  } else {
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < d_in; i += kShrinkThreads) {
      const float xv = load_scalar<T>(xr + i);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r < active) acc[r] = fmaf(load_scalar<T>(ar + r * d_in + i), xv, acc[r]);
      }
    }
  }

  __shared__ float partial[ROWS][kShrinkWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float v = group_sum(acc[r], kWarpSize);
    if (lane == 0) partial[r][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < ROWS) {
    const int r = threadIdx.x;
    if (k0 + r < rank) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kShrinkWarps; ++w) sum += partial[r][w];
      h[k0 + r] = r < active ? sum : 0.f;
    }
  }
}

// ------------------------------------------------------------------------------------
// Row dot products, shared by the full-sigma matvec and the expand.
//
// `row` is one row of a row-major [*, R] matrix (R contiguous), `v` an fp32 vector in
// shared memory (16-byte aligned when VEC) whose entries >= ncols are zero. The `group`
// lanes of a group split the row: lane l reads vectors l, l + group, ... Returns this
// lane's partial sum (0 when !valid); combine with group_sum. With VEC the row is read
// up to ceil8(ncols) <= R columns (R % 8 == 0 then), which stays inside the row.

template <typename T, bool VEC>
__device__ __forceinline__ float row_dot_partial(const T* __restrict__ row, const float* v,
                                                 int ncols, int lane_in_group, int group,
                                                 bool valid) {
  float acc = 0.f;
  if (!valid) return acc;
  if constexpr (VEC) {
    const int nvec = (ncols + kVec - 1) / kVec;
    const float4* v4 = reinterpret_cast<const float4*>(v);
    for (int q = lane_in_group; q < nvec; q += group) {
      float w[kVec];
      load_vec8<T>(row + q * kVec, w);
      const float4 v0 = v4[2 * q];
      const float4 v1 = v4[2 * q + 1];
      acc = fmaf(w[0], v0.x, acc);
      acc = fmaf(w[1], v0.y, acc);
      acc = fmaf(w[2], v0.z, acc);
      acc = fmaf(w[3], v0.w, acc);
      acc = fmaf(w[4], v1.x, acc);
      acc = fmaf(w[5], v1.y, acc);
      acc = fmaf(w[6], v1.z, acc);
      acc = fmaf(w[7], v1.w, acc);
    }
  } else {
    for (int k = lane_in_group; k < ncols; k += group) {
      acc = fmaf(load_scalar<T>(row + k), v[k], acc);
    }
  }
  return acc;
}

// g (shared, [R]) from h (workspace row, fp32): sigma, multiplier s, rank mask. Block-wide:
// every thread of the block must call it. `h_smem` ([R], shared, only used for a full
// sigma) must not overlap g. The caller synchronises before reading g.
template <typename T>
__device__ __forceinline__ void compute_g(const Params& p, float* g, float* h_smem, const float* ws_row,
                          int64_t adapter, int true_rank) {
  const int rank = p.rank;
  const float s = token_scale(p, adapter);
  if (p.sigma_kind == kSigmaFull) {
    for (int k = threadIdx.x; k < rank; k += blockDim.x) h_smem[k] = k < true_rank ? ws_row[k] : 0.f;
    __syncthreads();
    const int group = p.group;
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    const int groups_per_warp = kWarpSize >> p.group_log2;
    const int lane_in_group = lane & (group - 1);
    const int rows_per_pass = static_cast<int>(blockDim.x / kWarpSize) * groups_per_warp;
    const T* __restrict__ sa = static_cast<const T*>(p.sigma) + adapter * rank * rank;
    for (int jb = 0; jb < rank; jb += rows_per_pass) {  // block-uniform trip count
      const int j = jb + warp * groups_per_warp + (lane >> p.group_log2);
      const bool valid = j < true_rank;
      const T* row = valid ? sa + static_cast<int64_t>(j) * rank : sa;
      float d = p.sigma_vec
                    ? row_dot_partial<T, true>(row, h_smem, true_rank, lane_in_group, group, valid)
                    : row_dot_partial<T, false>(row, h_smem, true_rank, lane_in_group, group, valid);
      d = group_sum(d, group);
      if (lane_in_group == 0 && j < rank) g[j] = valid ? s * d : 0.f;
    }
  } else if (p.sigma_kind == kSigmaDiagonal) {
    const T* __restrict__ sa = static_cast<const T*>(p.sigma) + adapter * rank;
    for (int k = threadIdx.x; k < rank; k += blockDim.x) {
      g[k] = k < true_rank ? s * (load_scalar<T>(sa + k) * ws_row[k]) : 0.f;
    }
  } else {
    for (int k = threadIdx.x; k < rank; k += blockDim.x) g[k] = k < true_rank ? s * ws_row[k] : 0.f;
  }
}

// ------------------------------------------------------------------------------------
// 2. mix: workspace row h -> g in place (full sigma, large R). Dynamic smem: 2 R floats.

template <typename T>
__global__ void __launch_bounds__(kExpandThreads) mix_kernel(Params p) {
  extern __shared__ __align__(16) float smem[];
  const int64_t t = blockIdx.x;
  int64_t adapter, cluster;
  int true_rank;
  if (!resolve_token(p, t, adapter, cluster, true_rank)) return;
  const int rank = p.rank;
  float* ws_row = p.workspace + t * rank;
  float* g = smem;
  compute_g<T>(p, g, smem + rank, ws_row, adapter, true_rank);  // reads ws_row
  __syncthreads();
  for (int k = threadIdx.x; k < rank; k += blockDim.x) ws_row[k] = g[k];  // then overwrites it
}

// ------------------------------------------------------------------------------------
// 3. expand: out[t, off + j] += lora_b[c, j, :] . g for the rows j of this tile.
// Dynamic smem: R floats (g), plus R (h) when a full sigma is applied here.

// Minimum 6 blocks / SM: lets ptxas use up to 40 registers (no spill on sm_80, where the
// default 32-register choice spilled one value) while keeping 1536 threads / SM in flight.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kExpandThreads, 6) expand_kernel(Params p) {
  extern __shared__ __align__(16) float smem[];
  const int64_t t = blockIdx.x;
  int64_t adapter, cluster;
  int true_rank;
  if (!resolve_token(p, t, adapter, cluster, true_rank)) return;
  const int rank = p.rank;
  const float* ws_row = p.workspace + t * rank;
  float* g = smem;
  if (p.g_ready) {
    for (int k = threadIdx.x; k < rank; k += blockDim.x) g[k] = k < true_rank ? ws_row[k] : 0.f;
  } else {
    compute_g<T>(p, g, smem + rank, ws_row, adapter, true_rank);
  }
  __syncthreads();

  const int group = p.group;
  const int passes = p.passes;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int groups_per_warp = kWarpSize >> p.group_log2;
  const int lane_in_group = lane & (group - 1);
  const int rows_per_pass = kExpandWarps * groups_per_warp;
  const int64_t d_out = p.d_out;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * rows_per_pass * passes +
                       warp * groups_per_warp + (lane >> p.group_log2);
  const T* __restrict__ bc = static_cast<const T*>(p.lora_b) + cluster * d_out * rank;
  T* __restrict__ orow = static_cast<T*>(p.out) + t * p.out_row_stride + p.out_offset;

  // All loads of the tile first (independent, in flight together), then the reductions.
  float acc[kExpandMaxPasses];
#pragma unroll
  for (int q = 0; q < kExpandMaxPasses; ++q) {
    const int64_t j = row0 + static_cast<int64_t>(q) * rows_per_pass;
    const bool valid = q < passes && j < d_out;
    acc[q] = row_dot_partial<T, VEC>(valid ? bc + j * rank : bc, g, true_rank, lane_in_group,
                                     group, valid);
  }
#pragma unroll
  for (int q = 0; q < kExpandMaxPasses; ++q) {
    if (q < passes) {  // block-uniform
      const float d = group_sum(acc[q], group);
      const int64_t j = row0 + static_cast<int64_t>(q) * rows_per_pass;
      if (lane_in_group == 0 && j < d_out) {
        T* o = orow + j;
        *o = Traits<T>::from_float(Traits<T>::to_float(*o) + d);
      }
    }
  }
}

// ------------------------------------------------------------------------------------
// Host side.

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, int ROWS>
cudaError_t launch_shrink(const Params& p, bool vec, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(ceil_div(p.rank, ROWS)));
  if (vec) {
    shrink_kernel<T, ROWS, true><<<grid, kShrinkThreads, 0, stream>>>(p);
  } else {
    shrink_kernel<T, ROWS, false><<<grid, kShrinkThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_all(Params p, cudaStream_t stream) {
  const int64_t num_tokens = p.num_tokens;
  const int rank = p.rank;

  // 1. shrink: as many ranks per block as keeps >= kTargetBlocks blocks (reuse of x[t]).
  // x rows: the row stride only matters when there is more than one row.
  const bool a_vec = p.d_in % kVec == 0 && (num_tokens == 1 || p.x_row_stride % kVec == 0) &&
                     aligned16(p.x) && aligned16(p.lora_a);
  int rows = 1;
  if (num_tokens * ceil_div(rank, 4) >= kTargetBlocks) {
    rows = 4;
  } else if (num_tokens * ceil_div(rank, 2) >= kTargetBlocks) {
    rows = 2;
  }
  static_assert(kShrinkMaxRows == 4, "rows choices");
  cudaError_t err = rows == 4   ? launch_shrink<T, 4>(p, a_vec, stream)
                    : rows == 2 ? launch_shrink<T, 2>(p, a_vec, stream)
                                : launch_shrink<T, 1>(p, a_vec, stream);
  if (err != cudaSuccess) return err;

  // 3. expand geometry: G lanes per lora_b row, passes rows per group and block.
  const bool b_vec = rank % kVec == 0 && aligned16(p.lora_b);
  const bool full = p.sigma_kind == kSigmaFull;
  p.sigma_vec = full && rank % kVec == 0 && aligned16(p.sigma);
  p.group_log2 = 0;
  while ((1 << p.group_log2) < kWarpSize && (1 << p.group_log2) < (b_vec ? rank / kVec : rank)) {
    ++p.group_log2;
  }
  p.group = 1 << p.group_log2;  // pow2ceil(vectors (or scalars) per row), capped at 32
  const int64_t rows_per_pass = static_cast<int64_t>(kExpandWarps) * (kWarpSize >> p.group_log2);
  p.passes = 1;
  for (int cand = kExpandMaxPasses; cand > 1; cand /= 2) {
    if (num_tokens * ceil_div(p.d_out, rows_per_pass * cand) >= kTargetBlocks) {
      p.passes = cand;
      break;
    }
  }
  const int64_t tiles = ceil_div(p.d_out, rows_per_pass * p.passes);
  if (tiles > 65535) return cudaErrorInvalidValue;

  // 2. mix: a large full sigma is applied once per token instead of once per tile.
  p.g_ready = false;
  if (full && rank >= kMixMinRank && tiles > 1) {
    const size_t smem = 2 * static_cast<size_t>(rank) * sizeof(float);
    mix_kernel<T><<<static_cast<unsigned>(num_tokens), kExpandThreads, smem, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    p.g_ready = true;
  }

  const size_t smem = (full && !p.g_ready ? 2 : 1) * static_cast<size_t>(rank) * sizeof(float);
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(tiles));
  if (b_vec) {
    expand_kernel<T, true><<<grid, kExpandThreads, smem, stream>>>(p);
  } else {
    expand_kernel<T, false><<<grid, kExpandThreads, smem, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t shared_basis_lora_decode(
    void* out, int64_t out_row_stride, int64_t out_offset,
    const void* x, int64_t x_row_stride,
    const void* lora_a, const void* lora_b,
    const void* sigma, SigmaKind sigma_kind,
    const int32_t* ids, const int32_t* basis_of,
    float scale, const float* adapter_scale,
    const int32_t* ranks,
    float* workspace,
    int64_t num_tokens, int64_t d_in, int64_t d_out, int64_t rank,
    int64_t num_adapters, int64_t num_clusters,
    DType dtype, cudaStream_t stream) {
  if (num_tokens < 0 || d_in < 0 || d_out < 0 || rank < 0 || num_adapters < 0 ||
      num_clusters < 0 || out_row_stride < 0 || out_offset < 0 || x_row_stride < 0) {
    return cudaErrorInvalidValue;
  }
  if (sigma_kind != SigmaKind::None && sigma_kind != SigmaKind::Diagonal &&
      sigma_kind != SigmaKind::Full) {
    return cudaErrorInvalidValue;
  }
  if (dtype != DType::Float16 && dtype != DType::BFloat16) return cudaErrorInvalidValue;
  if (rank > kMaxRank || num_tokens > 0x7fffffff) return cudaErrorInvalidValue;
  // Nothing to add: no token, no output column, no rank, or no adapter a token could use.
  if (num_tokens == 0 || d_out == 0 || rank == 0 || num_adapters == 0 || num_clusters == 0) {
    return cudaSuccess;
  }
  if (out == nullptr || lora_b == nullptr || ids == nullptr || basis_of == nullptr ||
      workspace == nullptr || (d_in > 0 && (x == nullptr || lora_a == nullptr)) ||
      (sigma_kind != SigmaKind::None && sigma == nullptr)) {
    return cudaErrorInvalidValue;
  }

  Params p{};
  p.out = out;
  p.out_row_stride = out_row_stride;
  p.out_offset = out_offset;
  p.x = x;
  p.x_row_stride = x_row_stride;
  p.lora_a = lora_a;
  p.lora_b = lora_b;
  p.sigma = sigma_kind == SigmaKind::None ? nullptr : sigma;
  p.sigma_kind = static_cast<int>(sigma_kind);
  p.ids = ids;
  p.basis_of = basis_of;
  p.scale = scale;
  p.adapter_scale = adapter_scale;
  p.ranks = ranks;
  p.workspace = workspace;
  p.num_tokens = num_tokens;
  p.d_in = d_in;
  p.d_out = d_out;
  p.rank = static_cast<int>(rank);
  p.num_adapters = num_adapters;
  p.num_clusters = num_clusters;

  return dtype == DType::Float16 ? launch_all<__half>(p, stream)
                                 : launch_all<__nv_bfloat16>(p, stream);
}

}  // namespace lola::cuda
