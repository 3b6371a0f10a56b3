// The nanosar MoE ops as PyTorch custom operators, torch.ops.nanosar.{gating, gating_backward, permute,
// combine, combine_backward}: their schemas, the input checks, and the CPU kernels (and the CUDA kernels
// when built with CUDA) registered with PyTorch's dispatcher, which picks them by the tensors' device.
// nanosar/moe_ops.py adds each op's fake (shape-only) function and autograd formula, so that autograd,
// torch.compile and torch.library.opcheck see them as ordinary operators.
// A small Python module (pybind11) carries the kernels' limits (max_top_k, max_experts_cuda), with_cuda,
// api_version and cuda_kernel_status, which moe_ops.py reads to fall back to PyTorch where they cannot run.
// Built by setup.py (module nanosar._C) or just in time by nanosar/moe_ops.py; loading it registers the ops.
#include "moe_ops.h"

// NAME_arg -> NAME: the argument checked for its number of dimensions and made contiguous (a copy only
// when it is not; e.g. a strided gradient, or a layout torch.compile chose)
#define CONTIGUOUS_INPUT(x, ndim)                                                                      \
  TORCH_CHECK(x##_arg.dim() == (ndim), #x " must have ", ndim, " dimensions, got ", x##_arg.dim()); \
  const at::Tensor x = x##_arg.contiguous()
#define CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ", (x).device(), " and ", (y).device())
#define CHECK_DTYPE(x, dtype) TORCH_CHECK((x).scalar_type() == (dtype), #x " must be ", dtype, ", got ", (x).scalar_type())

// The same checked function is registered for CPU and CUDA below; it runs the version for the device.
#ifdef WITH_CUDA
#define DEVICE_DISPATCH(tensor, name, ...)                 \
  if ((tensor).is_cuda()) return name##_cuda(__VA_ARGS__); \
  return name##_cpu(__VA_ARGS__)
#else
#define DEVICE_DISPATCH(tensor, name, ...) return name##_cpu(__VA_ARGS__)
#endif

GatingOutputs gating_forward(const at::Tensor& logits_arg, int64_t top_k) {
  CONTIGUOUS_INPUT(logits, 2);
  const int64_t E = logits.size(1);
  TORCH_CHECK(E >= 1 && logits.size(0) >= 1, "gating: logits must be (T >= 1, E >= 1), got ", logits.sizes());
  TORCH_CHECK(top_k >= 1 && top_k <= std::min(E, kMaxTopK), "gating: top_k must be in [1, min(E, ", kMaxTopK, ")], got ", top_k);
  TORCH_CHECK(!logits.is_cuda() || E <= kMaxExpertsCuda, "gating: at most ", kMaxExpertsCuda, " experts on CUDA, got ", E);
  DEVICE_DISPATCH(logits, gating_forward, logits, top_k);
}

at::Tensor gating_backward(const at::Tensor& logits_arg, const at::Tensor& expert_idx_arg, const at::Tensor& gates_arg,
                           const at::Tensor& grad_gates_arg, const at::Tensor& grad_mean_prob_arg,
                           const at::Tensor& grad_z_loss_arg) {
  CONTIGUOUS_INPUT(logits, 2);
  CONTIGUOUS_INPUT(expert_idx, 2);
  CONTIGUOUS_INPUT(gates, 2);
  CONTIGUOUS_INPUT(grad_gates, 2);
  CONTIGUOUS_INPUT(grad_mean_prob, 1);
  CONTIGUOUS_INPUT(grad_z_loss, 0);
  const auto acc = acc_dtype_of(logits);
  CHECK_DTYPE(expert_idx, at::kLong);
  CHECK_DTYPE(gates, acc);
  CHECK_DTYPE(grad_gates, acc);
  CHECK_DTYPE(grad_mean_prob, acc);
  CHECK_DTYPE(grad_z_loss, acc);
  for (const auto* t : {&expert_idx, &gates, &grad_gates, &grad_mean_prob, &grad_z_loss})
    TORCH_CHECK(t->device() == logits.device(), "gating_backward: every tensor must be on ", logits.device(), ", got ", t->device());
  TORCH_CHECK(grad_gates.sizes() == gates.sizes() && gates.sizes() == expert_idx.sizes() &&
              expert_idx.size(0) == logits.size(0) && grad_mean_prob.size(0) == logits.size(1),
              "gating_backward: shape mismatch");
  DEVICE_DISPATCH(logits, gating_backward, logits, expert_idx, gates, grad_gates, grad_mean_prob, grad_z_loss);
}

PermuteOutputs permute_forward(const at::Tensor& x_arg, const at::Tensor& expert_idx_arg, int64_t n_experts) {
  CONTIGUOUS_INPUT(x, 2);
  CONTIGUOUS_INPUT(expert_idx, 2);
  CHECK_DTYPE(expert_idx, at::kLong);
  CHECK_SAME_DEVICE(x, expert_idx);
  TORCH_CHECK(expert_idx.size(0) == x.size(0), "permute: x has ", x.size(0), " tokens but expert_idx ", expert_idx.size(0));
  TORCH_CHECK(n_experts >= 1 && (!x.is_cuda() || n_experts <= kMaxExpertsCuda), "permute: bad n_experts ", n_experts);
  DEVICE_DISPATCH(x, permute_forward, x, expert_idx, n_experts);
}

static void check_combine(const at::Tensor& expert_out, const at::Tensor& gates, const at::Tensor& order) {
  CHECK_DTYPE(order, at::kLong);
  CHECK_DTYPE(gates, acc_dtype_of(expert_out));
  CHECK_SAME_DEVICE(expert_out, gates);
  CHECK_SAME_DEVICE(expert_out, order);
  TORCH_CHECK(expert_out.size(0) == gates.numel() && order.numel() == gates.numel(),
              "combine: expert_out has ", expert_out.size(0), " rows, gates ", gates.numel(), ", order ", order.numel());
}

// check_order: on CUDA, read the kernels' permutation check back (one small copy, a stream sync); false
// only for an order made by permute_forward or already checked. The CPU ops always check (no sync).
at::Tensor combine_forward(const at::Tensor& expert_out_arg, const at::Tensor& gates_arg, const at::Tensor& order_arg,
                           bool check_order) {
  CONTIGUOUS_INPUT(expert_out, 2);
  CONTIGUOUS_INPUT(gates, 2);
  CONTIGUOUS_INPUT(order, 1);
  check_combine(expert_out, gates, order);
  DEVICE_DISPATCH(expert_out, combine_forward, expert_out, gates, order, check_order);
}

CombineGrads combine_backward(const at::Tensor& grad_y_arg, const at::Tensor& expert_out_arg, const at::Tensor& gates_arg,
                              const at::Tensor& order_arg, bool check_order) {
  CONTIGUOUS_INPUT(grad_y, 2);
  CONTIGUOUS_INPUT(expert_out, 2);
  CONTIGUOUS_INPUT(gates, 2);
  CONTIGUOUS_INPUT(order, 1);
  check_combine(expert_out, gates, order);
  CHECK_SAME_DEVICE(grad_y, expert_out);
  CHECK_DTYPE(grad_y, expert_out.scalar_type());
  TORCH_CHECK(grad_y.size(0) == gates.size(0) && grad_y.size(1) == expert_out.size(1), "combine_backward: grad_y shape ", grad_y.sizes());
  DEVICE_DISPATCH(expert_out, combine_backward, grad_y, expert_out, gates, order, check_order);
}

// "" when the CUDA kernels can run on the device, else why not (the CUDA error, or no CUDA in the build)
std::string cuda_kernel_status(int64_t device_index) {
#ifdef WITH_CUDA
  return cuda_kernel_check(device_index);
#else
  (void)device_index;
  return "nanosar._C was built without CUDA";
#endif
}

// Schemas: what torch.ops.nanosar.* accept and return (tensors of any layout; all outputs are new contiguous
// tensors, nothing is mutated).
TORCH_LIBRARY(nanosar, m) {
  m.def("gating(Tensor logits, int top_k) -> (Tensor gates, Tensor mean_prob, Tensor z_loss, Tensor expert_idx, Tensor counts)");
  m.def("gating_backward(Tensor logits, Tensor expert_idx, Tensor gates, Tensor grad_gates, Tensor grad_mean_prob, "
        "Tensor grad_z_loss) -> Tensor");
  m.def("permute(Tensor x, Tensor expert_idx, int n_experts) -> (Tensor x_sorted, Tensor order, Tensor counts)");
  m.def("combine(Tensor expert_out, Tensor gates, Tensor order, bool check_order=True) -> Tensor");
  m.def("combine_backward(Tensor grad_y, Tensor expert_out, Tensor gates, Tensor order, bool check_order=True) "
        "-> (Tensor grad_expert_out, Tensor grad_gates)");
}

static void register_kernels(torch::Library& m) {
  m.impl("gating", &gating_forward);
  m.impl("gating_backward", &gating_backward);
  m.impl("permute", &permute_forward);
  m.impl("combine", &combine_forward);
  m.impl("combine_backward", &combine_backward);
}

TORCH_LIBRARY_IMPL(nanosar, CPU, m) { register_kernels(m); }
#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(nanosar, CUDA, m) { register_kernels(m); }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nanosar MoE dispatch kernels: loading this module registers torch.ops.nanosar.{gating, permute, combine, ...}";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("api_version") = 3;  // moe_ops.py refuses a build of another version (3: torch.ops.nanosar custom operators)
  m.attr("max_top_k") = kMaxTopK;
  m.attr("max_experts_cuda") = kMaxExpertsCuda;
  m.def("cuda_kernel_status", &cuda_kernel_status, "device index -> '' if the CUDA kernels run there, else why not");
}
