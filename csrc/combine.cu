// Combine on the GPU: y[t] = sum_j gates[t, j] * expert_out[row of assignment t*k + j], one block per
// token gathering its k rows (no atomics, so deterministic), with 16-byte vector loads where rows allow.
// The backward runs one block per sorted row: grad_expert_out[r] = gate * grad_y[t], and
// grad_gates[a] = <grad_y[t], expert_out[r]> reduced in a fixed order. order is checked to be a
// permutation of [0, T*k) when check_order is set (see moe_ops.h); unchecked bad entries are skipped.
// Reference: combine() in nanosar/model.py. CPU twin: combine_cpu.cpp.
#include "moe_ops.h"
#include "cuda_utils.cuh"

namespace {

constexpr int kThreads = 128;

// row_of[order[r]] = r, row_of filled with -1 before. Checks that order is a permutation of [0, A):
// flags check 0 counts indices out of range (skipped), check 1 indices met twice (the first r is kept).
__global__ void inverse_permutation_kernel(const int64_t* __restrict__ order, int64_t A, int64_t* __restrict__ row_of,
                                           int64_t* __restrict__ flags) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= A) return;
  const int64_t a = order[r];
  if (a < 0 || a >= A) {
    nanosar::flag_bad_index(flags, 0, a);
    return;
  }
  const auto unset = static_cast<unsigned long long>(-1LL);
  if (atomicCAS(reinterpret_cast<unsigned long long*>(row_of + a), unset, static_cast<unsigned long long>(r)) != unset)
    nanosar::flag_bad_index(flags, 1, a);
}

// row_of (A,) for order, and with check_order the host-side check of the flags (one small copy, a sync)
at::Tensor inverse_permutation(const at::Tensor& order, bool check_order) {
  const int64_t A = order.numel();
  auto row_of = at::full({A}, -1, order.options());
  auto flags = nanosar::index_flags(order, 2);
  inverse_permutation_kernel<<<(A + 255) / 256, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      order.data_ptr<int64_t>(), A, row_of.data_ptr<int64_t>(), flags.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (check_order) {
    const auto bad = flags.cpu();
    const int64_t* b = bad.data_ptr<int64_t>();
    TORCH_CHECK(b[0] == 0, "combine: order holds index ", b[1], " outside [0, T*k=", A, ") (", b[0], " such entries)");
    TORCH_CHECK(b[2] == 0, "combine: order is not a permutation: index ", b[3], " appears more than once");
  }
  return row_of;
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void combine_forward_kernel(const scalar_t* __restrict__ expert_out, const acc_t* __restrict__ gates,
                                       const int64_t* __restrict__ row_of, int64_t T, int k, int64_t D,
                                       scalar_t* __restrict__ y) {
  using vec_t = nanosar::aligned_vector<scalar_t, VEC>;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    for (int64_t i = threadIdx.x; i < D / VEC; i += blockDim.x) {
      acc_t acc[VEC];
#pragma unroll
      for (int u = 0; u < VEC; ++u) acc[u] = 0;
      for (int j = 0; j < k; ++j) {
        const int64_t row = row_of[t * k + j];
        if (row < 0) continue;  // assignment missing from an unchecked bad order: never read out of bounds
        const acc_t gate = gates[t * k + j];
        const vec_t v = reinterpret_cast<const vec_t*>(expert_out + row * D)[i];
#pragma unroll
        for (int u = 0; u < VEC; ++u) acc[u] += gate * static_cast<acc_t>(v.val[u]);
      }
      vec_t o;
#pragma unroll
      for (int u = 0; u < VEC; ++u) o.val[u] = static_cast<scalar_t>(acc[u]);
      reinterpret_cast<vec_t*>(y + t * D)[i] = o;
    }
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void combine_backward_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ expert_out,
                                        const acc_t* __restrict__ gates, const int64_t* __restrict__ order, int64_t A,
                                        int k, int64_t D, scalar_t* __restrict__ grad_out,
                                        acc_t* __restrict__ grad_gates) {
  using vec_t = nanosar::aligned_vector<scalar_t, VEC>;
  __shared__ acc_t warp_dots[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t r = blockIdx.x; r < A; r += gridDim.x) {
    const int64_t a = order[r], t = a / k;
    if (a < 0 || a >= A) continue;  // unchecked bad order: skip (the same for the whole block, so no sync issue)
    const acc_t gate = gates[a];
    acc_t dot = 0;
    for (int64_t i = threadIdx.x; i < D / VEC; i += blockDim.x) {
      const vec_t gy = reinterpret_cast<const vec_t*>(grad_y + t * D)[i];
      const vec_t out = reinterpret_cast<const vec_t*>(expert_out + r * D)[i];
      vec_t g;
#pragma unroll
      for (int u = 0; u < VEC; ++u) {
        const acc_t grad = static_cast<acc_t>(gy.val[u]);
        dot += grad * static_cast<acc_t>(out.val[u]);
        g.val[u] = static_cast<scalar_t>(gate * grad);
      }
      reinterpret_cast<vec_t*>(grad_out + r * D)[i] = g;
    }
    dot = nanosar::warp_sum(dot);
    if (lane == 0) warp_dots[warp] = dot;
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t total = 0;
      for (int w = 0; w < kThreads / 32; ++w) total += warp_dots[w];
      grad_gates[a] = total;
    }
    __syncthreads();  // warp_dots is reused by the next row
  }
}

