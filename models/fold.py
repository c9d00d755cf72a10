"""An inference copy of a classifier: every BatchNorm that directly follows a convolution
folded into that convolution.

    from models import fold_batchnorm
    fast = fold_batchnorm(teacher)          # eval-mode copy; `teacher` itself is untouched
    logits, feats = fast(x, return_features=True)

In eval mode a BatchNorm is a per-channel affine map, y = a * x + b with
a = gamma / sqrt(running_var + eps), so conv -> BN is one convolution with weights scaled
by `a` and a bias; the folded pass skips a memory-bound sweep over the activations (and, in
a backward to the input, its gradient). The outputs agree to float rounding (about 1e-6
here; tests/test_models.py checks every registered model). Only where the data flows
straight from a convolution into a BatchNorm, which nothing else reads, is a pair folded: a
pre-activation network (BN-ReLU-conv) keeps the BatchNorms that follow a residual sum.

Use it for passes that read only outputs and features: the frozen teacher's targets in a
KD step and the scoring of a student. Not for synthesis that hooks BatchNorm inputs (their
statistics are the loss): the copy has fewer BatchNorms to hook.
"""
from __future__ import annotations

import copy
import inspect

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, BN) submodule names where the BN's only input is the conv's output and
    nothing else reads that output; found on the traced graph of `model.forward`.
    Empty if the forward cannot be traced (data-dependent control flow)."""
    concrete = {"return_features": False} if "return_features" in inspect.signature(model.forward).parameters else None
    try:
        graph = fx.symbolic_trace(model, concrete_args=concrete).graph
    except Exception:  # noqa: BLE001  (any trace failure just means: fold nothing)
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules[src.target], nn.Conv2d)
                and len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1):
            pairs.append((src.target, node.target))
    return pairs


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with its conv -> BN pairs folded (see module docstring).
    Same device, dtype and memory format as `model`; its parameters need no gradients, but
    a backward to the input works."""
    folded = copy.deepcopy(model).eval()
    for conv_name, bn_name in conv_bn_pairs(folded):
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        fused = fuse_conv_bn_eval(conv, bn)
        if conv.weight.dim() == 4 and conv.weight.is_contiguous(memory_format=torch.channels_last):
            # Keep the layout `place` chose: a conv whose weights are NCHW on a channels_last
            # input converts its activations on every call.
            fused.weight.data = fused.weight.data.contiguous(memory_format=torch.channels_last)
        _set(folded, conv_name, fused)
        _set(folded, bn_name, nn.Identity())
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
