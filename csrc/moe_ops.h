// nanosar MoE dispatch ops: gating, permute (scatter to experts), combine (gather back to tokens).
//
// Each op has a C++ CPU version (*_cpu.cpp, at::parallel_for) and a CUDA version (*.cu); the plain
// references they are tested against are gating(), permute() and combine() in nanosar/model.py, and
// csrc/bindings.cpp registers the ops below as PyTorch custom operators (torch.ops.nanosar.*), and
// nanosar/moe_ops.py adds their shape functions and autograd formulas.
//
// Shapes: T tokens, E experts, k experts per token, D width. Assignment a = t*k + j is token t's j-th
// choice. "order" (T*k,) lists the assignments sorted by expert, stably: sorted row r holds a = order[r].
#pragma once

#include <ATen/AccumulateType.h>
#include <torch/extension.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#ifdef __CUDACC__
#define NANOSAR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NANOSAR_HOST_DEVICE inline
#endif

// Accumulation type: float for float, half and bfloat16, double for double, on both devices (the CPU
// accumulate type of float would be double; the references compute in float32 for float32 inputs).
template <typename scalar_t>
using acc_type_of = at::acc_type<scalar_t, /*is_cuda=*/true>;
inline at::ScalarType acc_dtype_of(const at::Tensor& x) { return at::toAccumulateType(x.scalar_type(), /*is_cuda=*/true); }

constexpr int64_t kMaxTopK = 8;          // top-k kept in registers; the paper uses k = 1
constexpr int64_t kMaxExpertsCuda = 512;   // per-block shared-memory histograms and sums (< 48 KB)
constexpr int kGatingTokensPerBlock = 256; // tokens per partial sum of the gating statistics (CPU and CUDA)

// ---------------------------------------------------------------------------------------------
// Per-token gating math, shared by the CPU loop and the CUDA thread (one token = one row of E logits).
//
// The rule for non-finite logits, the same as the reference gating() in nanosar/model.py:
//   selection: a stable descending order of the logits with NaN counted as +inf, i.e. +inf and NaN,
//     then finite values, then -inf, equal keys by expert id; so the ids are always k distinct
//     experts in [0, E), also when fewer than k logits are finite.
//   values: nothing is masked. A row with a NaN or +inf logit, or with only -inf logits, has NaN
//     probabilities (as torch.softmax), so NaN gates and mean_prob; its logsumexp is computed as
//     torch.logsumexp does (NaN, +inf, -inf), so the z-loss is NaN or inf.

template <typename acc_t>
NANOSAR_HOST_DEVICE bool is_nan(acc_t v) { return v != v; }

// The key the top-k compares: the logit, NaN counted as +inf (whatever the NaN's sign bit)
template <typename acc_t>
NANOSAR_HOST_DEVICE acc_t selection_key(acc_t v) { return is_nan(v) ? static_cast<acc_t>(INFINITY) : v; }

// Row max (NaN if any logit is NaN) and sum_e exp(l_e - max), so that p_e = exp(l_e - max) / sum.
template <typename scalar_t, typename acc_t>
NANOSAR_HOST_DEVICE void row_softmax_stats(const scalar_t* logits, int E, acc_t& row_max, acc_t& row_sum) {
  row_max = -INFINITY;
  for (int e = 0; e < E; ++e) {
    const acc_t v = static_cast<acc_t>(logits[e]);
    row_max = (is_nan(v) || v > row_max) ? v : row_max;  // once NaN, stays NaN
  }
  row_sum = 0;
  for (int e = 0; e < E; ++e) row_sum += std::exp(static_cast<acc_t>(logits[e]) - row_max);
}

// logsumexp as torch.logsumexp computes it: shifted by the max, or by 0 when the max is infinite, so
// a row of -inf gives -inf and a row holding +inf gives +inf (a NaN anywhere gives NaN).
template <typename scalar_t, typename acc_t>
NANOSAR_HOST_DEVICE acc_t row_logsumexp(const scalar_t* logits, int E, acc_t row_max, acc_t row_sum) {
  if (row_max == INFINITY || row_max == -INFINITY) {
    acc_t s = 0;
    for (int e = 0; e < E; ++e) s += std::exp(static_cast<acc_t>(logits[e]));
    return std::log(s);
  }
  return row_max + std::log(row_sum);
}

