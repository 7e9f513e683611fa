"""Calibration: forward hooks that gather per-layer input statistics.

For every layer we keep, per weight group (grouped convs have several), the sum of input
rows' outer products H = X^T X (float64) and the number of rows. Convolutions see their
input unfolded into patches, so that W_2d @ patch is the layer's output. Wanda's input
feature norms are sqrt(diag(H)).

Two ways to run: `collect_stats` runs the whole model once with hooks on the chosen layers;
`Blockwise` walks a model block by block (SparseGPT's scheme): block k+1 sees the outputs of
block k after it was pruned, and only one block's statistics live at a time.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.batches import Batch, first_rows, run_batch, token_mask
from prunekit.errors import PruneError, all_finite
from prunekit.layers import groups_of, is_hf_conv1d


@dataclass
class LayerStats:
    """Input statistics of one layer: hessian[g] = sum of x x^T over input rows of group g.

    With `diagonal` only the sums of squares were gathered (methods that read no more than
    the input feature norms, such as Wanda): hessian is then (G, d), those sums, and the
    off-diagonal terms of X^T X are unknown, not zero; `matrix(g)` gives group g's H as the
    (d, d) matrix a method reads, built only while it is used (d x d float64 for every layer
    at once was 1 GB on SmolLM2)."""

    hessian: torch.Tensor  # (G, d, d) float64, or (G, d) with `diagonal`
    rows: int
    diagonal: bool = False

    @property
    def groups(self) -> int:
        return self.hessian.shape[0]

    def matrix(self, g: int) -> torch.Tensor:
        """Group g's H = X^T X, (d, d); the diagonal matrix of the sums of squares when only
        those were gathered."""
        return torch.diag(self.hessian[g]) if self.diagonal else self.hessian[g]

    def col_sq(self) -> torch.Tensor:
        """Sum of squares of each input feature, (G, d): the square of Wanda's feature norm."""
        return self.hessian if self.diagonal else torch.diagonal(self.hessian, dim1=1, dim2=2)


