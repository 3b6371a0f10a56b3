// Combine on the CPU: y[t] = sum_j gates[t, j] * expert_out[row of assignment t*k + j], accumulated in
// float (double for double) with no atomics, and its backward for the expert outputs and the gates.
// Reference: combine() in nanosar/model.py. CUDA twin: combine.cu.
#include <ATen/Parallel.h>

#include "moe_ops.h"

// row_of[a] = r where order[r] = a: the inverse permutation, so that each token gathers its k rows.
// Also the check that order is a permutation of [0, T*k): a bad index would read or write out of bounds.
static at::Tensor inverse_permutation_cpu(const at::Tensor& order) {
  const int64_t A = order.numel();
  auto row_of = at::full({A}, -1, order.options());
  const int64_t* o = order.data_ptr<int64_t>();
  int64_t* inv = row_of.data_ptr<int64_t>();
  for (int64_t r = 0; r < A; ++r) {
    const int64_t a = o[r];
    TORCH_CHECK(a >= 0 && a < A, "combine: order holds index ", a, " outside [0, T*k=", A, ")");
    TORCH_CHECK(inv[a] < 0, "combine: order is not a permutation: index ", a, " appears more than once");
    inv[a] = r;
  }
  return row_of;
}

at::Tensor combine_forward_cpu(const at::Tensor& expert_out, const at::Tensor& gates, const at::Tensor& order,
                               bool /*check_order: always*/) {
  const int64_t T = gates.size(0), k = gates.size(1), D = expert_out.size(1);
  auto y = at::empty({T, D}, expert_out.options());
  auto row_of = inverse_permutation_cpu(order);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, expert_out.scalar_type(), "combine_forward_cpu", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const scalar_t* out = expert_out.data_ptr<scalar_t>();
    const acc_t* g = gates.data_ptr<acc_t>();
    const int64_t* inv = row_of.data_ptr<int64_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(D);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* row = out + inv[t * k + j] * D;
          const acc_t gate = g[t * k + j];
          for (int64_t d = 0; d < D; ++d) acc[d] += gate * static_cast<acc_t>(row[d]);
        }
        for (int64_t d = 0; d < D; ++d) yp[t * D + d] = static_cast<scalar_t>(acc[d]);
      }
    });
  });
  return y;
}

// For each sorted row r holding assignment a = order[r] of token t = a / k:
//   grad_expert_out[r] = gates[a] * grad_y[t],   grad_gates[a] = <grad_y[t], expert_out[r]>
CombineGrads combine_backward_cpu(const at::Tensor& grad_y, const at::Tensor& expert_out,
                                  const at::Tensor& gates, const at::Tensor& order,
                                  bool /*check_order: always*/) {
  const int64_t k = gates.size(1), D = expert_out.size(1), A = order.numel();
  inverse_permutation_cpu(order);  // only the check: every a = order[r] is in range and met once
  auto grad_out = at::empty_like(expert_out);
  auto grad_gates = at::empty_like(gates);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, expert_out.scalar_type(), "combine_backward_cpu", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const scalar_t* gy = grad_y.data_ptr<scalar_t>();
    const scalar_t* out = expert_out.data_ptr<scalar_t>();
    const acc_t* g = gates.data_ptr<acc_t>();
    const int64_t* o = order.data_ptr<int64_t>();
    scalar_t* gout = grad_out.data_ptr<scalar_t>();
    acc_t* gg = grad_gates.data_ptr<acc_t>();
    at::parallel_for(0, A, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t a = o[r], t = a / k;
        acc_t dot = 0;
        for (int64_t d = 0; d < D; ++d) {
          const acc_t grad = static_cast<acc_t>(gy[t * D + d]);
          dot += grad * static_cast<acc_t>(out[r * D + d]);
          gout[r * D + d] = static_cast<scalar_t>(g[a] * grad);
        }
        gg[a] = dot;
      }
    });
  });
  return {grad_out, grad_gates};
}
