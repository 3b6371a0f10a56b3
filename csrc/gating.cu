// Gating on the GPU: one thread per token runs the shared per-row math of moe_ops.h (softmax, top-k,
// renormalised gates); the per-expert counts and the sums behind the mean probability and the z-loss
// are reduced per block in a fixed order and summed over blocks by torch, so results are deterministic.
// The rule for NaN and infinite logits is in moe_ops.h. Also: cuda_kernel_check, whether this build has
// a kernel image for a device. Reference: gating() in nanosar/model.py. CPU twin: gating_cpu.cpp.
#include "moe_ops.h"
#include "cuda_utils.cuh"

namespace {

constexpr int kThreads = kGatingTokensPerBlock;  // one token per thread
constexpr int kWarps = kThreads / 32;

template <typename scalar_t, typename acc_t>
__global__ void gating_forward_kernel(const scalar_t* __restrict__ logits, int64_t T, int E, int k,
                                      int64_t* __restrict__ expert_idx, acc_t* __restrict__ gates,
                                      acc_t* __restrict__ partial,  // (blocks, E + 1): sum of p_e, of lse^2
                                      unsigned long long* __restrict__ counts) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem[];
  acc_t* warp_sums = reinterpret_cast<acc_t*>(smem);                         // (kWarps, E + 1)
  int* block_counts = reinterpret_cast<int*>(warp_sums + kWarps * (E + 1));  // (E,)
  for (int e = threadIdx.x; e < E; e += blockDim.x) block_counts[e] = 0;
  __syncthreads();

  const int64_t t = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  const bool valid = t < T;
  acc_t row_max = 0, row_sum = 1, lse = 0;
  if (valid) {
    gating_row_forward<scalar_t, acc_t>(logits + t * E, E, k, expert_idx + t * k, gates + t * k, row_max, row_sum);
    lse = row_logsumexp<scalar_t, acc_t>(logits + t * E, E, row_max, row_sum);
    for (int j = 0; j < k; ++j) atomicAdd(&block_counts[expert_idx[t * k + j]], 1);  // integer: exact
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int e = 0; e <= E; ++e) {  // column e < E: p_e; column E: lse^2
    acc_t v = 0;
    if (valid) v = e < E ? std::exp(static_cast<acc_t>(logits[t * E + e]) - row_max) / row_sum : lse * lse;
    v = nanosar::warp_sum(v);
    if (lane == 0) warp_sums[warp * (E + 1) + e] = v;
  }
  __syncthreads();
  for (int e = threadIdx.x; e <= E; e += blockDim.x) {
    acc_t s = 0;
    for (int w = 0; w < kWarps; ++w) s += warp_sums[w * (E + 1) + e];
    partial[blockIdx.x * static_cast<int64_t>(E + 1) + e] = s;
    if (e < E && block_counts[e] > 0) atomicAdd(&counts[e], static_cast<unsigned long long>(block_counts[e]));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gating_backward_kernel(const scalar_t* __restrict__ logits, int64_t T, int E, int k,
                                       const int64_t* __restrict__ expert_idx, const acc_t* __restrict__ gates,
                                       const acc_t* __restrict__ grad_gates, const acc_t* __restrict__ grad_mean_prob,
                                       const acc_t* __restrict__ grad_z_loss, scalar_t* __restrict__ grad_logits) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= T) return;
  gating_row_backward<scalar_t, acc_t>(logits + t * E, E, k, expert_idx + t * k, gates + t * k, grad_gates + t * k,
                                       grad_mean_prob, *grad_z_loss, acc_t(1) / T, grad_logits + t * E);
}

}  // namespace

GatingOutputs gating_forward_cuda(const at::Tensor& logits, int64_t top_k) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t T = logits.size(0);
  const int E = static_cast<int>(logits.size(1));
  const auto acc_dtype = acc_dtype_of(logits);
  auto expert_idx = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  auto gates = at::empty({T, top_k}, logits.options().dtype(acc_dtype));
  const int64_t blocks = (T + kThreads - 1) / kThreads;
  auto partial = at::empty({blocks, E + 1}, logits.options().dtype(acc_dtype));
  auto counts = at::zeros({E}, logits.options().dtype(at::kLong));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gating_forward_cuda", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const size_t smem = kWarps * (E + 1) * sizeof(acc_t) + E * sizeof(int);
    gating_forward_kernel<scalar_t, acc_t><<<blocks, kThreads, smem, stream>>>(
        logits.data_ptr<scalar_t>(), T, E, static_cast<int>(top_k), expert_idx.data_ptr<int64_t>(),
        gates.data_ptr<acc_t>(), partial.data_ptr<acc_t>(),
        reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto totals = partial.sum(0);  // (E + 1,), a fixed-order reduction over blocks
  return {gates, totals.slice(0, 0, E) / T, totals[E] / T, expert_idx, counts};  // see GatingOutputs
}

at::Tensor gating_backward_cuda(const at::Tensor& logits, const at::Tensor& expert_idx, const at::Tensor& gates,
                                const at::Tensor& grad_gates, const at::Tensor& grad_mean_prob,
                                const at::Tensor& grad_z_loss) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t T = logits.size(0);
  const int E = static_cast<int>(logits.size(1)), k = static_cast<int>(expert_idx.size(1));
  auto grad_logits = at::empty_like(logits);
  constexpr int threads = 128;
  const int64_t blocks = (T + threads - 1) / threads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gating_backward_cuda", [&] {
    using acc_t = acc_type_of<scalar_t>;
    gating_backward_kernel<scalar_t, acc_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<scalar_t>(), T, E, k, expert_idx.data_ptr<int64_t>(), gates.data_ptr<acc_t>(),
        grad_gates.data_ptr<acc_t>(), grad_mean_prob.data_ptr<acc_t>(), grad_z_loss.data_ptr<acc_t>(),
        grad_logits.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_logits;
}

std::string cuda_kernel_check(int64_t device_index) {
  // Asking for a kernel's attributes loads its module for the device: it fails with "no kernel image is
  // available" when the build has neither a binary for this compute capability nor PTX to JIT from.
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, gating_forward_kernel<float, float>);
  if (status == cudaSuccess) return "";
  (void)cudaGetLastError();  // clear the error so that it is not reported by the next launch check
  return cudaGetErrorString(status);
}