def _conv_padding(module: nn.Module, x: torch.Tensor, dims: int) -> torch.Tensor:
    """Pad x as the conv would, returning the padded input (so unfold needs no padding)."""
    k, d = module.kernel_size, module.dilation
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0,) * dims
            pairs = [(0, 0)] * dims
        else:  # "same" (stride 1 only, as PyTorch requires)
            pairs = []
            for i in range(dims):
                total = d[i] * (k[i] - 1)
                pairs.append((total // 2, total - total // 2))
    else:
        pairs = [(p, p) for p in pad]
    flat = []
    for left, right in reversed(pairs):
        flat += [left, right]
    if not any(flat):
        return x
    mode = module.padding_mode if module.padding_mode != "zeros" else "constant"
    return F.pad(x, flat, mode=mode)


def _reader(module: nn.Module) -> tuple:
    """What input_rows does with a layer's input: two layers with equal readers turn the same
    input into the same rows."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return (type(module), module.in_channels, module.kernel_size, module.stride,
                module.padding, module.dilation, module.padding_mode)
    if is_hf_conv1d(module):
        return ("conv1d", module.weight.shape[0])
    return ("linear", module.in_features)


def unfold_conv_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patches of a conv input as rows: (N*L, C_in*prod(k)) in the weight's memory order."""
    dims = len(module.kernel_size)
    if x.dim() == dims + 1:  # unbatched input
        x = x.unsqueeze(0)
    x = _conv_padding(module, x, dims)
    patches = x
    for i in range(dims):
        k, s, d = module.kernel_size[i], module.stride[i], module.dilation[i]
        patches = patches.unfold(2 + i, d * (k - 1) + 1, s)
        if d > 1:
            patches = patches[..., ::d]
    # patches: (N, C, L1..Ldims, k1..kdims) -> rows (N*L, C*k1*..*kdims)
    n, c = patches.shape[:2]
    spatial = patches.shape[2 : 2 + dims]
    perm = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    rows = patches.permute(perm).reshape(n * math.prod(spatial), -1)
    return rows


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows per group: (G, rows, d) such that out_g = rows_g @ W_g^T."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        rows = unfold_conv_input(module, x)
    elif is_hf_conv1d(module):
        rows = x.reshape(-1, module.weight.shape[0])
    else:
        rows = x.reshape(-1, module.in_features)
    g = groups_of(module)
    return rows.reshape(rows.shape[0], g, -1).transpose(0, 1)


class StatsCollector:
    """Hooks on a set of layers that accumulate LayerStats from every forward pass.

    While `mask` holds a (batch, tokens) mask, token-wise layers (linear, GPT-2 Conv1D) skip
    the rows of padding tokens: their hidden states are not data the model will see.
    """

    def __init__(self, layers: Mapping[str, nn.Module], diagonal: bool = False):
        self.layers = dict(layers)
        self.diagonal = diagonal  # gather only the sums of squares (d per layer, not d x d)
        self.stats: dict[str, LayerStats] = {}
        self.mask: torch.Tensor | None = None
        # the statistic of the last input seen, for the layers that read the same tensor
        # (q, k and v; gate and up): (input, its version, mask, how the layer reads it,
        # statistic, rows). The input is held, so no other tensor can take its place while
        # it is cached; the version counter sees a change made to it in place.
        self._last: tuple | None = None
        self._handles = [
            m.register_forward_pre_hook(self._hook(name)) for name, m in self.layers.items()
        ]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            reads = (_reader(module), groups_of(module))
            last = self._last
            if (last is not None and last[0] is x and last[1] == x._version
                    and last[2] is self.mask and last[3] == reads):
                h, n = last[4], last[5]  # a layer beside the last one, on the same input
            else:
                self._last = None
                h, n = self._statistic(name, module, x)
                self._last = (x, x._version, self.mask, reads, h, n)
            if name in self.stats:
                self.stats[name].hessian += h
                self.stats[name].rows += n
            else:
                self.stats[name] = LayerStats(h.clone(), n, self.diagonal)

        return hook

    def _statistic(self, name: str, module: nn.Module, x: torch.Tensor
                   ) -> tuple[torch.Tensor, int]:
        """(H = X^T X per group, or its diagonal; the number of rows) of one input."""
        x = x.detach()
        mask = self.mask
        if (mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape)
                and not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))):
            x = x[mask]
        if x.numel() == 0:
            raise PruneError(f"{name}: received an empty input during calibration")
        rows = input_rows(module, x.float())
        if self.diagonal:  # a float32 norm per column: 3x faster than squaring a float64 copy
            h = torch.linalg.vector_norm(rows, dim=1).double().square()  # (G, d)
        else:
            h = torch.matmul(rows.transpose(1, 2), rows).double()
        # a NaN or Inf anywhere in the input reaches the sums of squares (H's diagonal)
        if not all_finite(h if self.diagonal else torch.diagonal(h, dim1=1, dim2=2)):
            raise PruneError(
                f"{name}: its calibration input holds NaN or Inf (or values whose squares "
                f"overflow float32); check the calibration data and the layers before it"
            )
        return h, rows.shape[1]

    def result(self) -> dict[str, LayerStats]:
        """The statistics gathered."""
        self._last = None
        return self.stats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _forward(model: nn.Module, batches: Sequence[Batch], progress: Callable[[], None] | None,
             collector: StatsCollector | None = None):
    for i, batch in enumerate(batches):
        if collector is not None:
            collector.mask = token_mask(batch)
        try:
            run_batch(model, batch)
        except PruneError:
            raise
        except _StopForward:
            pass
        except Exception as e:  # a mis-shaped batch: say which one and why
            raise PruneError(f"calibration batch {i} could not run through the model: {e}") from e
        if progress:
            progress()


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Sequence[Batch],
    progress: Callable[[], None] | None = None,
    diagonal: bool = False,
) -> dict[str, LayerStats]:
    """Run every batch through the model once and return each layer's LayerStats (only their
    diagonals with `diagonal`)."""
    with StatsCollector(layers, diagonal) as col:
        _forward(model, batches, progress, col)
    missing = [n for n in layers if n not in col.stats]
    if missing:
        raise PruneError(f"layers never ran during calibration: {', '.join(missing[:5])}")
    return col.result()


class _StopForward(Exception):
    pass


