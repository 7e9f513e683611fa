"""Importance of each prunable channel class, scored over all slices coupled in it.

Every criterion is one function registered in `CRITERIA` with what it needs ("none", or
"gradients": calibration batches and a loss); `score` looks it up, checks the calibration
data once, and calls it. A new criterion is one decorated function here: the config, the
CLI's choices and help, and the generated tests (tests/test_structured_models.py) read the
registry. Higher scores are kept.

    @CRITERIA.register("name", needs="none")
    def name(model, graph, batches, loss_fn, seed, micro_batch) -> dict[int, float]:
        \"\"\"One line for the CLI help (the paper it follows).\"\"\"
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prunekit.batches import as_batches, run_batch
from prunekit.errors import PruneError
from prunekit.registry import Registry
from prunekit.structured.graph import DependencyGraph
from prunekit.structured.measure import modes_restored

#: Importance criteria: name -> function(model, graph, batches, loss_fn, seed, micro_batch)
#: returning {class id: score}; metadata `needs`: "none" or "gradients".
CRITERIA = Registry("criterion")
# which slices a Taylor form sums g x w over, and where it squares
TAYLOR_FORMS = {"taylor": "gate", "taylor_weight": "weight"}


def _per_dim(values: dict[str, torch.Tensor], keys, reduce: str = "sum"):
    """(param, dim) -> vector over that dim of values[param] summed over the other dims."""
    out = {}
    for p, d in keys:
        v = values.get(p)
        if v is None or v.dim() == 0:
            continue
        dims = [i for i in range(v.dim()) if i != d]
        out[(p, d)] = v.sum(dims) if dims else v
    return out


def _class_scores(graph: DependencyGraph, vecs):
    scores = {}
    for g in graph.groups:
        for c in g.classes:
            s = 0.0
            for p, d, i in c.slices:
                v = vecs.get((p, d))
                if v is not None:
                    s += float(v[i])
            scores[c.id] = s
    return scores


def _keys(graph: DependencyGraph):
    return {k for g in graph.groups for k in g.key}


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy for (inputs, targets) batches (against the model's own predictions for
    unlabelled inputs); the LM loss for dicts with input_ids; otherwise the squared output."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and torch.is_tensor(batch[1]) \
            and not batch[1].is_floating_point():
        out = model(batch[0])
        out = getattr(out, "logits", out)
        return nn.functional.cross_entropy(out, batch[1])
    if isinstance(batch, dict) and "input_ids" in batch:
        inputs = dict(batch)
        out = model(**inputs)
        logits = getattr(out, "logits", None)
        if logits is not None and logits.shape[-1] > int(inputs["input_ids"].max()):
            ids = inputs["input_ids"]
            return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               ids[:, 1:].reshape(-1))
        hidden = getattr(out, "last_hidden_state", out)
        return hidden.float().pow(2).mean()
    out = run_batch(model, batch)
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.dim() == 2 and out.shape[1] > 1:  # unlabelled images: the model's own predictions
        return nn.functional.cross_entropy(out, out.argmax(1).detach())
    return out.float().pow(2).mean()


def score(model: nn.Module, graph: DependencyGraph, criterion: str, calib=None,
          loss_fn: Callable | None = None, seed: int = 0,
          micro_batch: int = 8) -> dict[int, float]:
    """Score every class of `graph` with a criterion of CRITERIA (higher = more important).
    Gradient criteria need `calib` (a batch or an iterable of batches: tensors, (inputs,
    targets) or dicts) and use `loss_fn(model, batch)` (default_loss); the Taylor criteria
    square per micro-batch of `micro_batch` examples."""
    entry = CRITERIA.entry(criterion)
    batches = _batch_list(calib, entry.name) if entry.meta.get("needs") == "gradients" else []
    return entry.obj(model, graph, batches=batches, loss_fn=loss_fn or default_loss,
                     seed=seed, micro_batch=micro_batch)


@CRITERIA.register("l1", needs="none")
def l1(model, graph, batches, loss_fn, seed, micro_batch) -> dict[int, float]:
    """Sum of |w| over the class's weight slices (Li et al. 2017; over the coupled group)."""
    mats = {n: p.detach().abs() for n, p in model.named_parameters() if p.dim() >= 2}
    return _class_scores(graph, _per_dim(mats, _keys(graph)))


