"""The dispatch-level tracer behind `build_graph`: it runs the model once (in eval, and in
training mode when that runs) and finds which parameter slices are coupled.

Every slice of every parameter along every dimension is a variable (param, dim, index). The
tracer follows each tensor with a label tensor of shape (*shape, K): for each element the
variables it is made of (K slots, -1 for none). ATen ops move, mix and couple labels:
data-movement ops (view, permute, cat, ...) are applied to the labels themselves, pointwise
ops unite the labels that meet element by element, convolutions and matrix products unite
the labels of the contracted dimension and emit the weight's output slices as new channels.
A union-find over variables then yields the coupled channel classes (structured.graph):
removing a class removes every slice in it, and leaves the model computing the same
function on the channels left.

Running the model (rather than symbolic tracing) follows any Python control flow, but only
the path the example inputs take. So the tracer also notes where a value computed from the
inputs is read into Python (`bool(t)`, `t.item()`: the only ways a forward can branch on
data through torch), and when one is, `build_graph` runs the model on perturbed inputs and
refuses if the ops it runs change. An ATen op with no rule that touches a prunable channel is
reported with the module it ran in, so the user can pass that module to `ignore`.

Labels are held weakly: a label dies with its tensor, so tracing needs about one forward
pass of label memory, not the labels of every activation of both passes.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from prunekit.batches import plain_outputs, run_batch
from prunekit.errors import PruneError
from prunekit.structured.graph import (
    ChannelClass,
    ChannelGroup,
    DependencyGraph,
    tensor_aliases,
)
from prunekit.structured.measure import modes_restored

aten = torch.ops.aten

#: Modules followed as opaque blocks: their inputs and weights are left whole.
OPAQUE_TYPES: tuple[type, ...] = (nn.MultiheadAttention,)

_MOVE = {  # ops that only move elements: run them on the labels
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "clone",
    "contiguous", "alias", "detach", "lift_fresh", "lift_fresh_copy", "unsqueeze", "squeeze",
    "cat", "stack", "split", "split_with_sizes", "unbind", "chunk", "flatten", "unflatten",
    "movedim", "repeat", "expand_as", "view_as", "_reshape_alias", "channel_shuffle",
    "pixel_shuffle", "pixel_unshuffle", "slice", "select", "narrow", "index_select", "index",
    "roll", "flip", "constant_pad_nd", "_unsafe_index", "gather",
}
_POINTWISE = {"where", "masked_fill", "clamp", "hardtanh", "dropout", "lerp", "hardswish",
              "hardsigmoid", "silu", "gelu", "relu", "relu6", "elu", "leaky_relu", "mish",
              "softplus", "sigmoid", "tanh", "threshold", "clamp_min", "clamp_max", "prelu"}
_SAME = {"_to_copy", "to", "type_as", "_copy_from_and_resize"}  # labels unchanged
_FRESH = {  # results that carry no channel of their inputs
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "new_zeros", "new_ones", "new_empty", "new_full", "zeros", "ones", "empty", "full",
    "arange", "scalar_tensor", "randn", "rand", "empty_strided", "new_empty_strided",
    "eq", "ne", "lt", "le", "gt", "ge", "isnan", "isinf", "isfinite", "argmax", "argmin",
    "bitwise_not", "logical_not", "logical_and", "logical_or", "_local_scalar_dense",
    "is_nonzero", "any", "all", "sym_size", "sym_stride", "sym_numel", "item",
    "_assert_async", "_functional_assert_async", "nonzero",
}
_POOL = {
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool1d", "upsample_nearest2d", "upsample_bilinear2d",
    "_upsample_bilinear2d_aa", "upsample_bicubic2d", "_upsample_nearest_exact2d",
    "adaptive_avg_pool2d", "mkldnn_adaptive_avg_pool2d",
}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "var", "std", "logsumexp",
           "linalg_vector_norm", "norm", "prod", "var_mean", "std_mean"}
_ALONG = {"_softmax", "_log_softmax", "softmax", "log_softmax", "cumsum", "cumprod",
          "_safe_softmax"}
_SDPA = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
         "_scaled_dot_product_attention_math", "_scaled_dot_product_cudnn_attention",
         "_scaled_dot_product_fused_attention_overrideable"}
_BN = {"native_batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
       "batch_norm", "cudnn_batch_norm", "_batch_norm_impl_index",
       "_native_batch_norm_legit_functional"}
# indexing ops whose result depends on fixed positions along a dim: coupled channels there
# would shift, so any channel varying along the indexed dim is kept whole
_FACTOR_MOVES = {"t", "transpose", "permute", "detach", "alias", "clone", "contiguous",
                 "_to_copy", "to", "lift_fresh"}
# ops that hand a tensor's value to Python: the only ways a forward branches on data
_READS = {"_local_scalar_dense", "is_nonzero", "equal"}
_WEIGHT_NORM = {"_weight_norm_interface", "_weight_norm"}
_POSITIONAL = {"slice", "select", "narrow", "index_select", "gather", "roll", "flip",
               "constant_pad_nd", "index", "_unsafe_index", "split_with_sizes"}


class _UnionFind:
    """Union-find over integer variables, vectorised with torch; paths are compressed in
    bulk before a find after unions, so a find is one gather."""

    def __init__(self, n: int):
        self.parent = torch.arange(n)
        self.dirty = False

    def _compress(self) -> None:
        p = self.parent
        while True:
            q = p[p]
            if torch.equal(q, p):
                break
            p = q
        self.parent = p
        self.dirty = False

    def find(self, x: torch.Tensor) -> torch.Tensor:
        if self.dirty:
            self._compress()
        x = torch.as_tensor(x, dtype=torch.long)
        return torch.where(x >= 0, self.parent[x.clamp(min=0)], x)

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.reshape(-1), b.reshape(-1)
        keep = (a >= 0) & (b >= 0)
        a, b = a[keep], b[keep]
        while a.numel():
            ra, rb = self.find(a), self.find(b)
            diff = ra != rb
            if not diff.any():
                break
            lo, hi = torch.minimum(ra, rb)[diff], torch.maximum(ra, rb)[diff]
            self.parent[hi] = lo
            self.dirty = True
            a, b = a[diff], b[diff]


def tensors_in(x) -> list[torch.Tensor]:
    """Every tensor inside a nest of lists, tuples and dicts."""
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


class _Tracer(TorchDispatchMode):
    """Follows labels through ATen ops during one eager forward pass."""

    def __init__(self, model: nn.Module, ignore: Sequence[str]):
        super().__init__()
        self.model = model
        named = [(n, t) for n, t in model.named_parameters(remove_duplicate=True)]
        named += [(n, t) for n, t in model.named_buffers(remove_duplicate=True)
                  if t.is_floating_point()]  # index buffers (position ids) are no channels
        self.names: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.by_id: dict[int, int] = {}  # id(tensor) -> index; every alias of a tied tensor
        self.ranges: list[tuple[int, int, int]] = []  # (param index, dim, start)
        self.aliases = tensor_aliases(model)
        tie = {a: k for k, names in enumerate(self.aliases.tied) for a in names}
        tied_index: dict[int, int] = {}  # tie -> index of its first tensor
        n = 0
        for name, t in named:
            if name in tie and tie[name] in tied_index:  # another object on a tied storage
                self.by_id[id(t)] = tied_index[tie[name]]
                continue
            i = len(self.names)
            if name in tie:
                tied_index[tie[name]] = i
            self.names.append(name)
            self.shapes.append(tuple(t.shape))
            self.by_id[id(t)] = i
            for d, s in enumerate(t.shape):
                self.ranges.append((i, d, n))
                n += s
        self.sentinel = n  # a variable that is always frozen: positions of a fixed size
        n += 1
        self.n_vars = n
        self.starts = torch.tensor([r[2] for r in self.ranges] + [n - 1])
        self.uf = _UnionFind(n)
        self.producer = torch.zeros(n, dtype=torch.bool)
        self.reader = torch.zeros(n, dtype=torch.bool)
        self.looked_up = torch.zeros(n, dtype=torch.bool)  # rows of an embedding table
        self.frozen = torch.zeros(n, dtype=torch.bool)
        self.reduced = torch.zeros(n, dtype=torch.bool)
        self.frozen[self.sentinel] = True
        # tensor -> labels, held weakly: they die with the tensor (see the module docstring)
        self.labels = WeakIdKeyDictionary()
        self.factored = WeakIdKeyDictionary()  # tensor -> per-dim label vectors (weights)
        self.from_data = WeakIdKeyDictionary()  # tensors computed from the example inputs
        self.data_reads: list[tuple[str, str]] = []  # (module, op) reading data into Python
        self._hash = torch.randint(1, 2**62, (64,), generator=torch.Generator().manual_seed(0))
        self.module_names = {m: name for name, m in model.named_modules()}
        self.stack: list[str] = []
        self.opaque_depth = 0
        self.ignore = tuple(ignore)
        self.errors: list[str] = []
        self.frozen_reasons: dict[str, str] = {}
        self.n_ops = 0
        self.busy = False
        self._param_base = {(i, d): start for i, d, start in self.ranges}

    # ----- labels -------------------------------------------------------------------------
    def get(self, t: torch.Tensor) -> torch.Tensor:
        hit = self.labels.get(t)
        if hit is not None:
            return hit
        vecs = self.factors(t)
        if vecs is not None:
            lab = _materialise(vecs, tuple(t.shape))
            self.labels[t] = lab
            return lab
        return torch.full((*t.shape, 1), -1, dtype=torch.long)

    def factors(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Per-dim label vectors of a weight (or a transposed view of one), else None: weights
        are never expanded element by element unless an op needs it."""
        hit = self.factored.get(t)
        if hit is not None:
            return hit
        i = self.by_id.get(id(t))
        if i is None:
            return None
        vecs = [torch.arange(s) + self._param_base[(i, d)] if s > 1 else
                torch.full((s,), -1, dtype=torch.long) for d, s in enumerate(t.shape)]
        self.factored[t] = vecs
        return vecs

    def dimvec(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """One label per index along `dim` shared by that whole slice (-1 where none)."""
        vecs = self.factors(t)
        if vecs is not None:
            return self.uf.find(vecs[dim])
        return self.first_label(self.const_along(self.get(t), dim))

    def set(self, t: torch.Tensor, lab: torch.Tensor) -> None:
        if lab.shape[:-1] != t.shape:
            lab = lab.expand(*t.shape, lab.shape[-1]) if lab.dim() == t.dim() + 1 else \
                torch.full((*t.shape, 1), -1, dtype=torch.long)
        self.labels[t] = lab

    def where(self) -> str:
        return self.stack[-1] if self.stack else "<model>"

    def freeze(self, labs: torch.Tensor, reason: str) -> None:
        v = labs[labs >= 0].unique()
        if v.numel():
            self.frozen[v] = True
            r = self.uf.find(v)
            key = self.where()
            if key not in self.frozen_reasons and not self.frozen[r].all():
                self.frozen_reasons[key] = reason
            self.frozen[r] = True

    # ----- helpers ------------------------------------------------------------------------
    def const_along(self, lab: torch.Tensor, dim: int) -> torch.Tensor:
        """For each index along `dim`: the label (per slot) shared by the whole slice, else -1.
        Returns (size, K)."""
        lab = self.uf.find(lab)
        x = lab.movedim(dim, 0).reshape(lab.shape[dim], -1, lab.shape[-1])
        first = x[:, :1, :]
        ok = (x == first).all(1)
        return torch.where(ok, first[:, 0, :], torch.full_like(first[:, 0, :], -1))

    def first_label(self, cl: torch.Tensor) -> torch.Tensor:
        """(size, K) -> (size,) first non-negative label per row."""
        has = cl >= 0
        idx = has.to(torch.int8).argmax(-1)
        out = cl.gather(-1, idx[:, None])[:, 0]
        return torch.where(has.any(-1), out, torch.full_like(out, -1))

    def varies(self, lab: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
        """Labels (unique roots) that differ along any of `dims`."""
        lab = self.uf.find(lab)
        out = []
        for d in dims:
            if lab.shape[d] <= 1:
                continue
            base = lab.narrow(d, 0, 1)
            diff = (lab != base).any(d, keepdim=True).expand_as(lab)
            out.append(lab[diff])
        if not out:
            return torch.empty(0, dtype=torch.long)
        v = torch.cat(out)
        return v[v >= 0].unique()

    def pointwise(self, inputs: list[torch.Tensor], out_shape) -> torch.Tensor:
        """Unite labels that meet element by element; return the output labels.

        Work happens on the distinct label combinations (hashed), not on every element."""
        flat, dims = [], []
        for lab in inputs:
            b = lab.expand(*out_shape, lab.shape[-1])
            for k in range(b.shape[-1]):
                m = b[..., k]
                if (m >= 0).any():
                    flat.append(m.reshape(-1))
                    dims.append(self._vary_dims(m))
        if not flat:
            return torch.full((*out_shape, 1), -1, dtype=torch.long)
        if len(flat) == 1:
            return flat[0].view(*out_shape, 1)
        full = torch.stack(flat)
        key = (full * self._hash[: len(flat), None]).sum(0)
        uniq, inv = torch.unique(key, return_inverse=True)
        rep = torch.zeros(len(uniq), dtype=torch.long).scatter_(0, inv, torch.arange(inv.numel()))
        maps = self.uf.find(full[:, rep])
        n = maps.shape[1]
        good = torch.zeros_like(maps, dtype=torch.bool)
        for i in range(len(maps)):
            for j in range(i + 1, len(maps)):
                if dims[i] and dims[j] and dims[i] != dims[j]:
                    continue  # labels indexed by different dims (tokens vs channels)
                a, b = maps[i], maps[j]
                both = (a >= 0) & (b >= 0)
                if not both.any():
                    continue
                pairs = torch.stack([a[both], b[both]], 1).unique(dim=0)
                fa, fb = self.frozen[pairs[:, 0]], self.frozen[pairs[:, 1]]
                if fa.any() or fb.any():  # whatever meets a fixed-size channel is fixed too
                    self.frozen[pairs[fa, 1]] = True
                    self.frozen[pairs[fb, 0]] = True
                ua, ca = pairs[:, 0].unique(return_counts=True)
                ub, cb = pairs[:, 1].unique(return_counts=True)
                # unite when one side meets a single partner: x * scale (SE blocks) after a
                # grouped conv meets one class per many scale channels; a label that meets
                # many on both sides (a token index against channels) is no coupling
                ok = torch.isin(pairs[:, 0], ua[ca == 1]) | torch.isin(pairs[:, 1], ub[cb == 1])
                if ok.any():
                    self.uf.union(pairs[ok, 0], pairs[ok, 1])
                    good[i] |= torch.isin(a, pairs[ok, 0]) & both
                    good[j] |= torch.isin(b, pairs[ok, 1]) & both
        out = torch.full((n,), -1, dtype=torch.long)
        for m, g in zip(maps, good):  # prefer labels that met a partner one-to-one
            sel = (out < 0) & g
            out[sel] = m[sel]
        for m in maps:
            sel = (out < 0) & (m >= 0)
            out[sel] = m[sel]
        return out[inv].view(*out_shape, 1)

    def _vary_dims(self, m: torch.Tensor) -> frozenset:
        """Dims along which a label map changes between neighbouring labelled elements."""
        m = self.uf.find(m)
        out = set()
        for d, size in enumerate(m.shape):
            if size < 2:
                continue
            a, b = m.narrow(d, 0, size - 1), m.narrow(d, 1, size - 1)
            if ((a != b) & (a >= 0) & (b >= 0)).any():
                out.add(d)
        return frozenset(out)

    def mark_producer(self, labels: torch.Tensor) -> None:
        v = labels[labels >= 0]
        self.producer[v] = True

    def mark_reader(self, labels: torch.Tensor) -> None:
        v = labels[labels >= 0]
        self.reader[v] = True

    # ----- dispatch -----------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.busy:  # our own bookkeeping inside a module hook
            return out
        self.n_ops += 1
        name = func.overloadpacket.__name__
        outs = tensors_in(out)
        if any(t in self.from_data for t in tensors_in((args, kwargs))):
            if name in _READS and not self.opaque_depth:
                self.data_reads.append((self.where(), name))
            for t in outs:
                self.from_data[t] = True
        if not outs or self.opaque_depth:
            return out
        if name.endswith("_") and not name.endswith("__"):
            name = name[:-1]  # in-place variant: same rule
        try:
            self.rule(name, func, args, kwargs, out, outs)
        except Exception as e:  # a rule that cannot follow this op: report, do not crash
            ins = tensors_in((args, kwargs))
            if any((self.get(t) >= 0).any() for t in ins):
                self.errors.append(f"{self.where()}: aten.{name} ({type(e).__name__}: {e})")
            for t in outs:
                self.set(t, torch.full((*t.shape, 1), -1, dtype=torch.long))
        return out

    def rule(self, name, func, args, kwargs, out, outs):
        ins = tensors_in((args, kwargs))
        if name in _FRESH or not any(self._labelled(t) for t in ins):
            for t in outs:
                self.set(t, torch.full((*t.shape, 1), -1, dtype=torch.long))
            return
        if name in _FACTOR_MOVES and self.factors(ins[0]) is not None:
            return self.move(name, func, args, kwargs, outs)
        if name in ("convolution", "mm", "addmm", "embedding") or name in _BN \
                or name in _WEIGHT_NORM:
            in_labs = []
        else:
            in_labs = [self.get(t) for t in ins]
        if name in _SAME or name == "copy" or name == "fill" or name == "zero":
            if name == "copy":  # copy_(dst, src): dst now holds src's labels
                lab = self.get(args[1])
                self.set(outs[0], lab.expand(*outs[0].shape, lab.shape[-1])
                         if lab.dim() - 1 == outs[0].dim() else
                         self.pointwise([lab], tuple(outs[0].shape)))
            elif name in ("fill", "zero"):
                self.set(outs[0], torch.full((*outs[0].shape, 1), -1, dtype=torch.long))
            else:
                self.set(outs[0], in_labs[0])
            return
        if name in _MOVE:
            return self.move(name, func, args, kwargs, outs)
        if torch.Tag.pointwise in func.tags or name in _POINTWISE:
            lab = self.pointwise(in_labs, tuple(outs[0].shape))
            for t in outs:
                self.set(t, lab)
            return
        if name == "convolution":
            return self.conv(args, outs[0])
        if name in ("mm", "bmm", "addmm", "baddbmm", "matmul", "addbmm"):
            return self.matmul(name, args, outs[0])
        if name in _BN:
            return self.batch_norm(args, outs)
        if name in _WEIGHT_NORM:
            return self.weight_norm(args, kwargs, outs)
        if name in ("native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm"):
            return self.layer_norm(name, args, outs)
        if name == "native_group_norm":
            return self.group_norm(args, outs)
        if name == "embedding":
            table = self.factors(args[0])
            if table is not None:
                self.looked_up[table[1][table[1] >= 0]] = True
            ch = self.dimvec(args[0], 1)
            self.mark_producer(ch)
            self.set(outs[0], ch.view(*([1] * (outs[0].dim() - 1)), -1, 1)
                     .expand(*outs[0].shape, 1))
            return
        if name in _POOL:
            return self.pool(in_labs[0], outs)
        if name in _REDUCE:
            return self.reduce(name, args, kwargs, in_labs[0], outs)
        if name in _ALONG:
            dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
            self.mark_reduced(in_labs[0], [dim % ins[0].dim()])
            self.set(outs[0], in_labs[0])
            return
        if name == "as_strided" and outs[0].dim() == ins[0].dim() >= 3 and \
                outs[0].shape[:2] == ins[0].shape[:2]:  # adaptive pooling on some layouts
            return self.pool(in_labs[0], outs)
        if name in _SDPA:
            return self.sdpa(args, kwargs, outs)
        if name in ("native_dropout",):
            self.set(outs[0], in_labs[0])
            return
        raise PruneError(f"no rule for aten.{name}")

    def _labelled(self, t: torch.Tensor) -> bool:
        if self.factors(t) is not None:
            return True
        hit = self.labels.get(t)
        return hit is not None and bool((hit >= 0).any())

    def mark_reduced(self, lab, dims):
        v = self.varies(lab, dims)
        if v.numel():
            self.reduced[v] = True

    # ----- rules --------------------------------------------------------------------------
    def move(self, name, func, args, kwargs, outs):
        src = args[0]
        vecs = self.factors(src) if isinstance(src, torch.Tensor) else None
        if vecs is not None and src not in self.labels and name in _FACTOR_MOVES:
            nd = src.dim()
            if name in ("t", "transpose"):
                a, b = (0, 1) if name == "t" else (args[1] % nd, args[2] % nd)
                perm = list(range(nd))
                perm[a], perm[b] = perm[b], perm[a]
            elif name == "permute":
                perm = [d % nd for d in args[1]]
            else:
                perm = list(range(nd))
            self.factored[outs[0]] = [vecs[p] for p in perm]
            return
        lists = isinstance(src, (list, tuple))
        srcs = list(src) if lists else [src]
        labs = [self.get(t) for t in srcs]
        k = max(lab.shape[-1] for lab in labs)
        labs = [torch.cat([lab, torch.full((*lab.shape[:-1], k - lab.shape[-1]), -1,
                                           dtype=torch.long)], -1) if lab.shape[-1] < k else lab
                for lab in labs]
        if name == "constant_pad_nd" and min(args[1], default=0) >= 0:
            self.set(outs[0], self.pad_labels(labs[0], args[1]))
            return
        pad_value = -1
        if name in _POSITIONAL:
            dims = self._positional_dims(name, args, kwargs, srcs[0])
            v = self.varies(labs[0], dims) if dims else torch.empty(0, dtype=torch.long)
            if v.numel():
                self.freeze(v, f"aten.{name} picks fixed positions along a channel dim")
                pad_value = self.sentinel  # padded channels have a fixed count
        results = []
        for s in range(k):
            slot = [lab[..., s].contiguous() for lab in labs]
            a = (slot if lists else slot[0],) + tuple(args[1:])
            kw = dict(kwargs)
            if name == "constant_pad_nd":
                a = a[:2] + (pad_value,)
                kw.pop("value", None)
            if name in ("_to_copy", "to"):
                kw = {}
            results.append(tensors_in(func(*a, **kw)))
        for j, t in enumerate(outs):
            lab = torch.stack([r[j] for r in results], -1)
            self.set(t, lab)
        if name in ("view", "_unsafe_view", "reshape", "unflatten", "_reshape_alias"):
            self._split_blocks(labs[0], outs[0])
        if name in ("split", "chunk") and len(outs) > 1:
            sizes = {t.shape[self._dim(args, kwargs, srcs[0], 2, 0)] for t in outs}
            d = self._dim(args, kwargs, srcs[0], 2, 0)
            if len(sizes) == 1:  # equal chunks: position j of each chunk goes together
                ls = [self.get(t) for t in outs]
                for a_, b_ in zip(ls[:-1], ls[1:]):
                    self.pointwise([a_, b_], tuple(outs[0].shape))
            else:
                v = self.varies(labs[0], [d])
                self.freeze(v, f"aten.{name} into unequal parts along a channel dim")

    def pad_labels(self, lab: torch.Tensor, pad: Sequence[int]) -> torch.Tensor:
        """Labels after a constant pad that only grows: along a dim where channels vary, the
        new positions are constants of a fixed count (the sentinel; the channels they border
        stay prunable, the pad just moves them); along any other dim the padded elements
        belong to the slices they extend (a spatial pad keeps each element in its channel)."""
        for i in range(0, len(pad), 2):
            d = lab.dim() - 2 - i // 2
            before, after = pad[i], pad[i + 1]
            if not before and not after:
                continue
            channels = bool(self.varies(lab, [d]).numel())
            parts = []
            for n in (before, after):
                shape = (*lab.shape[:d], n, *lab.shape[d + 1:])
                parts.append(torch.full(shape, self.sentinel, dtype=torch.long) if channels
                             else lab.narrow(d, 0, 1).expand(shape))
            lab = torch.cat([parts[0], lab, parts[1]], d)
        return lab

    @staticmethod
    def _dim(args, kwargs, t, pos, default):
        d = args[pos] if len(args) > pos else kwargs.get("dim", default)
        return d % max(t.dim(), 1)

    def _positional_dims(self, name, args, kwargs, t):
        if name in ("slice", "select", "narrow", "index_select", "gather"):
            d = self._dim(args, kwargs, t, 1, 0)
            if name == "slice":  # a full slice keeps every position
                start = args[2] if len(args) > 2 else kwargs.get("start", None)
                end = args[3] if len(args) > 3 else kwargs.get("end", None)
                step = args[4] if len(args) > 4 else kwargs.get("step", 1)
                if (start in (None, 0)) and (end is None or end >= t.shape[d]) and step == 1:
                    return []
            return [d]
        if name == "split_with_sizes":
            return [self._dim(args, kwargs, t, 2, 0)]
        if name in ("roll", "flip"):
            dims = args[2] if name == "roll" and len(args) > 2 else \
                (args[1] if name == "flip" else kwargs.get("dims", []))
            dims = [dims] if isinstance(dims, int) else list(dims or range(t.dim()))
            return [d % t.dim() for d in dims]
        if name == "constant_pad_nd":
            pad = args[1]
            return [t.dim() - 1 - i // 2 for i, p in enumerate(pad) if p]
        if name in ("index", "_unsafe_index"):
            return [i for i, ix in enumerate(args[1]) if ix is not None]
        return []

    def _split_blocks(self, lab_in: torch.Tensor, out: torch.Tensor) -> None:
        """A view that splits a channel dim into (outer, inner...) fixes the inner sizes in the
        model's code (e.g. heads x head_dim): inner positions of one outer index go together."""
        ishape, oshape = list(lab_in.shape[:-1]), list(out.shape)
        i = j = 0
        while i < len(ishape) and j < len(oshape):
            gi, gj = [i], [j]
            pi, pj = ishape[i], oshape[j]
            if not pi or not pj:
                return
            while pi != pj:
                if pi < pj:
                    i += 1
                    gi.append(i)
                    pi *= ishape[i]
                else:
                    j += 1
                    gj.append(j)
                    pj *= oshape[j]
            i += 1
            j += 1
            real_out = [d for d in gj if oshape[d] > 1]
            if len(real_out) > 1:
                lab_out = self.get(out)
                v = self.varies(lab_in, gi)
                if not v.numel():
                    continue
                outer = real_out[0]
                for s in range(lab_out.shape[-1]):
                    slot = self.uf.find(lab_out[..., s])
                    for h in range(oshape[outer]):
                        u = slot.select(outer, h)
                        u = u[(u >= 0) & torch.isin(u, v)].unique()
                        if u.numel() > 1:
                            self.uf.union(u[:1].expand(u.numel() - 1), u[1:])

    def conv(self, args, out):
        x, w, b = args[0], args[1], args[2]
        transposed, groups = args[6], args[8]
        if transposed:
            raise PruneError("transposed convolution")
        xin, wout, win = self.dimvec(x, 1), self.dimvec(w, 0), self.dimvec(w, 1)
        c_in, o = x.shape[1], w.shape[0]
        n_in, n_out = c_in // groups, o // groups
        weight = self.factors(w)
        if weight is not None:  # the weight's own input-dim variables, not their class roots
            self.mark_reader(weight[1])
        elif not self._labelled(w):  # computed where the graph cannot see: a fixed size
            self.freeze(xin, "read by a convolution whose weight the graph cannot follow")
        if groups == 1:
            self.uf.union(xin, win)
        elif n_in == 1:  # depthwise: input k feeds outputs k*m .. k*m+m-1 only
            self.uf.union(xin.repeat_interleave(n_out), wout)
            self.uf.union(wout.view(groups, n_out)[:, :1].expand(groups, n_out), wout.view(
                groups, n_out))
        else:  # grouped: the same local index goes in (or out) of every group together
            xg = xin.view(groups, n_in)
            self.uf.union(xg, win.view(1, n_in).expand(groups, n_in))
            wo = wout.view(groups, n_out)
            self.uf.union(wo[:1].expand(groups, n_out), wo)
        if b is not None:
            self.uf.union(self.dimvec(b, 0), wout)
        self.mark_producer(wout)
        self.set(out, wout.view(1, -1, *([1] * (out.dim() - 2)), 1).expand(*out.shape, 1))

    def matmul(self, name, args, out):
        bias = None
        if name in ("addmm", "baddbmm", "addbmm"):
            bias, a, b = args[0], args[1], args[2]
        else:
            a, b = args[0], args[1]
        vb = self.factors(b) if b.dim() == 2 and a.dim() == 2 else None
        if vb is not None and self.factors(a) is None:  # activation x weight: the common case
            la = self.uf.find(self.get(a))
            self.uf.union(self.first_label(_const_dim(la, 0)), vb[0])
            self.mark_reader(vb[0])
            cols = self.uf.find(vb[1])
            self.mark_producer(cols)
            res = cols.view(1, -1, 1).expand(*out.shape, 1)  # rows are tokens, not channels
            if bias is not None:
                res = self.pointwise([res, self.get(bias)], tuple(out.shape))
            self.set(out, res)
            return
        la, lb = self.get(a), self.get(b)
        k = max(la.shape[-1], lb.shape[-1])
        la = torch.cat([la, torch.full((*la.shape[:-1], k - la.shape[-1]), -1,
                                       dtype=torch.long)], -1)
        lb = torch.cat([lb, torch.full((*lb.shape[:-1], k - lb.shape[-1]), -1,
                                       dtype=torch.long)], -1)
        if a.dim() == 2:
            la, lb = la.unsqueeze(0), lb.unsqueeze(0)
        la, lb = self.uf.find(la), self.uf.find(lb)
        # contraction: labels of A constant along rows vs labels of B constant along columns
        ca = _const_dim(la, 1)  # (B, k, K) labels indexed by the contracted position
        cb = _const_dim(lb, 2)
        for s in range(k):
            for t in range(k):
                self.uf.union(ca[..., s], cb[..., t])
        # batch: labels constant over a whole matrix
        ba = _const_dim(_const_dim(la, 1).unsqueeze(1), 2)[:, 0] if la.shape[0] > 1 else None
        if ba is not None:
            bb = _const_dim(_const_dim(lb, 1).unsqueeze(1), 2)[:, 0]
            for s in range(k):
                for t in range(k):
                    self.uf.union(ba[..., s], bb[..., t])
        rows = _const_dim(la, 2)  # (B, n, K): A's labels per output row
        cols = _const_dim(lb, 1)  # (B, m, K)
        if _from_param(self, b):
            self.mark_producer(cols)
        res = torch.cat([cols.unsqueeze(1).expand(-1, rows.shape[1], -1, -1),
                         rows.unsqueeze(2).expand(-1, -1, cols.shape[1], -1)], -1)
        if a.dim() == 2:
            res = res[0]
        res = _compact(res)
        if bias is not None:
            res = self.pointwise([res, self.get(bias)], tuple(out.shape))
        self.set(out, res)

    def weight_norm(self, args, kwargs, outs):
        """w = g * v / ||v|| (nn.utils.parametrizations.weight_norm, and the old hook form).

        w is a weight to later ops, with v's channels; g's entries go with v's slices along
        `dim`; the norm runs over the other dims, so a channel read there (a conv's input)
        changes the other channels' scale when removed: those are reduced (approximate)."""
        v, g = args[0], args[1]
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        vecs = self.factors(v)
        if vecs is None:
            raise PruneError("weight norm of a tensor that is not a parameter")
        keep = [] if dim == -1 else [dim % v.dim()]  # -1: one norm over the whole tensor
        for d, vec in enumerate(vecs):
            if d in keep:
                self.uf.union(self.dimvec(g, d), vec)
            elif (vec >= 0).any():
                self.reduced[self.uf.find(vec[vec >= 0])] = True
        self.factored[outs[0]] = list(vecs)
        for t in outs[1:]:
            self.set(t, torch.full((*t.shape, 1), -1, dtype=torch.long))

    def batch_norm(self, args, outs):
        x = args[0]
        xin = self.dimvec(x, 1)
        for p in args[1:5]:
            if isinstance(p, torch.Tensor):
                self.uf.union(xin, self.dimvec(p, 0))
        self.set(outs[0], self.get(x))
        for t in outs[1:]:
            self.set(t, torch.full((*t.shape, 1), -1, dtype=torch.long))

    def layer_norm(self, name, args, outs):
        x = args[0]
        shape = args[1]
        lx = self.get(x)
        n = len(shape) if isinstance(shape, (list, tuple)) else 1
        dims = list(range(x.dim() - n, x.dim()))
        self.mark_reduced(lx, dims)
        ps = [self.get(p) for p in args[2:4] if isinstance(p, torch.Tensor)]
        lab = self.pointwise([lx, *ps], tuple(x.shape))
        self.set(outs[0], lab)
        for t in outs[1:]:
            self.set(t, torch.full((*t.shape, 1), -1, dtype=torch.long))

    def group_norm(self, args, outs):
        x, w, b = args[0], args[1], args[2]
        lx = self.get(x)
        xin = self.first_label(self.const_along(lx, 1))
        for p in (w, b):
            if isinstance(p, torch.Tensor):
                self.uf.union(xin, self.first_label(self.const_along(self.get(p), 0)))
        if args[6] > 1:
            self.freeze(xin, "group norm ties channels in groups")
        self.mark_reduced(lx, [1])
        self.set(outs[0], lx)
        for t in outs[1:]:
            self.set(t, torch.full((*t.shape, 1), -1, dtype=torch.long))

    def pool(self, lab, outs):
        x = lab
        spatial = list(range(2, lab.dim() - 1))
        v = self.varies(x, spatial)
        if v.numel():
            raise PruneError("pooling over a channel dim")
        for t in outs:
            if not t.is_floating_point():
                self.set(t, torch.full((*t.shape, 1), -1, dtype=torch.long))
                continue
            base = x
            for d in spatial:
                base = base.narrow(d, 0, 1)
            self.set(t, base.expand(*t.shape, base.shape[-1]))

    def reduce(self, name, args, kwargs, lab, outs):
        x = args[0]
        pos = 2 if name in ("linalg_vector_norm", "norm") else 1  # (self, ord, dim, ...)
        dims = args[pos] if len(args) > pos and not isinstance(args[pos], bool) else \
            kwargs.get("dim", None)
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = list(range(x.dim()))
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = sorted(d % max(x.dim(), 1) for d in dims)
        self.mark_reduced(lab, dims)
        gone = self.varies(lab, dims)  # channels summed away index nothing in the result
        base = lab
        for d in dims:
            base = base.narrow(d, 0, 1)
        if gone.numel():
            base = torch.where(torch.isin(self.uf.find(base), gone), -1, base)
        for t in outs:
            if not t.is_floating_point():
                self.set(t, torch.full((*t.shape, 1), -1, dtype=torch.long))
                continue
            b = base
            if b[..., 0].numel() == t.numel() and tuple(b.shape[:-1]) != tuple(t.shape):
                b = b.reshape(*t.shape, b.shape[-1])
            self.set(t, b)

    def sdpa(self, args, kwargs, outs):
        q, k, v = args[0], args[1], args[2]
        lq, lk, lv = (self.uf.find(self.get(t)) for t in (q, k, v))
        hq, hk = q.shape[-3], k.shape[-3]
        rep = hq // hk
        for h in range(hq):
            u = torch.cat([lq.select(-4, h).reshape(-1), lk.select(-4, h // rep).reshape(-1),
                           lv.select(-4, h // rep).reshape(-1)])
            u = u[u >= 0].unique()
            if u.numel() > 1:
                self.uf.union(u[:1].expand(u.numel() - 1), u[1:])
        lab = lv.repeat_interleave(rep, dim=-4) if rep > 1 else lv
        lab = lab.narrow(-3, 0, 1)
        self.set(outs[0], lab.expand(*outs[0].shape, lab.shape[-1]))
        for t in outs[1:]:
            self.set(t, torch.full((*t.shape, 1), -1, dtype=torch.long))

    # ----- module hooks -------------------------------------------------------------------
    def pre_hook(self, module, args):
        self.busy = True
        try:
            self._pre(module, args)
        finally:
            self.busy = False

    def post_hook(self, module, args, out):
        self.busy = True
        try:
            self._post(module, out)
        finally:
            self.busy = False

    def _pre(self, module, args):
        name = self.module_names.get(module)
        if name is None:
            return
        self.stack.append(name or "<model>")
        if self.opaque_depth or self._is_opaque(name, module):
            if not self.opaque_depth:
                for t in tensors_in(args):
                    self.freeze(self.get(t), "inputs of a module left whole (ignore or "
                                "nn.MultiheadAttention)")
            self.opaque_depth += 1

    def _post(self, module, out):
        name = self.module_names.get(module)
        if name is None:
            return
        if self.opaque_depth:
            self.opaque_depth -= 1
            if not self.opaque_depth:
                for t in tensors_in(out):
                    self.set(t, torch.full((*t.shape, 1), -1, dtype=torch.long))
        if self.stack:
            self.stack.pop()

    def _is_opaque(self, name, module) -> bool:
        return _opaque(name, module, self.ignore)

    def freeze_param(self, i: int, reason: str | None = None) -> None:
        """Keep every slice of tensor `i` whole (and say why, under its name)."""
        if reason:
            self.frozen_reasons.setdefault(self.names[i], reason)
        for d, size in enumerate(self.shapes[i]):
            s = self._param_base[(i, d)]
            self.frozen[s:s + size] = True


def _from_param(tracer: _Tracer, t: torch.Tensor) -> bool:
    lab = tracer.get(t)
    return lab.shape[-1] >= 2 and bool((lab >= 0).all())


def _materialise(vecs: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    if not shape:
        return torch.full((1,), -1, dtype=torch.long)
    slots = []
    for d, v in enumerate(vecs):
        view = [1] * len(shape)
        view[d] = shape[d]
        slots.append(v.view(view).expand(shape))
    return torch.stack(slots, -1)


def _compact(lab: torch.Tensor) -> torch.Tensor:
    """Drop label slots that are empty everywhere (keep at least one)."""
    keep = [k for k in range(lab.shape[-1]) if (lab[..., k] >= 0).any()]
    return lab[..., keep] if keep else lab[..., :1]


def _const_dim(lab: torch.Tensor, dim: int) -> torch.Tensor:
    """Labels constant along `dim` (removed), -1 where they vary. lab (..., K)."""
    first = lab.narrow(dim, 0, 1)
    ok = (lab == first).all(dim, keepdim=True)
    return torch.where(ok, first, torch.full_like(first, -1)).squeeze(dim)


def build_graph(model: nn.Module, example_inputs, ignore: Sequence[str] = ()) -> DependencyGraph:
    """Trace `model` on `example_inputs` (a tensor, a tuple of positional arguments or a dict
    of keyword arguments) and group its coupled channels.

    The graph is what the trace saw; `verify_graph(model, graph, example_inputs)` then shrinks
    each group once and drops those that break the model (sizes the trace cannot see);
    `shrink` does both. Modules matching an `ignore` glob are left whole. Raises PruneError
    on an op the graph cannot follow (naming the module to ignore) and when the forward
    takes another path on perturbed inputs (data-dependent control flow)."""
    names = {n for n, _ in model.named_modules()}
    for pat in ignore:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise PruneError(f"ignore={pat!r} matches no module of {type(model).__name__}; "
                             f"module names look like {', '.join(sorted(names)[1:4])}")
    tracer = _Tracer(model, ignore)
    outs, train_runs = [], False
    with _traced(model, tracer.pre_hook, tracer.post_hook), tracer:
        for t in tensors_in(example_inputs):
            tracer.from_data[t] = True
        model.eval()
        outs.append(run_batch(model, example_inputs))
        # training mode can run more (auxiliary heads): follow it too, when it runs
        model.train()
        try:
            outs.append(run_batch(model, example_inputs))
            train_runs = True
        except Exception:  # e.g. batch norm on a batch of one: eval-mode graph only
            tracer.stack.clear()
            tracer.opaque_depth = 0
    if tracer.errors:
        first = tracer.errors[0]
        module = first.split(":", 1)[0]
        if ".parametrizations." in module:  # the layer, not its parametrization's module
            module = module.split(".parametrizations.", 1)[0]
        raise PruneError(
            f"the channel graph cannot follow {first}"
            + (f" (and {len(tracer.errors) - 1} more)" if len(tracer.errors) > 1 else "")
            + f"; leave that module whole with ignore=({module!r},)")
    reads = list(dict.fromkeys(f"{m}: aten.{op}" for m, op in tracer.data_reads))
    tracer.stack = ["<output>"]
    for t in tensors_in([plain_outputs(o) for o in outs]):
        tracer.freeze(tracer.get(t), "reaches the model output")
    for name, t in _named_tensors(model):  # weights of ignored modules stay whole
        mod = name.rsplit(".", 1)[0]
        i = tracer.by_id.get(id(t))
        if i is not None and any(fnmatch.fnmatchcase(mod, pat) or mod.startswith(pat + ".")
                                 for pat in ignore):
            tracer.freeze_param(i)
    named = dict(_named_tensors(model))
    for group in tracer.aliases.overlapping:  # views into one storage: cut apart, untied
        for name in group:
            i = tracer.by_id.get(id(named[name])) if name in named else None
            if i is not None:
                tracer.freeze_param(i, f"shares storage with {', '.join(group)} (views, not "
                                       f"one tensor): cutting one would untie them")
    graph = _collect(tracer)
    graph.tied = [list(g) for g in tracer.aliases.tied]
    graph.train_runs = train_runs
    del tracer, outs
    if reads:
        graph.data_reads = reads
        check_paths(model, example_inputs, ignore, reads)
    return graph


def _named_tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from ((n, t) for n, t in model.named_buffers(remove_duplicate=False)
                if t.is_floating_point())


@contextmanager
def _traced(model: nn.Module, pre, post):
    """Global module hooks, one thread, no_grad, KV caches off; afterwards the buffers that
    training mode moved (batch-norm statistics), every module's own mode and the cache flag
    are put back."""
    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post)
    cache = _disable_cache(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # label bookkeeping is many small ops: threads only add overhead
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    try:
        with torch.no_grad(), modes_restored(model):
            yield
    finally:
        torch.set_num_threads(threads)
        h1.remove()
        h2.remove()
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in buffers:
                    v.copy_(buffers[k])
        _restore_cache(model, cache)


class _Path(TorchDispatchMode):
    """The ops one forward pass runs: (module, op, output shapes), outside ignored modules
    (whose inside may branch: they are left whole)."""

    def __init__(self, model: nn.Module, ignore: Sequence[str]):
        super().__init__()
        self.module_names = {m: name for name, m in model.named_modules()}
        self.ignore = tuple(ignore)
        self.stack: list[str] = []
        self.opaque_depth = 0
        self.ops: list[tuple] = []

    def pre_hook(self, module, args):
        name = self.module_names.get(module)
        if name is not None:
            self.stack.append(name or "<model>")
            if self.opaque_depth or _opaque(name, module, self.ignore):
                self.opaque_depth += 1

    def post_hook(self, module, args, out):
        if self.module_names.get(module) is not None:
            if self.opaque_depth:
                self.opaque_depth -= 1
            if self.stack:
                self.stack.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.opaque_depth:
            self.ops.append((self.stack[-1] if self.stack else "<model>",
                             func.overloadpacket.__name__,
                             tuple(tuple(t.shape) for t in tensors_in(out))))
        return out


def _path(model: nn.Module, inputs, ignore: Sequence[str]) -> list[tuple]:
    rec = _Path(model, ignore)
    with _traced(model, rec.pre_hook, rec.post_hook), rec:
        model.eval()
        run_batch(model, inputs)
    return rec.ops


def perturbed_inputs(example_inputs) -> dict[str, object]:
    """Other inputs of the same shapes and dtypes: floating tensors negated, and redrawn from
    a normal distribution of the same mean and spread; integer tensors (token ids, masks)
    are kept, as their valid values are not known."""
    gen = torch.Generator().manual_seed(1)

    def negated(t):
        return -t if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def redrawn(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not t.numel():
            return t
        spread = float(t.float().std()) if t.numel() > 1 else 0.0
        spread = spread if spread > 0 else float(t.abs().mean()) or 1.0
        noise = torch.randn(t.shape, generator=gen).to(t.dtype)
        return noise * spread + t.float().mean().to(t.dtype)

    return {"the negated inputs": tree_map(negated, example_inputs),
            "inputs redrawn at random": tree_map(redrawn, example_inputs)}


def check_paths(model: nn.Module, example_inputs, ignore: Sequence[str] = (),
                reads: Sequence[str] = ()) -> None:
    """Refuse a model whose forward runs other ops on other inputs.

    The trace follows the path that `example_inputs` take; a forward that branches on the
    data (`if x.sum() > 0`) could take another path on other inputs, through weights or
    views the graph never saw, and a model shrunk on one path would fail on the other. So
    the model runs on `perturbed_inputs` too, and a different sequence of ops (outside
    ignored modules) raises PruneError naming the module where the paths part. When every
    input takes the same path, a warning still says where the data was read: branches no
    input took were not checked."""
    if not any(t.is_floating_point() for t in tensors_in(example_inputs)):
        warnings.warn(_unchecked(reads, "its inputs hold no floating-point tensor to vary"),
                      stacklevel=3)
        return
    base = _path(model, example_inputs, ignore)
    for what, other in perturbed_inputs(example_inputs).items():
        try:
            path = _path(model, other, ignore)
        except Exception as e:  # noqa: BLE001 - the model itself fails on these inputs
            warnings.warn(_unchecked(reads, f"it fails on {what} ({type(e).__name__})"),
                          stacklevel=3)
            return
        if path != base:
            i = next((k for k, (a, b) in enumerate(zip(base, path)) if a != b),
                     min(len(base), len(path)))
            where = reads[0].split(":", 1)[0] if reads else "<model>"
            fix = (f"leave the module that branches whole with ignore=({where!r},), or "
                   if where != "<model>" else "")
            raise PruneError(
                f"the forward of {type(model).__name__} branches on the values of its "
                f"inputs: it reads them into Python ({', '.join(reads[:3])}), and after {i} "
                f"ops alike the example inputs run {_op_text(base, i)} where {what} run "
                f"{_op_text(path, i)}. The channel graph follows one path only, so a model "
                f"shrunk on it could fail on the other; {fix}make the forward take one path "
                f"whatever the data")
    warnings.warn(_unchecked(reads, "perturbed inputs took the same path"), stacklevel=3)


def _op_text(path: list[tuple], i: int) -> str:
    if i >= len(path):
        return "nothing more"
    module, op, shapes = path[i]
    return f"aten.{op} in {module} (out {', '.join(str(list(s)) for s in shapes) or '-'})"


def _unchecked(reads: Sequence[str], why: str) -> str:
    return (f"the forward reads values computed from its inputs into Python "
            f"({', '.join(reads[:3])}); {why}: if it branches on them, paths the example "
            f"inputs did not take were not traced. Check the shrunk model on inputs of every "
            f"path, or pass such modules in ignore=...")


def _opaque(name: str, module: nn.Module, ignore: Sequence[str]) -> bool:
    if isinstance(module, OPAQUE_TYPES):
        return True
    return any(fnmatch.fnmatchcase(name, pat) or name == pat for pat in ignore)


def _disable_cache(model):
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "use_cache", None):
        cfg.use_cache = False
        return cfg
    return None


def _restore_cache(model, cfg):
    if cfg is not None:
        cfg.use_cache = True


def _collect(tr: _Tracer) -> DependencyGraph:
    n = tr.n_vars
    roots = tr.uf.find(torch.arange(n))

    def any_in_class(flag):
        return torch.zeros(n, dtype=torch.long).index_add_(0, roots, flag.long()) > 0

    bad, good, red = any_in_class(tr.frozen), any_in_class(tr.producer), any_in_class(tr.reduced)
    members = (roots != torch.arange(n)) | good[roots]  # in a class with someone, or producer
    ok = members & good[roots] & ~bad[roots]
    idx = ok.nonzero().flatten()
    if not idx.numel():
        return DependencyGraph([], tr.names, tr.frozen_reasons, tr.n_ops)
    r = roots[idx]
    order = torch.argsort(r, stable=True)
    idx, r = idx[order], r[order]
    which = torch.searchsorted(tr.starts, idx, right=True) - 1
    classes: dict[int, list[tuple[str, int, int]]] = {}
    readers: dict[int, list[tuple[str, int, int]]] = {}
    for v, root, w in zip(idx.tolist(), r.tolist(), which.tolist()):
        i, d, start = tr.ranges[w]
        classes.setdefault(root, []).append((tr.names[i], d, v - start))
        # an embedding tied to the LM head also produces the channel, and its gradient mixes
        # both uses: only weights that do nothing but read count as readers
        if tr.reader[v] and not tr.looked_up[v]:
            readers.setdefault(root, []).append(classes[root][-1])
    by_key: dict[tuple, ChannelGroup] = {}
    for root, slices in classes.items():
        key = tuple(sorted({(p, d) for p, d, _ in slices}))
        g = by_key.get(key)
        if g is None:
            g = by_key[key] = ChannelGroup(key, [], reduced=bool(red[root]))
        g.classes.append(ChannelClass(root, slices, readers.get(root, [])))
        g.reduced = g.reduced or bool(red[root])
    groups = [g for g in by_key.values() if len(g.classes) > 0]
    return DependencyGraph(groups, tr.names, tr.frozen_reasons, tr.n_ops)
