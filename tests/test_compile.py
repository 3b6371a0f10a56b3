"""torch.compile takes the MoE ops whole (CPU): a fullgraph compile of the sparse FFN the model runs,
gating -> model.dispatch_sorted (permute -> grouped_linear -> gelu -> grouped_linear -> combine), forward
and backward, equals eager, and dynamo finds no graph break in it.

Two chains: with the extension's kernels (skipped without it), and with the pure-PyTorch references of
nanosar/model.py for gating, permute and combine (grouped_linear is always an operator of moe_ops).
Compiled with inductor, which generates C++ and compiles it with gcc: about 20 s per chain with a cold
cache on 2 cores, a few seconds warm (backend="aot_eager" takes 2-5 s and is bit-exact: no codegen).
Tolerances, float32: rtol 1e-5, and atol 1e-5 of the tensor's largest magnitude. Inductor fuses and
vectorises the gelu and the reductions around the operators, so it sums in another order: an element
that is the difference of larger terms (a router-weight gradient, say) differs by a few float32 ulps
of those terms, not of itself (1.4e-6 on 0.036 seen). Measured: at most 3e-7 of the largest magnitude.
"""

import pytest
import torch

from nanosar import model as M
from nanosar import moe_ops

EXT = moe_ops.load_extension()
T, D, DH, E, K = 50, 16, 32, 6, 2


def moe_chain(kernels):
    """The MoE FFN on tokens x (T, D) with router weight (D, E) and expert weights, as one function."""
    gating = moe_ops.gating if kernels else M.gating

    def chain(x, router_w, w1, b1, w2, b2):
        expert_idx, gates, counts, mean_prob, z_loss = gating(x @ router_w, K)   # (T, k), (T, k), (E,), (E,), ()
        y = M.dispatch_sorted(x, expert_idx, gates, w1, b1, w2, b2, kernels=kernels)  # (T, D)
        return y, mean_prob, z_loss

    return chain


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(T, D), (D, E), (E, D, DH), (E, DH), (E, DH, D), (E, D)]
    return [torch.randn(s, generator=g) * (0.3 if i else 1) for i, s in enumerate(shapes)]


def outputs_and_grads(fn, tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    y, mean_prob, z_loss = fn(*leaves)
    loss = (y * torch.linspace(-1, 1, D)).sum() + (mean_prob * torch.arange(E)).sum() + 0.1 * z_loss
    loss.backward()
    return [y.detach(), mean_prob.detach(), z_loss.detach()] + [t.grad for t in leaves]


CHAINS = {
    "kernels": lambda: moe_chain(kernels=True),
    "references": lambda: moe_chain(kernels=False),
}


def chain_for(name):
    if name == "kernels" and EXT is None:
        pytest.skip("nanosar._C not built")
    return CHAINS[name]()


@pytest.mark.parametrize("name", list(CHAINS))
def test_moe_chain_compiles_fullgraph_and_equals_eager(name):
    chain = chain_for(name)
    compiled = torch.compile(chain, fullgraph=True, backend="inductor")
    for seed in (0, 1):  # the second call reuses the compiled graph with other routing (other group sizes)
        tensors = inputs(seed)
        eager, comp = outputs_and_grads(chain, tensors), outputs_and_grads(compiled, tensors)
        for a, b in zip(eager, comp):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())
        assert (comp[-6] != 0).any() and (comp[-1] != 0).any()  # gradients reach the input and the last bias


@pytest.mark.parametrize("name", list(CHAINS))
def test_moe_chain_has_no_graph_break(name):
    explanation = torch._dynamo.explain(chain_for(name))(*inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
