"""The 3D expert weights of mixture-of-experts blocks, which ranapass leaves dense, and their FLOPs.

Mixtral, Qwen3-MoE and OLMoE (transformers 5) keep a block's experts as 3D parameters ``[experts, a, b]``
read by a grouped matmul (or sliced per expert inside a data-dependent loop). No adapter kind covers them:
attention (and any router that is an ``nn.Linear``) is adapted, the experts stay dense, and every report says
so with their FLOPs per token, ``k * 2ab`` for ``k`` experts per token. The profile counts them from the
model (``model_experts``), the FX pass from the graph (``graph_experts``).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from ranapass.cost_model import flops
from ranapass.fx_sites import module_path
from ranapass.rewrite_report import EXPERTS_WHY, LeftDense

__all__ = ["EXPERTS_REASON", "expert_flops", "model_experts", "graph_experts"]

EXPERTS_REASON = f"experts: {EXPERTS_WHY}"
TOP_K_ATTRS = ("top_k", "num_experts_per_tok")
TOPK_TARGETS = (torch.topk, "topk")


def expert_flops(shape: Sequence[int], per_token: int) -> float:
    """Dense FLOPs per token of a 3D expert weight ``[experts, a, b]`` with ``per_token`` experts per token."""
    return per_token * flops.per_token(flops.dense_linear(shape[1], shape[2]))


def _experts_per_token(model: torch.nn.Module, path: str, experts: int) -> int:
    """Experts each token runs: ``top_k`` / ``num_experts_per_tok`` of the parameter's nearest owning module
    (or the config); every expert when none says."""
    parts = path.split(".")[:-1]
    while parts:
        module = model.get_submodule(".".join(parts))
        for attr in TOP_K_ATTRS:
            if isinstance(getattr(module, attr, None), int):
                return getattr(module, attr)
        parts.pop()
    k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    return k if isinstance(k, int) else experts


def model_experts(model: torch.nn.Module) -> dict[str, float]:
    """Every 3D parameter of ``model`` (expert weights) -> its dense FLOPs per token."""
    return {name: expert_flops(p.shape, _experts_per_token(model, name, p.shape[0]))
            for name, p in model.named_parameters() if p.dim() == 3}


def _param_path(node: fx.Node) -> str:
    """The parameter's path from Dynamo's source (``L['self']._modules['mlp']._parameters['w']`` -> ``mlp.w``)."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return node.target if node.op == "get_attr" else node.name
    name = source.name() if callable(source.name) else source.name  # a method before torch 2.11
    name = re.sub(r"^L\[[^\]]*\]", "", name)
    parts = re.findall(r"\['([^']*)'\]|\[(\d+)\]|\.(\w+)", name)
    kept = [a or b or c for a, b, c in parts if (c or a) not in ("_modules", "_parameters")]
    return ".".join(kept) or node.name


def _topk_of(gm: fx.GraphModule, scope: str) -> int | None:
    """``k`` of the first ``topk`` computed inside module ``scope`` (the MoE block's router), else None."""
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method") and node.target in TOPK_TARGETS and len(node.args) > 1 \
                and isinstance(node.args[1], int) and module_path(node).startswith(scope):
            return node.args[1]
    return None


def graph_experts(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[LeftDense]:
    """The 3D parameters ``gm`` reads (as inputs or attributes), left dense, with their FLOPs per token.

    ``k`` is the ``topk`` of the router inside the parameter's MoE block (the module above the experts' one);
    every expert counts when the graph computes none.
    """
    reads = [(n, t) for n, t in zip(gm.graph.find_nodes(op="placeholder"), example_inputs)]
    reads += [(n, operator.attrgetter(n.target)(gm)) for n in gm.graph.find_nodes(op="get_attr")]
    out = []
    for node, t in reads:
        if not isinstance(t, torch.nn.Parameter) or t.dim() != 3:
            continue
        path = _param_path(node)
        block = path.rsplit(".", 2)[0] if path.count(".") >= 2 else ""
        k = _topk_of(gm, block) if block else None
        out.append(LeftDense(node.name, path, EXPERTS_REASON, expert_flops(t.shape, k or t.shape[0])))
    return out
