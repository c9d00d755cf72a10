"""The inference copy of a classifier: BatchNorms folded into their convolutions
(models/fold.py), and on a CPU each convolution's following ReLU and residual add done
inside the convolution as oneDNN post-ops, bit for bit the separate ops' result.

    from models import inference_copy
    fast = inference_copy(teacher)          # eval-mode copy; `teacher` itself is untouched
    logits, feats = fast(x, return_features=True)

Why: a pass of a small network over a batch of 128 spends a quarter of its time in
memory-bound sweeps (the add after a block's last convolution and the ReLU after its first
read and write activations of 8 MB each at 16x32x32 per image, past the cache); a post-op
applies them while the convolution's output is still in registers. The fused op is the one
PyTorch's compiler emits for the same pattern on a CPU (`torch.ops.mkldnn._convolution_pointwise`).
Where it cannot apply (a CUDA or float64 tensor, a pass that needs a gradient to its input,
layouts that differ, a PyTorch built without oneDNN) each fused node runs the plain
convolution, add and ReLU, so the copy works everywhere the model does.
tests/test_models.py checks, for every registered model, that the copy's outputs and features
equal the folded copy's exactly, and its gradient to the input too.
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .fold import fold_batchnorm


def _pointwise_ops():
    """The fused kernels, if this PyTorch has them and they answer as expected: the op is
    internal to PyTorch, so one tiny call checks its signature and result before any use."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._convolution_pointwise
        x, other = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
        w, b = torch.randn(2, 2, 1, 1), torch.randn(2)
        args = ([0, 0], [1, 1], [1, 1], 1)
        plain = F.conv2d(x, w, b)
        with torch.no_grad():
            ok = (torch.allclose(op.default(x, w, b, *args, "relu", [], ""), F.relu(plain), atol=1e-5)
                  and torch.allclose(op.binary(x, other, w, b, *args, "add", None, "relu", [], None),
                                     F.relu(plain + other), atol=1e-5))
        return (op.default, op.binary) if ok else None
    except Exception:  # noqa: BLE001  (missing, renamed or changed: fall back to the plain ops)
        return None


POINTWISE = _pointwise_ops()


class FusedConv(nn.Module):
    """conv(x) [+ other] [then ReLU], as one oneDNN call where it applies."""

    def __init__(self, conv: nn.Conv2d, add: bool, relu: bool):
        super().__init__()
        self.conv, self.add, self.relu = conv, add, relu
        self._args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        if self._fusable(x, other):
            w, b = self.conv.weight, self.conv.bias
            if other is None:
                return POINTWISE[0](x, w, b, *self._args, "relu" if self.relu else "none", [], "")
            return POINTWISE[1](x, other, w, b, *self._args, "add", None, "relu" if self.relu else None, [], None)
        y = self.conv(x)
        if other is not None:
            y = y + other
        return F.relu(y) if self.relu else y

    def _fusable(self, x: torch.Tensor, other: torch.Tensor | None) -> bool:
        if POINTWISE is None or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or (other is not None and other.requires_grad)):
            return False  # the fused kernels have no backward
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        if not x.is_contiguous(memory_format=layout):
            return False
        if other is None:
            return True
        c = self.conv
        out = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, p, d, k, s in zip(x.shape[2:], c.padding, c.dilation, c.kernel_size, c.stride)]
        return (other.dtype == x.dtype and other.device == x.device
                and tuple(other.shape) == (x.shape[0], c.out_channels, *out)
                and other.is_contiguous(memory_format=layout))


