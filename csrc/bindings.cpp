// Python bindings of the nanosar MoE ops: check the inputs once, then run the CPU or the CUDA version
// by the tensors' device. Also the kernels' limits (max_top_k, max_experts_cuda) and cuda_kernel_status,
// which nanosar/moe_ops.py reads to fall back to the PyTorch reference where the kernels cannot run.
// Built by setup.py (module nanosar._C) or just in time by nanosar/moe_ops.py.
#include "moe_ops.h"

#define CHECK_INPUT(x, ndim)                                                                         \
  TORCH_CHECK((x).dim() == (ndim), #x " must have ", ndim, " dimensions, got ", (x).dim());           \
  TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ", (x).device(), " and ", (y).device())
#define CHECK_DTYPE(x, dtype) TORCH_CHECK((x).scalar_type() == (dtype), #x " must be ", dtype, ", got ", (x).scalar_type())

#ifdef WITH_CUDA
#define DEVICE_DISPATCH(tensor, name, ...)   \
  if ((tensor).is_cuda()) return name##_cuda(__VA_ARGS__); \
  return name##_cpu(__VA_ARGS__)
#else
#define DEVICE_DISPATCH(tensor, name, ...)                                                            \
  TORCH_CHECK(!(tensor).is_cuda(), "nanosar._C was built without CUDA; rebuild with a CUDA toolkit"); \
  return name##_cpu(__VA_ARGS__)
#endif

std::vector<at::Tensor> gating_forward(const at::Tensor& logits, int64_t top_k) {
  CHECK_INPUT(logits, 2);
  const int64_t E = logits.size(1);
  TORCH_CHECK(E >= 1 && logits.size(0) >= 1, "gating: logits must be (T >= 1, E >= 1), got ", logits.sizes());
  TORCH_CHECK(top_k >= 1 && top_k <= std::min(E, kMaxTopK), "gating: top_k must be in [1, min(E, ", kMaxTopK, ")], got ", top_k);
  TORCH_CHECK(!logits.is_cuda() || E <= kMaxExpertsCuda, "gating: at most ", kMaxExpertsCuda, " experts on CUDA, got ", E);
  DEVICE_DISPATCH(logits, gating_forward, logits, top_k);
}

at::Tensor gating_backward(const at::Tensor& logits, const at::Tensor& expert_idx, const at::Tensor& gates,
                           const at::Tensor& grad_gates, const at::Tensor& grad_mean_prob, const at::Tensor& grad_z_loss) {
  CHECK_INPUT(logits, 2);
  CHECK_INPUT(expert_idx, 2);
  CHECK_INPUT(gates, 2);
  CHECK_INPUT(grad_gates, 2);
  CHECK_INPUT(grad_mean_prob, 1);
  CHECK_INPUT(grad_z_loss, 0);
  const auto acc = acc_dtype_of(logits);
  CHECK_DTYPE(expert_idx, at::kLong);
  CHECK_DTYPE(gates, acc);
  CHECK_DTYPE(grad_gates, acc);
  CHECK_DTYPE(grad_mean_prob, acc);
  CHECK_DTYPE(grad_z_loss, acc);
  CHECK_SAME_DEVICE(logits, grad_gates);
  CHECK_SAME_DEVICE(logits, grad_mean_prob);
  CHECK_SAME_DEVICE(logits, grad_z_loss);
  TORCH_CHECK(grad_gates.sizes() == gates.sizes() && gates.sizes() == expert_idx.sizes(), "gating_backward: shape mismatch");
  DEVICE_DISPATCH(logits, gating_backward, logits, expert_idx, gates, grad_gates, grad_mean_prob, grad_z_loss);
}

std::vector<at::Tensor> permute_forward(const at::Tensor& x, const at::Tensor& expert_idx, int64_t n_experts) {
  CHECK_INPUT(x, 2);
  CHECK_INPUT(expert_idx, 2);
  CHECK_DTYPE(expert_idx, at::kLong);
  CHECK_SAME_DEVICE(x, expert_idx);
  TORCH_CHECK(expert_idx.size(0) == x.size(0), "permute: x has ", x.size(0), " tokens but expert_idx ", expert_idx.size(0));
  TORCH_CHECK(n_experts >= 1 && (!x.is_cuda() || n_experts <= kMaxExpertsCuda), "permute: bad n_experts ", n_experts);
  DEVICE_DISPATCH(x, permute_forward, x, expert_idx, n_experts);
}

static void check_combine(const at::Tensor& expert_out, const at::Tensor& gates, const at::Tensor& order) {
  CHECK_INPUT(expert_out, 2);
  CHECK_INPUT(gates, 2);
  CHECK_INPUT(order, 1);
  CHECK_DTYPE(order, at::kLong);
  CHECK_DTYPE(gates, acc_dtype_of(expert_out));
  CHECK_SAME_DEVICE(expert_out, gates);
  CHECK_SAME_DEVICE(expert_out, order);
  TORCH_CHECK(expert_out.size(0) == gates.numel() && order.numel() == gates.numel(),
              "combine: expert_out has ", expert_out.size(0), " rows, gates ", gates.numel(), ", order ", order.numel());
}

// check_order: on CUDA, read the kernels' permutation check back (one small copy, a stream sync); false
// only for an order made by permute_forward or already checked. The CPU ops always check (no sync).
at::Tensor combine_forward(const at::Tensor& expert_out, const at::Tensor& gates, const at::Tensor& order,
                           bool check_order) {
  check_combine(expert_out, gates, order);
  DEVICE_DISPATCH(expert_out, combine_forward, expert_out, gates, order, check_order);
}

std::vector<at::Tensor> combine_backward(const at::Tensor& grad_y, const at::Tensor& expert_out, const at::Tensor& gates,
                                         const at::Tensor& order, bool check_order) {
  check_combine(expert_out, gates, order);
  CHECK_INPUT(grad_y, 2);
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nanosar MoE dispatch kernels: gating, permute, combine (CPU and, when built with it, CUDA)";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("api_version") = 2;  // moe_ops.py refuses a stale build of another version
  m.attr("max_top_k") = kMaxTopK;
  m.attr("max_experts_cuda") = kMaxExpertsCuda;
  m.def("gating_forward", &gating_forward, "logits (T,E), k -> [expert_idx, gates, counts, mean_prob, z_loss]");
  m.def("gating_backward", &gating_backward, "-> grad_logits (T,E)");
  m.def("permute_forward", &permute_forward, "x (T,D), expert_idx (T,k), E -> [x_sorted (T*k,D), order, counts]");
  m.def("combine_forward", &combine_forward, "expert_out (T*k,D), gates (T,k), order -> y (T,D)",
        py::arg("expert_out"), py::arg("gates"), py::arg("order"), py::arg("check_order") = true);
  m.def("combine_backward", &combine_backward, "grad_y, expert_out, gates, order -> [grad_expert_out, grad_gates]",
        py::arg("grad_y"), py::arg("expert_out"), py::arg("gates"), py::arg("order"), py::arg("check_order") = true);
  m.def("cuda_kernel_status", &cuda_kernel_status, "device index -> '' if the CUDA kernels run there, else why not");
}
