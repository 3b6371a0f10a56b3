// Gating on the CPU: softmax -> top-k -> renormalised gates, per-expert counts and mean probability,
// and the router z-loss, in one pass over the logits (at::parallel_for over blocks of tokens). The rule
// for NaN and infinite logits is in moe_ops.h (the same as the reference's).
// Reference: gating() in nanosar/model.py. CUDA twin: gating.cu.
#include <ATen/Parallel.h>

#include "moe_ops.h"

GatingOutputs gating_forward_cpu(const at::Tensor& logits, int64_t top_k) {
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc_dtype = acc_dtype_of(logits);
  auto expert_idx = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  auto gates = at::empty({T, top_k}, logits.options().dtype(acc_dtype));
  const int64_t n_blocks = (T + kGatingTokensPerBlock - 1) / kGatingTokensPerBlock;
  // partial[b] = (sum over block b of p_e for each e, then of logsumexp^2): a fixed summation order,
  // so the result does not depend on the number of threads
  auto partial = at::zeros({n_blocks, E + 1}, logits.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gating_forward_cpu", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const scalar_t* l = logits.data_ptr<scalar_t>();
    int64_t* idx = expert_idx.data_ptr<int64_t>();
    acc_t* g = gates.data_ptr<acc_t>();
    acc_t* part = partial.data_ptr<acc_t>();
    at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* sums = part + b * (E + 1);
        const int64_t t1 = std::min(T, (b + 1) * kGatingTokensPerBlock);
        for (int64_t t = b * kGatingTokensPerBlock; t < t1; ++t) {
          acc_t row_max, row_sum;
          gating_row_forward<scalar_t, acc_t>(l + t * E, E, top_k, idx + t * top_k, g + t * top_k, row_max, row_sum);
          for (int64_t e = 0; e < E; ++e) sums[e] += std::exp(static_cast<acc_t>(l[t * E + e]) - row_max) / row_sum;
          const acc_t lse = row_logsumexp<scalar_t, acc_t>(l + t * E, E, row_max, row_sum);
          sums[E] += lse * lse;
        }
      }
    });
  });
  auto totals = partial.sum(0);                                  // (E + 1,)
  auto counts = at::zeros({E}, logits.options().dtype(at::kLong));
  const int64_t* idx = expert_idx.data_ptr<int64_t>();
  int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t a = 0; a < T * top_k; ++a) ++c[idx[a]];
  return {gates, totals.slice(0, 0, E) / T, totals[E] / T, expert_idx, counts};  // see GatingOutputs
}

at::Tensor gating_backward_cpu(const at::Tensor& logits, const at::Tensor& expert_idx, const at::Tensor& gates,
                               const at::Tensor& grad_gates, const at::Tensor& grad_mean_prob,
                               const at::Tensor& grad_z_loss) {
  const int64_t T = logits.size(0), E = logits.size(1), k = expert_idx.size(1);
  const int64_t* ids = expert_idx.data_ptr<int64_t>();
  for (int64_t a = 0; a < T * k; ++a)
    TORCH_CHECK(ids[a] >= 0 && ids[a] < E, "gating_backward: expert id ", ids[a], " outside [0, ", E, ")");
  auto grad_logits = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gating_backward_cpu", [&] {
    using acc_t = acc_type_of<scalar_t>;
    const scalar_t* l = logits.data_ptr<scalar_t>();
    const int64_t* idx = expert_idx.data_ptr<int64_t>();
    const acc_t* g = gates.data_ptr<acc_t>();
    const acc_t* gg = grad_gates.data_ptr<acc_t>();
    const acc_t* gmp = grad_mean_prob.data_ptr<acc_t>();
    const acc_t gz = grad_z_loss.item<acc_t>();
    scalar_t* out = grad_logits.data_ptr<scalar_t>();
    at::parallel_for(0, T, kGatingTokensPerBlock, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        gating_row_backward<scalar_t, acc_t>(l + t * E, E, k, idx + t * k, g + t * k, gg + t * k, gmp, gz,
                                             acc_t(1) / T, out + t * E);
    });
  });
  return grad_logits;
}
