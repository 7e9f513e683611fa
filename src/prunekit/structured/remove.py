"""Physical removal: cut parameter slices out of a copy of the model and update the shape
attributes of the modules that hold them, so the result is a plain, smaller nn.Module."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from prunekit.layers import is_hf_conv1d
from prunekit.structured.graph import ChannelClass, tensor_aliases

#: Module attributes that describe shapes; saved with a shrunk model and restored on load.
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features",
               "num_features", "normalized_shape", "embedding_dim", "nf", "num_channels",
               "num_attention_heads", "all_head_size", "num_heads", "split_size",
               "num_key_value_heads", "num_key_value_groups")


def drops_of(classes: Iterable[ChannelClass]) -> dict[str, dict[int, set[int]]]:
    """(parameter name -> dim -> indices) to remove for a set of classes."""
    out: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for c in classes:
        for p, d, i in c.slices:
            out[p][d].add(i)
    return out


def remove_slices(model: nn.Module, classes: Iterable[ChannelClass],
                  inplace: bool = False, share_uncut: bool = False) -> nn.Module:
    """Return a model with every slice of `classes` cut out (a copy unless inplace).

    The copy never holds a full-size duplicate of a tensor that is cut: the cut tensors are
    made from the original first and handed to deepcopy, so peak memory stays near the
    original plus the smaller model (it matters for models of billions of parameters).
    Every alias of a cut tensor (a tied embedding and LM head) gets the same cut tensor.
    `share_uncut`: the copy uses the original's parameters that are not cut instead of
    copies (buffers are still copied): a cheap model to run for a measurement or a check,
    never to train or keep."""
    drops = drops_of(classes)
    recompute_hook_weights(model)  # the old weight norm's w: a leaf again, that deepcopy takes
    named = dict(_named_tensors(model))
    tied = {a: names for names in tensor_aliases(model).tied for a in names}
    cut: dict[int, torch.Tensor] = {}  # id(original tensor) -> its cut replacement
    with torch.no_grad():
        for name, dims in drops.items():
            t = named[name]
            new = t.detach()
            for d, idx in dims.items():
                keep = torch.tensor(sorted(set(range(t.shape[d])) - idx), dtype=torch.long)
                new = new.index_select(d, keep.to(new.device))  # a new tensor
            for alias in tied.get(name, [name]):  # one object, or several on one storage
                a = named[alias]
                if id(a) not in cut:
                    cut[id(a)] = (nn.Parameter(new, requires_grad=a.requires_grad)
                                  if isinstance(a, nn.Parameter) else new)
    if not inplace:
        memo = dict(cut)
        if share_uncut:
            memo.update({id(p): p for p in model.parameters() if id(p) not in cut})
        model = copy_model(model, memo)
    old_attrs = {m: _shape_attrs(m) for m in model.modules()}  # deepcopy kept the old values
    if inplace:
        for m in model.modules():
            for store in (m._parameters, m._buffers):
                for k, t in store.items():
                    if t is not None and id(t) in cut:
                        store[k] = cut[id(t)]
    recompute_hook_weights(model)
    for m in reversed(list(model.modules())):  # children first: parents read their shapes
        fix_shape_attrs(m, old_attrs.get(m, {}))
    return model


def copy_model(model: nn.Module, memo: dict | None = None) -> nn.Module:
    """copy.deepcopy(model, memo) that keeps tensors tied by storage tied: a Parameter's
    deepcopy clones its data, so two Parameter objects on one storage would come apart."""
    memo = dict(memo or {})
    named = dict(_named_tensors(model))
    for names in tensor_aliases(model).tied:
        objects = [named[n] for n in names]
        if any(id(t) in memo for t in objects) or len({id(t) for t in objects}) == 1:
            continue  # cut or shared by the caller, or one object (deepcopy keeps that)
        data = objects[0].detach().clone()
        for t in objects:
            memo.setdefault(id(t), nn.Parameter(data, requires_grad=t.requires_grad)
                            if isinstance(t, nn.Parameter) else data)
    return copy.deepcopy(model, memo=memo)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` on the meta device: every parameter and buffer has its shape and
    dtype but no data, so it costs no memory and its FLOPs and parameter counts are those of
    the real model (tied tensors stay tied)."""
    memo: dict[int, torch.Tensor] = {}
    tied = {a: names[0] for names in tensor_aliases(model).tied for a in names}
    named = dict(_named_tensors(model))
    first: dict[str, torch.Tensor] = {}
    for name, t in named.items():
        if id(t) in memo:
            continue
        owner = tied.get(name, name)
        if owner in first:
            memo[id(t)] = first[owner]
            continue
        new = torch.empty_like(t, device="meta")
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        memo[id(t)] = first[owner] = new
    return copy.deepcopy(model, memo=memo)