// Launch KERNEL<scalar_t, acc_t, VEC> with VEC = 16 bytes / element size when rows allow it, else 1.
#define NANOSAR_LAUNCH_VEC(vec, KERNEL, blocks, ...)                                                   \
  do {                                                                                                \
    const auto stream = at::cuda::getCurrentCUDAStream();                                             \
    constexpr int kWide = 16 / sizeof(scalar_t);                                                      \
    if ((vec) == kWide) KERNEL<scalar_t, acc_t, kWide><<<blocks, kThreads, 0, stream>>>(__VA_ARGS__); \
    else KERNEL<scalar_t, acc_t, 1><<<blocks, kThreads, 0, stream>>>(__VA_ARGS__);                    \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                   \
  } while (0)

}  // namespace

at::Tensor combine_forward_cuda(const at::Tensor& expert_out, const at::Tensor& gates, const at::Tensor& order,
                                bool check_order) {
  const c10::cuda::CUDAGuard guard(expert_out.device());
  const int64_t T = gates.size(0), D = expert_out.size(1);
  const int k = static_cast<int>(gates.size(1));
  auto y = at::empty({T, D}, expert_out.options());
  if (T == 0 || D == 0) return y;
  auto row_of = inverse_permutation(order, check_order);
  const int vec = std::min(nanosar::vector_width(expert_out, D), nanosar::vector_width(y, D));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, expert_out.scalar_type(), "combine_forward_cuda", [&] {
    using acc_t = acc_type_of<scalar_t>;
    NANOSAR_LAUNCH_VEC(vec, combine_forward_kernel, nanosar::grid_for(T), expert_out.data_ptr<scalar_t>(),
                       gates.data_ptr<acc_t>(), row_of.data_ptr<int64_t>(), T, k, D, y.data_ptr<scalar_t>());
  });
  return y;
}

CombineGrads combine_backward_cuda(const at::Tensor& grad_y, const at::Tensor& expert_out,
                                   const at::Tensor& gates, const at::Tensor& order, bool check_order) {
  const c10::cuda::CUDAGuard guard(expert_out.device());
  const int64_t D = expert_out.size(1), A = order.numel();
  const int k = static_cast<int>(gates.size(1));
  auto grad_out = at::empty_like(expert_out);
  auto grad_gates = at::empty_like(gates);
  if (A == 0) return {grad_out, grad_gates};
  if (check_order) inverse_permutation(order, true);  // only the check; the kernel below reads order directly
  const int vec = std::min({nanosar::vector_width(grad_y, D), nanosar::vector_width(expert_out, D),
                            nanosar::vector_width(grad_out, D)});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, expert_out.scalar_type(), "combine_backward_cuda", [&] {
    using acc_t = acc_type_of<scalar_t>;
    NANOSAR_LAUNCH_VEC(vec, combine_backward_kernel, nanosar::grid_for(A), grad_y.data_ptr<scalar_t>(),
                       expert_out.data_ptr<scalar_t>(), gates.data_ptr<acc_t>(), order.data_ptr<int64_t>(), A, k, D,
                       grad_out.data_ptr<scalar_t>(), grad_gates.data_ptr<acc_t>());
  });
  return {grad_out, grad_gates};
}
