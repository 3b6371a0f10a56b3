// Permute on the CPU: a stable counting sort of the assignments by expert (histogram, prefix sum,
// scatter in assignment order), then a parallel copy of each token row into its expert-contiguous slot.
// Reference: permute() in nanosar/model.py. CUDA twin: permute.cu.
#include <ATen/Parallel.h>

#include <cstring>

#include "moe_ops.h"

PermuteOutputs permute_forward_cpu(const at::Tensor& x, const at::Tensor& expert_idx, int64_t n_experts) {
  const int64_t T = x.size(0), D = x.size(1), k = expert_idx.size(1), A = T * k;
  auto counts = at::zeros({n_experts}, expert_idx.options());
  auto order = at::empty({A}, expert_idx.options());
  const int64_t* idx = expert_idx.data_ptr<int64_t>();
  int64_t* c = counts.data_ptr<int64_t>();
  int64_t* o = order.data_ptr<int64_t>();
  for (int64_t a = 0; a < A; ++a) {                          // 1. histogram
    TORCH_CHECK(idx[a] >= 0 && idx[a] < n_experts, "permute: expert id ", idx[a], " outside [0, ", n_experts, ")");
    ++c[idx[a]];
  }
  std::vector<int64_t> cursor(n_experts, 0);                 // 2. exclusive prefix sum: first row of each expert
  for (int64_t e = 1; e < n_experts; ++e) cursor[e] = cursor[e - 1] + c[e - 1];
  for (int64_t a = 0; a < A; ++a) o[cursor[idx[a]]++] = a;   // 3. stable scatter: assignment order kept per expert

  auto x_sorted = at::empty({A, D}, x.options());           // 4. copy rows: x_sorted[r] = x[order[r] / k]
  const int64_t row_bytes = D * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(x_sorted.data_ptr());
  at::parallel_for(0, A, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::memcpy(dst + r * row_bytes, src + (o[r] / k) * row_bytes, row_bytes);
  });
  return {x_sorted, order, counts};
}