class InferenceCopy(nn.Module):
    """The folded copy with its fusions: `forward(x, return_features=False)` runs the traced
    graph of that call, traced on first use (a scoring pass needs only the logits graph)."""

    def __init__(self, folded: nn.Module):
        super().__init__()
        self.folded = folded
        self.num_features = getattr(folded, "num_features", None)
        self.graphs = nn.ModuleDict()

    def forward(self, x: torch.Tensor, return_features: bool = False):
        key = "features" if return_features else "logits"
        if key not in self.graphs:
            try:
                self.graphs[key] = fuse_activations(self.folded, return_features)
            except Exception:  # noqa: BLE001  (data-dependent control flow: run the folded copy)
                self.graphs[key] = _Plain(self.folded)
        graph = self.graphs[key]
        # A traced graph keeps the argument and checks that it has the traced value.
        return graph(x, return_features) if _concrete(self.folded, return_features) else graph(x)


class _Plain(nn.Module):
    """The folded copy itself, for a forward that cannot be traced."""

    def __init__(self, folded: nn.Module):
        super().__init__()
        self.__dict__["folded"] = folded  # not a submodule: InferenceCopy owns it already

    def forward(self, *args):
        return self.folded(*args)


def inference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` for passes that read only outputs and features: BNs
    folded, convolution post-ops fused (see module docstring); a forward that cannot be
    traced runs the folded copy. `model` is untouched."""
    folded = fold_batchnorm(model)
    return folded if POINTWISE is None else InferenceCopy(folded)


def fused_count(copy: nn.Module) -> int:
    """How many FusedConv nodes the copy's graphs hold (for tests and benchmarks)."""
    return sum(isinstance(m, FusedConv) for m in copy.modules())


def _concrete(model: nn.Module, return_features: bool) -> dict | None:
    params = inspect.signature(model.forward).parameters
    return {"return_features": return_features} if "return_features" in params else None


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_function" and node.target in (F.relu, torch.relu):
        return len(node.args) == 1
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    return node.op == "call_method" and node.target == "relu" and len(node.args) == 1


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2
            and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args))


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def fuse_activations(model: nn.Module, return_features: bool = False) -> fx.GraphModule:
    """The traced forward of `model` (with that `return_features`) in which each plain 2-d
    convolution whose only reader is a ReLU, an add, or an add read only by a ReLU, becomes
    one FusedConv node, and a ReLU that alone reads a BatchNorm's output works in place."""
    gm = fx.symbolic_trace(model, concrete_args=_concrete(model, return_features))
    modules = dict(gm.named_modules())
    graph, fused = gm.graph, 0
    for node in list(graph.nodes):  # the BNs folding left behind
        if node.op == "call_module" and isinstance(modules[node.target], nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for node in list(graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)):
            continue
        user = _only_user(node)
        if user is None:
            continue
        other, last, relu = None, user, False
        if _is_add(user):
            a, b = user.args
            if a is b:  # conv(x) + conv(x): nothing to fuse it with
                continue
            other = b if a is node else a
            follower = _only_user(user)
            if follower is not None and _is_relu(follower, modules):
                last, relu = follower, True
        elif _is_relu(user, modules):
            relu = True
        else:
            continue
        name = f"fused_{fused}"
        gm.add_submodule(name, FusedConv(conv, add=other is not None, relu=relu))
        with graph.inserting_before(last):
            new = graph.call_module(name, (node.args[0],) if other is None else (node.args[0], other))
        last.replace_all_uses_with(new)
        for dead in ([last, user] if last is not user else [last]) + [node]:
            graph.erase_node(dead)
        fused += 1
    for node in list(graph.nodes):
        # A ReLU that is the only reader of a BatchNorm's output (a pre-activation block's
        # BN-ReLU, which has no convolution before it to fuse into) works in place: one write
        # of 8 MB fewer per layer, the same values (BN's backward does not read its output).
        src = node.args[0] if node.args else None
        if (node.op == "call_function" and node.target in (F.relu, torch.relu) and len(node.args) == 1
                and not node.kwargs.get("inplace", False) and isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), nn.BatchNorm2d) and len(src.users) == 1):
            with graph.inserting_before(node):
                inplace = graph.call_function(torch.relu_, (src,))
            node.replace_all_uses_with(inplace)
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