// Top-k of one row of logits in the order above, and the gates: the chosen probabilities renormalised
// over the k. Also returns the row max and sum (see row_softmax_stats). Needs 1 <= k <= min(E, kMaxTopK).
template <typename scalar_t, typename acc_t>
NANOSAR_HOST_DEVICE void gating_row_forward(const scalar_t* logits, int E, int k, int64_t* expert_idx,
                                            acc_t* gates, acc_t& row_max, acc_t& row_sum) {
  acc_t top_key[kMaxTopK];
  int top_id[kMaxTopK];
  int filled = 0;
  for (int e = 0; e < E; ++e) {
    const acc_t key = selection_key(static_cast<acc_t>(logits[e]));
    // insertion into the sorted top-k, strictly greater only: a later equal key never passes an earlier one
    if (filled < k || key > top_key[k - 1]) {
      int pos = filled < k ? filled++ : k - 1;
      while (pos > 0 && key > top_key[pos - 1]) { top_key[pos] = top_key[pos - 1]; top_id[pos] = top_id[pos - 1]; --pos; }
      top_key[pos] = key;
      top_id[pos] = e;
    }
  }
  row_softmax_stats<scalar_t, acc_t>(logits, E, row_max, row_sum);
  // gates = p_j / sum_{chosen} p = exp(l_j - max) / sum_{chosen} exp(l - max): the softmax sum cancels
  acc_t chosen[kMaxTopK], chosen_sum = 0;
  for (int j = 0; j < k; ++j) {
    chosen[j] = std::exp(static_cast<acc_t>(logits[top_id[j]]) - row_max);
    chosen_sum += chosen[j];
  }
  for (int j = 0; j < k; ++j) {
    expert_idx[j] = top_id[j];
    gates[j] = chosen[j] / chosen_sum;
  }
}

// Gradient of one row's logits. With p = softmax(l), S = sum of the chosen p, gate_j = p_{i_j} / S:
//   dL/dp_e = grad_mean_prob_e / T + [e chosen as j] (grad_gate_j - sum_j' grad_gate_j' gate_j') / S
//   dL/dl_e = p_e (dL/dp_e - sum_f p_f dL/dp_f) + (grad_z / T) * 2 * logsumexp * p_e
// Expert ids outside [0, E) are ignored (the CPU op rejects them before; on the GPU they cannot fault).
template <typename scalar_t, typename acc_t>
NANOSAR_HOST_DEVICE void gating_row_backward(const scalar_t* logits, int E, int k, const int64_t* expert_idx,
                                             const acc_t* gates, const acc_t* grad_gates,
                                             const acc_t* grad_mean_prob, acc_t grad_z, acc_t inv_T,
                                             scalar_t* grad_logits) {
  acc_t row_max, row_sum;
  row_softmax_stats<scalar_t, acc_t>(logits, E, row_max, row_sum);
  const acc_t lse = row_logsumexp<scalar_t, acc_t>(logits, E, row_max, row_sum);
  acc_t chosen_p = 0, gate_dot = 0;
  for (int j = 0; j < k; ++j) {
    const int64_t id = expert_idx[j];
    if (id >= 0 && id < E) chosen_p += std::exp(static_cast<acc_t>(logits[id]) - row_max) / row_sum;
    gate_dot += grad_gates[j] * gates[j];
  }
  auto grad_p = [&](int e) {
    acc_t g = grad_mean_prob[e] * inv_T;
    for (int j = 0; j < k; ++j)
      if (expert_idx[j] == e) g += (grad_gates[j] - gate_dot) / chosen_p;
    return g;
  };
  acc_t p_dot = 0;  // sum_f p_f dL/dp_f
  for (int e = 0; e < E; ++e) p_dot += std::exp(static_cast<acc_t>(logits[e]) - row_max) / row_sum * grad_p(e);
  for (int e = 0; e < E; ++e) {
    const acc_t p = std::exp(static_cast<acc_t>(logits[e]) - row_max) / row_sum;
    grad_logits[e] = static_cast<scalar_t>(p * (grad_p(e) - p_dot) + grad_z * inv_T * 2 * lse * p);
  }
}