@CRITERIA.register("l2", needs="none")
def l2(model, graph, batches, loss_fn, seed, micro_batch) -> dict[int, float]:
    """Euclidean norm of the class's weight slices taken together."""
    mats = {n: p.detach().pow(2) for n, p in model.named_parameters() if p.dim() >= 2}
    return {k: v ** 0.5 for k, v in _class_scores(graph, _per_dim(mats, _keys(graph))).items()}


@CRITERIA.register("bn_scale", needs="none")
def bn_scale(model, graph, batches, loss_fn, seed, micro_batch) -> dict[int, float]:
    """|gamma| of the class's batch norms (network slimming, Liu et al. 2017).

    Classes with no batch norm fall back to l1."""
    params = dict(model.named_parameters())
    bn = {f"{n}.weight" for n, m in model.named_modules()
          if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None}
    gam = {n: params[n].detach().abs() for n in bn if n in params}
    s_bn = _class_scores(graph, _per_dim(gam, _keys(graph)))
    has_bn = {c.id for g in graph.groups for c in g.classes
              if any(p in bn for p, _, _ in c.slices)}
    if len(has_bn) < sum(len(g.classes) for g in graph.groups):
        norm1 = l1(model, graph, batches, loss_fn, seed, micro_batch)
        return {k: (s_bn[k] if k in has_bn else norm1[k]) for k in s_bn}
    return s_bn


@CRITERIA.register("taylor", needs="gradients")
def taylor(model, graph, batches, loss_fn, seed, micro_batch) -> dict[int, float]:
    """First-order Taylor, gate form (Molchanov et al. 2019).

    (sum of g x w over the slices that read the channel)^2, summed over micro-batches. That
    sum is exactly the derivative of the loss with respect to a gate on the channel's
    output, the first-order loss change of removing it; its producers (the filter, the
    norm) describe the same removal, so adding them counts it again. Classes that nothing
    reads use the whole group."""
    return _taylor(model, graph, batches, "gate", loss_fn, micro_batch)


@CRITERIA.register("taylor_weight", needs="gradients")
def taylor_weight(model, graph, batches, loss_fn, seed, micro_batch) -> dict[int, float]:
    """First-order Taylor, per-weight form (Molchanov et al. 2019).

    The sum over every weight of the coupled group of (g x w)^2, per micro-batch."""
    return _taylor(model, graph, batches, "weight", loss_fn, micro_batch)


@CRITERIA.register("sosp", needs="gradients")
def sosp(model, graph, batches, loss_fn, seed, micro_batch) -> dict[int, float]:
    """Second order, SOSP-H style (Nonnenmacher et al. 2022).

    |-g.theta_s + theta_s.(H theta)|, where H theta comes from one Hessian-vector product
    per batch (a central finite difference of gradients), so each class sees its coupling
    with all other structures."""
    keys = _keys(graph)
    totals: dict[int, float] = {c.id: 0.0 for g in graph.groups for c in g.classes}

    def add_sosp(batch, names, plist, grads):
        hv = _hvp(model, batch, loss_fn, plist)
        term = {n: (-g * p + p * h).detach() for n, p, g, h in zip(names, plist, grads, hv)}
        for k, v in _class_scores(graph, _per_dim(term, keys)).items():
            totals[k] += v

    _each_gradient(model, graph, batches, loss_fn, add_sosp)
    return {k: abs(v) for k, v in totals.items()}


@CRITERIA.register("random", needs="none")
def random(model, graph, batches, loss_fn, seed, micro_batch) -> dict[int, float]:
    """Seeded uniform random scores: the baseline every criterion must beat."""
    gen = torch.Generator().manual_seed(seed)
    return {c.id: float(torch.rand((), generator=gen)) for g in graph.groups
            for c in g.classes}