def find_blocks(model: nn.Module, blocks: Sequence[str] | None = None
                ) -> list[tuple[str, nn.Module]]:
    """The chain of blocks for sequential calibration.

    With names or globs, the matching modules in registration order (nested matches are
    dropped). Without, the longest nn.ModuleList in the model (transformers' layer lists).
    """
    named = list(model.named_modules())
    if blocks:
        chosen = [(n, m) for n, m in named if n and any(fnmatch.fnmatchcase(n, p) for p in blocks)]
        chosen = [(n, m) for n, m in chosen
                  if not any(n.startswith(o + ".") for o, _ in chosen if o != n)]
        if not chosen:
            raise PruneError(f"no module matches blocks={list(blocks)}")
        return chosen
    lists = [(n, m) for n, m in named if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        raise PruneError(
            f"{type(model).__name__} has no nn.ModuleList of blocks; pass blocks=[...] with the "
            f"names or globs of the modules that run one after another (e.g. 'layer*.*')"
        )
    name, mod = max(lists, key=lambda nm: len(nm[1]))
    return [(f"{name}.{i}", b) for i, b in enumerate(mod)]


_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


def _is_cache(v) -> bool:
    return type(v).__name__.endswith("Cache") and hasattr(v, "update")


def _without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Drop key/value caches (transformers): a block rerun on cached inputs must not append
    to a cache shared with earlier runs."""
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: (None if k in _CACHE_KWARGS or _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor, block: str):
    if args:
        return (hidden, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    raise PruneError(f"block {block} takes no positional input to replace with the previous "
                     f"block's output; sequential calibration cannot chain it")


class Blockwise:
    """Block-by-block calibration: yields each stage's layers with their statistics.

    Stages are: layers that run before the first block, each block, then layers after the
    last block. The caller prunes a stage's layers before asking for the next stage, so the
    statistics of later stages are computed on the already-pruned model.
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module],
                 batches: Sequence[Batch], blocks: Sequence[str] | None = None,
                 diagonal: bool = False):
        self.model, self.layers, self.batches = model, dict(layers), list(batches)
        self.diagonal = diagonal
        self.blocks = find_blocks(model, blocks)
        self.block_layers = []
        taken = set()
        for bname, _ in self.blocks:
            inner = {n: m for n, m in self.layers.items() if n.startswith(bname + ".")}
            self.block_layers.append(inner)
            taken |= set(inner)
        self.outer = {n: m for n, m in self.layers.items() if n not in taken}

    @torch.no_grad()
    def _check_chained(self) -> None:
        """Each block's input must be the previous block's output: checked on the first two
        examples of the first batch, comparing each block's input with the output just before
        it and dropping that output at once (keeping every block's input and output of a
        whole batch took 2.3 GB on SmolLM2 with 32 x 512 tokens)."""
        called, last_out, bad = set(), {}, []
        handles = []
        for i, (_, b) in enumerate(self.blocks):
            def pre(mod, args, kwargs, i=i):
                if i in called:
                    return
                called.add(i)
                x = args[0] if args else kwargs.get("hidden_states")
                if i > 0:
                    a = last_out.pop(i - 1, None)
                    if a is None or x is None or a.shape != x.shape or not torch.allclose(a, x):
                        bad.append(i)

            def post(mod, args, out, i=i):
                if i not in last_out and i + 1 not in called:
                    last_out[i] = _first_output(out)
                if i == len(self.blocks) - 1:
                    raise _StopForward  # what follows (an LM head's logits) is not needed

            handles.append(b.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(b.register_forward_hook(post))
        try:
            _forward(self.model, [first_rows(self.batches[0])], None)
        finally:
            for h in handles:
                h.remove()
        bad += [i for i in range(1, len(self.blocks)) if i not in called]
        if bad:
            i = min(bad)
            raise PruneError(
                f"blocks {self.blocks[i - 1][0]} and {self.blocks[i][0]} are not chained "
                f"(the second's input is not the first's output); sequential calibration "
                f"needs blocks that run one after another: pass blocks=[...]"
            )

    @torch.no_grad()
    def _catch_block_inputs(self, collector_layers: Mapping[str, nn.Module]):
        inputs = []

        def catch(mod, args, kwargs):
            inputs.append(_without_cache(args, kwargs))
            raise _StopForward

        handle = self.blocks[0][1].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            with StatsCollector(collector_layers, self.diagonal) as col:
                _forward(self.model, self.batches, None, col)
        finally:
            handle.remove()
        return inputs, col.result()

    def stages(self, progress: Callable[[str], None] | None = None):
        """Yield (stage name, {layer: module}, {layer: LayerStats}); prune before continuing."""
        self._check_chained()
        inputs, pre_stats = self._catch_block_inputs(self.outer)
        if pre_stats:
            yield "before blocks", {n: self.outer[n] for n in pre_stats}, pre_stats
            inputs, _ = self._catch_block_inputs({})
        done = set(pre_stats)
        for (bname, block), layers in zip(self.blocks, self.block_layers):
            if progress:
                progress(bname)
            if layers:
                with StatsCollector(layers, self.diagonal) as col:
                    with torch.no_grad():
                        for (args, kwargs), batch in zip(inputs, self.batches):
                            col.mask = token_mask(batch)
                            block(*args, **kwargs)
                yield bname, layers, col.result()
                del col
            with torch.no_grad():
                inputs = [
                    _replace_hidden(args, kwargs, _first_output(block(*args, **kwargs)), bname)
                    for args, kwargs in inputs
                ]
        del inputs
        rest = {n: m for n, m in self.outer.items() if n not in done}
        if rest:
            stats = collect_stats(self.model, rest, self.batches, diagonal=self.diagonal)
            yield "after blocks", rest, stats