def _named_tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def recompute_hook_weights(model: nn.Module) -> None:
    """The old hook form of weight norm (torch.nn.utils.weight_norm) keeps the weight as a
    plain attribute that a pre-hook recomputes on every call: recompute it now from the cut
    parameters, so the shapes read from it below are the new ones."""
    from torch.nn.utils.weight_norm import WeightNorm

    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                with torch.no_grad():
                    setattr(m, hook.name, hook.compute_weight(m))


def _shape_attrs(m: nn.Module) -> dict:
    return {a: getattr(m, a) for a in SHAPE_ATTRS if isinstance(getattr(m, a, None),
                                                              (int, tuple, list))}


def fix_shape_attrs(m: nn.Module, old: dict) -> None:
    """Make a module's shape attributes agree with its (possibly cut) tensors."""
    if isinstance(m, nn.modules.conv._ConvNd):
        w = m.weight
        old_groups, old_in, old_out = old.get("groups", m.groups), old.get(
            "in_channels", m.in_channels), old.get("out_channels", m.out_channels)
        m.out_channels = w.shape[0]
        if old_groups > 1 and old_in // old_groups == 1:  # depthwise: whole groups go
            m.groups = w.shape[0] // (old_out // old_groups)
            m.in_channels = m.groups
        else:
            m.in_channels = w.shape[1] * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        ref = m.weight if m.weight is not None else m.running_mean
        if ref is not None:
            m.num_features = ref.shape[0]
    elif isinstance(m, nn.LayerNorm):
        if m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
    elif isinstance(m, nn.GroupNorm):
        if m.weight is not None:
            m.num_channels = m.weight.shape[0]
    elif isinstance(m, nn.Embedding):
        m.num_embeddings, m.embedding_dim = m.weight.shape
    elif is_hf_conv1d(m):
        m.nf = m.weight.shape[1]
    _fix_attention(m)


def _fix_attention(m: nn.Module) -> None:
    """Head counts of transformers attention modules after whole heads were cut."""
    if hasattr(m, "attention_head_size") and hasattr(m, "query") and \
            isinstance(m.query, nn.Linear):  # BERT
        m.all_head_size = m.query.out_features
        m.num_attention_heads = m.all_head_size // m.attention_head_size
    elif hasattr(m, "c_attn") and hasattr(m, "split_size") and hasattr(m, "head_dim"):  # GPT-2
        parts = 2 if getattr(m, "is_cross_attention", False) else 3
        m.split_size = m.c_attn.nf // parts
        m.num_heads = m.split_size // m.head_dim
    elif hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "head_dim") and \
            isinstance(m.q_proj, nn.Linear):  # LLaMA-style: shapes follow from head_dim
        if hasattr(m, "num_heads"):
            m.num_heads = m.q_proj.out_features // m.head_dim
        if hasattr(m, "num_key_value_heads"):
            m.num_key_value_heads = m.k_proj.out_features // m.head_dim
        if hasattr(m, "num_key_value_groups") and m.k_proj.out_features:
            # query heads per key/value head: it changes when query heads leave every group
            # (structured.llm), and the attention code repeats the key/value heads by it
            m.num_key_value_groups = m.q_proj.out_features // m.k_proj.out_features


def module_shape_attrs(model: nn.Module) -> dict[str, dict]:
    """{module name: {shape attribute: value}} for every module that has any."""
    out = {}
    for name, m in model.named_modules():
        a = _shape_attrs(m)
        if a:
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in a.items()}
    return out