def taylor_scores(model: nn.Module, graph: DependencyGraph, calib, form: str = "gate",
                  loss_fn: Callable | None = None, micro_batch: int = 8) -> dict[int, float]:
    """First-order Taylor importance of every class, summed over micro-batches.

    form "gate" (criterion taylor): (sum of g x w over the slices that read the channel)^2;
    "weight" (taylor_weight): sum of (g x w)^2 over every weight of the coupled group;
    "group": (sum of g x w over every slice of the group)^2, which counts a removal once per
    side that describes it (producer, norm and reader); kept for comparing forms."""
    if form not in ("gate", "weight", "group"):
        raise PruneError(f"unknown Taylor form {form!r}; choose gate, weight or group")
    name = {"gate": "taylor", "weight": "taylor_weight"}.get(form, "taylor")
    return _taylor(model, graph, _batch_list(calib, name), form, loss_fn or default_loss,
                   micro_batch)


def _taylor(model, graph, batches, form: str, loss_fn: Callable,
            micro_batch: int) -> dict[int, float]:
    batches = [m for b in batches for m in _micro_batches(b, micro_batch)]
    keys = _keys(graph)
    counted = {c.id: (c.readers or c.slices) if form == "gate" else c.slices
               for g in graph.groups for c in g.classes}
    totals: dict[int, float] = {k: 0.0 for k in counted}

    def add_taylor(batch, names, plist, grads):
        gw = {n: (g * p).detach() for n, p, g in zip(names, plist, grads)}
        if form == "weight":
            squares = _per_dim({n: t.pow(2) for n, t in gw.items()}, keys)
            for k, v in _class_scores(graph, squares).items():
                totals[k] += v
            return
        gw = _per_dim(gw, keys)
        for k, slices in counted.items():
            v = sum(float(gw[(p, d)][i]) for p, d, i in slices if (p, d) in gw)
            totals[k] += v * v

    _each_gradient(model, graph, batches, loss_fn, add_taylor)
    return totals


def _batch_list(calib, criterion: str) -> list:
    if calib is None:
        raise PruneError(f"importance={criterion!r} needs calibration batches (calib=...): "
                         f"it uses gradients of the loss")
    return as_batches(calib)


def _each_gradient(model: nn.Module, graph: DependencyGraph, batches: list,
                   loss_fn: Callable, use: Callable) -> None:
    """use(batch, names, params, gradients) for each batch, with the gradients of the loss
    for the parameters the graph's groups slice, in eval mode; the model's mode is restored
    afterwards, also when the loss or `use` raises."""
    keys = _keys(graph)
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad and any(n == k[0] for k in keys)]
    plist = [params[n] for n in names]
    with modes_restored(model):
        model.eval()
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), plist, allow_unused=True)
            use(batch, names, plist, [torch.zeros_like(p) if g is None else g
                                      for p, g in zip(plist, grads)])


def _micro_batches(batch, size: int) -> list:
    """Split a batch along its first dim into pieces of `size` (as-is when it cannot)."""
    def n_of(b):
        if torch.is_tensor(b):
            return b.shape[0]
        if isinstance(b, dict):
            return next((v.shape[0] for v in b.values() if torch.is_tensor(v)), None)
        if isinstance(b, (tuple, list)) and all(torch.is_tensor(t) for t in b):
            return b[0].shape[0]
        return None

    n = n_of(batch)
    if not n or n <= size or (isinstance(batch, (tuple, list))
                              and any(t.shape[0] != n for t in batch)):
        return [batch]
    out = []
    for s in range(0, n, size):
        if torch.is_tensor(batch):
            out.append(batch[s:s + size])
        elif isinstance(batch, dict):
            out.append({k: v[s:s + size] if torch.is_tensor(v) and v.shape[0] == n else v
                        for k, v in batch.items()})
        else:
            out.append(type(batch)(t[s:s + size] for t in batch))
    return out


def _hvp(model, batch, loss_fn, plist, eps: float = 1e-3):
    """H theta by a central difference of gradients along theta (relative step eps)."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in plist]
    out = []
    try:
        gs = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, s in zip(plist, saved):
                    p.copy_(s * (1 + sign * eps))
            g = torch.autograd.grad(loss_fn(model, batch), plist, allow_unused=True)
            gs.append([torch.zeros_like(p) if x is None else x.detach() for p, x in zip(plist, g)])
        out = [(a - b) / (2 * eps) for a, b in zip(*gs)]
    finally:
        with torch.no_grad():
            for p, s in zip(plist, saved):
                p.copy_(s)
    return out