// ---------------------------------------------------------------------------------------------
// The ops. Returned tuples:
//   gating_forward  -> {gates (T,k) acc, mean_prob (E) acc, z_loss () acc, expert_idx (T,k) int64, counts (E) int64}
//                      (the float outputs first, unlike the reference: torch.library.opcheck's autograd test
//                      adds up the outputs in the first one's dtype; moe_ops.gating returns the reference order)
//   gating_backward -> grad_logits (T,E) in the logits' dtype
//   permute_forward -> {x_sorted (T*k,D), order (T*k) int64, counts (E) int64}
//   combine_forward -> y (T,D)
//   combine_backward -> {grad_expert_out (T*k,D), grad_gates (T,k)}
// acc is float for float/half/bfloat16 inputs and double for double.
using GatingOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using PermuteOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using CombineGrads = std::tuple<at::Tensor, at::Tensor>;
//
// Index checks (an index out of range must be an error, never a memory fault):
//   permute: every expert id in [0, E); combine: order a permutation of [0, T*k).
//   CPU: TORCH_CHECK before any memory is touched through the index, always (a loop over T*k ints).
//   CUDA: the kernels skip bad entries (no out-of-bounds access) and count them in a small device
//   tensor, which the host reads after the launch: one 32-byte device-to-host copy, i.e. one stream
//   synchronisation, per permute_forward, and per combine call with check_order = true. The MoE layer
//   (model.dispatch_sorted) and the autograd formulas of moe_ops.py pass check_order = false, as order
//   always comes from permute_forward there, so a training step pays one sync per MoE layer (permute's).
//   gating_backward ignores expert ids outside [0, E) on CUDA and rejects them on CPU.
//   Inside torch.compile the ops are opaque calls, so these host reads cause no graph break.

GatingOutputs gating_forward_cpu(const at::Tensor& logits, int64_t top_k);
at::Tensor gating_backward_cpu(const at::Tensor& logits, const at::Tensor& expert_idx, const at::Tensor& gates,
                               const at::Tensor& grad_gates, const at::Tensor& grad_mean_prob,
                               const at::Tensor& grad_z_loss);
PermuteOutputs permute_forward_cpu(const at::Tensor& x, const at::Tensor& expert_idx, int64_t n_experts);
// (check_order: the CPU ops always check, it is there for the same signature as the CUDA ops)
at::Tensor combine_forward_cpu(const at::Tensor& expert_out, const at::Tensor& gates, const at::Tensor& order,
                               bool check_order);
CombineGrads combine_backward_cpu(const at::Tensor& grad_y, const at::Tensor& expert_out,
                                  const at::Tensor& gates, const at::Tensor& order, bool check_order);

#ifdef WITH_CUDA
GatingOutputs gating_forward_cuda(const at::Tensor& logits, int64_t top_k);
at::Tensor gating_backward_cuda(const at::Tensor& logits, const at::Tensor& expert_idx, const at::Tensor& gates,
                                const at::Tensor& grad_gates, const at::Tensor& grad_mean_prob,
                                const at::Tensor& grad_z_loss);
PermuteOutputs permute_forward_cuda(const at::Tensor& x, const at::Tensor& expert_idx, int64_t n_experts);
at::Tensor combine_forward_cuda(const at::Tensor& expert_out, const at::Tensor& gates, const at::Tensor& order,
                                bool check_order);
CombineGrads combine_backward_cuda(const at::Tensor& grad_y, const at::Tensor& expert_out,
                                   const at::Tensor& gates, const at::Tensor& order, bool check_order);
// "" if the kernels have a binary (or PTX) this device can run, else the CUDA error (e.g. no kernel image)
std::string cuda_kernel_check(int64_t device_index);
#endif
