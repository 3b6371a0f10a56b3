// Small CUDA helpers shared by gating.cu, permute.cu and combine.cu.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

namespace nanosar {

// Sum over the 32 lanes of a warp, always in the same order (deterministic); lane 0 gets the total.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// N elements loaded or stored as one aligned vector (16 bytes for 8 x bf16, 4 x float, 2 x double).
template <typename T, int N>
struct alignas(sizeof(T) * N) aligned_vector {
  T val[N];
};

// Elements per 16-byte vector if every row of `cols` elements starts 16-byte aligned, else 1.
inline int vector_width(const at::Tensor& t, int64_t cols) {
  const int64_t width = 16 / t.element_size();
  const bool aligned = reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
  return (aligned && width > 0 && cols % width == 0) ? static_cast<int>(width) : 1;
}

// Index checks inside kernels (see moe_ops.h): a device tensor {bad entries, one bad value} per check,
// filled by flag_bad_index and read once on the host by check_index_flags (one small copy = one sync).
inline at::Tensor index_flags(const at::Tensor& like, int checks) {
  return at::zeros({2 * checks}, like.options().dtype(at::kLong));
}

__device__ __forceinline__ void flag_bad_index(int64_t* flags, int check, int64_t value) {
  atomicAdd(reinterpret_cast<unsigned long long*>(flags + 2 * check), 1ull);
  flags[2 * check + 1] = value;  // any one of the bad values: a benign race
}

// Blocks for a grid-stride loop over n items, one block per item up to the hardware limit.
inline int64_t grid_for(int64_t n) { return n < 1 ? 1 : (n < (1LL << 30) ? n : (1LL << 30)); }

}  // namespace nanosar
