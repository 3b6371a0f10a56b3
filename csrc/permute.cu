// Permute on the GPU, deterministic and stable, in three kernels:
//   1. chunk_histogram: each block counts the experts of its chunk of 256 assignments -> (E, chunks)
//   2. torch's cumsum over that table in (expert, chunk) order gives every (expert, chunk) its first row
//   3. stable_scatter: each assignment's rank among the same-expert assignments before it in its chunk
//      (warp match + per-warp counts) places it: order[first row + rank] = a
// then gather_rows copies x[order[r] / k] into row r with 16-byte vector loads where rows allow.
// Expert ids outside [0, E) are counted by the histogram kernel and raise an error before step 3.
// Reference: permute() in nanosar/model.py. CPU twin: permute_cpu.cpp.
#include "moe_ops.h"
#include "cuda_utils.cuh"

namespace {

constexpr int kChunk = 256;  // assignments per block, one per thread
constexpr int kWarps = kChunk / 32;

__global__ void chunk_histogram_kernel(const int64_t* __restrict__ expert_idx, int64_t A, int E, int64_t n_chunks,
                                       int64_t* __restrict__ chunk_counts,  // (E, n_chunks)
                                       int64_t* __restrict__ flags) {       // {ids outside [0, E), one of them}
  extern __shared__ int hist[];                                             // (E,)
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t a = blockIdx.x * static_cast<int64_t>(kChunk) + threadIdx.x;
  if (a < A) {
    const int64_t e = expert_idx[a];
    if (e >= 0 && e < E) atomicAdd(&hist[e], 1);  // integer: the count is exact whatever the order
    else nanosar::flag_bad_index(flags, 0, e);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) chunk_counts[e * n_chunks + blockIdx.x] = hist[e];
}

__global__ void stable_scatter_kernel(const int64_t* __restrict__ expert_idx, int64_t A, int E, int64_t n_chunks,
                                      const int64_t* __restrict__ chunk_start,  // (E, n_chunks) first rows
                                      int64_t* __restrict__ order) {
  extern __shared__ int warp_counts[];  // (kWarps, E): assignments per expert in each warp of the chunk
  for (int i = threadIdx.x; i < kWarps * E; i += blockDim.x) warp_counts[i] = 0;
  __syncthreads();
  const int64_t a = blockIdx.x * static_cast<int64_t>(kChunk) + threadIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int e = a < A ? static_cast<int>(expert_idx[a]) : -1;
  const unsigned peers = __match_any_sync(0xffffffffu, e);     // lanes of this warp with the same expert
  const int rank_in_warp = __popc(peers & ((1u << lane) - 1));  // how many of them come before this lane
  if (e >= 0 && rank_in_warp == 0) warp_counts[warp * E + e] = __popc(peers);
  __syncthreads();
  if (e >= 0) {
    int rank = rank_in_warp;
    for (int w = 0; w < warp; ++w) rank += warp_counts[w * E + e];
    order[chunk_start[static_cast<int64_t>(e) * n_chunks + blockIdx.x] + rank] = a;
  }
}

template <typename vec_t>
__global__ void gather_rows_kernel(const vec_t* __restrict__ x, const int64_t* __restrict__ order, int64_t k,
                                   int64_t A, int64_t row_vecs, vec_t* __restrict__ x_sorted) {
  for (int64_t r = blockIdx.x; r < A; r += gridDim.x) {
    const vec_t* src = x + (order[r] / k) * row_vecs;
    vec_t* dst = x_sorted + r * row_vecs;
    for (int64_t i = threadIdx.x; i < row_vecs; i += blockDim.x) dst[i] = src[i];
  }
}

// x_sorted[r] = x[order[r] / k], as raw bytes: the widest of 16/8/4/2/1-byte words that divides a row.
void gather_rows(const at::Tensor& x, const at::Tensor& order, int64_t k, at::Tensor& x_sorted) {
  const int64_t A = order.numel(), row_bytes = x.size(1) * x.element_size();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto base = reinterpret_cast<std::uintptr_t>(x.data_ptr()) | reinterpret_cast<std::uintptr_t>(x_sorted.data_ptr());
  int word = 16;
  while (word > 1 && (row_bytes % word != 0 || base % word != 0)) word /= 2;
  const int64_t blocks = nanosar::grid_for(A), row_vecs = row_bytes / word;
  const int64_t* o = order.data_ptr<int64_t>();
#define NANOSAR_GATHER(T)                                                                                   \
  gather_rows_kernel<T><<<blocks, 128, 0, stream>>>(static_cast<const T*>(x.data_ptr()), o, k, A, row_vecs, \
                                                    static_cast<T*>(x_sorted.data_ptr()))
  switch (word) {
    case 16: NANOSAR_GATHER(uint4); break;
    case 8: NANOSAR_GATHER(uint2); break;
    case 4: NANOSAR_GATHER(unsigned int); break;
    case 2: NANOSAR_GATHER(unsigned short); break;
    default: NANOSAR_GATHER(unsigned char); break;
  }
#undef NANOSAR_GATHER
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

PermuteOutputs permute_forward_cuda(const at::Tensor& x, const at::Tensor& expert_idx, int64_t n_experts) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t k = expert_idx.size(1), A = x.size(0) * k;
  const int E = static_cast<int>(n_experts);
  auto order = at::empty({A}, expert_idx.options());
  auto x_sorted = at::empty({A, x.size(1)}, x.options());
  if (A == 0) return {x_sorted, order, at::zeros({E}, expert_idx.options())};
  const int64_t n_chunks = (A + kChunk - 1) / kChunk;
  const auto stream = at::cuda::getCurrentCUDAStream();

  auto chunk_counts = at::empty({E, n_chunks}, expert_idx.options());
  auto flags = nanosar::index_flags(expert_idx, 1);
  chunk_histogram_kernel<<<n_chunks, kChunk, E * sizeof(int), stream>>>(
      expert_idx.data_ptr<int64_t>(), A, E, n_chunks, chunk_counts.data_ptr<int64_t>(), flags.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // the scatter and the gather below index with the ids: check them first (one small copy, a stream sync)
  const auto bad = flags.cpu();
  const int64_t* b = bad.data_ptr<int64_t>();
  TORCH_CHECK(b[0] == 0, "permute: expert id ", b[1], " outside [0, ", E, ") (", b[0], " of ", A, " assignments)");
  auto flat = chunk_counts.view({-1});
  auto chunk_start = flat.cumsum(0) - flat;  // exclusive prefix sum in (expert, chunk) order
  stable_scatter_kernel<<<n_chunks, kChunk, kWarps * E * sizeof(int), stream>>>(
      expert_idx.data_ptr<int64_t>(), A, E, n_chunks, chunk_start.data_ptr<int64_t>(), order.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gather_rows(x, order, k, x_sorted);
  return {x_sorted, order, chunk_counts.sum(1)};
}
