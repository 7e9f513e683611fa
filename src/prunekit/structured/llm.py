"""Width and depth pruning of Llama-architecture causal LMs (SmolLM2, Llama 2/3 and models
built like them): the result is a smaller transformers model that plain
`AutoModelForCausalLM.from_pretrained` reloads when its widths are uniform.

Width, scored on calibration text by the size of what each unit adds to the residual stream
(the activation criteria of Minitron, Muralidharan et al. 2024, "Compact Language Models via
Pruning and Knowledge Distillation", and FLAP, An et al. 2024):
- a query head: the energy of its output after o_proj, sum_t ||W_o[:, h] a_h(t)||^2 (from
  the Gram matrix of its o_proj input, so one pass); a key/value head: the sum over the query
  heads it serves. Whole key/value groups go (`kv_heads`), or query heads inside the groups
  (`heads`), the same number from every group: every key/value head keeps serving as many
  query heads as the others, head_dim never changes, so the attention code (repeat_kv, SDPA's
  grouped-query path, the KV cache) runs as before;
- an MLP neuron: ||x_i|| * ||W_down[:, i]|| over the calibration tokens (gate, up and down
  together);
- a hidden (residual) channel: the energy of that channel at the output of every RMSNorm
  (Minitron's embedding-channel score); it is cut from the embedding (and the tied head),
  every norm, every projection that reads or writes the residual stream. RMSNorm then
  averages over fewer channels: the norms' weights are scaled by sqrt(d / d') and their eps
  by d / d', so the shrunk model computes exactly the model with those channels zeroed.

Depth: whole blocks, ranked by block influence, 1 - cos(block input, block output) averaged
over calibration tokens (ShortGPT, Men et al. 2024), or by the calibration perplexity of the
model without that one block (Shortened LLaMA, Kim et al. 2024). The block list, the blocks'
layer_idx (the KV cache's slot) and config.num_hidden_layers shrink together.

Importance (`LLMShrink.importance`; higher is kept, depth is ranked by `block_metric` alone):
- "activation" (the default): the energies above, from one forward pass with hooks.
- "taylor": first-order Taylor from the causal-LM loss on the calibration tokens (labels =
  inputs), per unit (sum over its gate slices of grad * weight)^2 per calibration batch,
  summed over batches (Molchanov et al. 2019, as structured.importance's `taylor`). The gate
  slices are those whose scaling by m scales the unit's contribution by m, so the sum is
  exactly dL/dm, the first-order loss change of removing the unit: a query head's o_proj
  columns; a key/value group's query heads' o_proj columns (k and v only feed them); an MLP
  neuron's down_proj column (its up_proj row gives the same sum, the gate row a different
  derivative, so adding them would count one removal twice or thrice); a hidden channel's
  writers, every o_proj and down_proj row c and the embedding's output at c (the channel is
  then zero in the residual stream, so what reads it adds nothing; the embedding is taken
  at its output, so a tied head's own use of the same weight is not counted). Gradients come
  from torch.autograd.grad in eval mode: the weights' .grad, requires_grad flags and
  train/eval modes are left as they were.
- "error": the one-shot output error of removing the unit alone, from the calibration Gram
  matrices G = X^T X of the layer that reads the unit (W: that layer's weight, B: the
  unit's input columns):
    without the refit   E = tr(W_B G_BB W_B^T)           (neuron i: ||W[:, i]||^2 G_ii)
    with the refit      E = tr(W_B [(G^-1)_BB]^-1 W_B^T) (neuron i: ||W[:, i]||^2 / [G^-1]_ii)
  the second is Optimal Brain Surgeon's cost: the least-squares residual of the layer's
  output when B is removed and the other columns refit (G damped as the refit damps it).
  Neurons read down_proj (refit form when reconstruct="all"), query heads and whole
  key/value groups the o_proj block of their columns (refit form when reconstruct is
  "attention" or "all"); without the refit the neuron and head errors are exactly the
  activation scores. A hidden channel's refit is not done (reconstruct refits o_proj and
  down_proj, not the readers of the residual stream), so its error is the no-refit one
  summed over every layer that reads it: q, k, v (input norm), gate, up (post-attention
  norm), lm_head (final norm), ||W[:, c]||^2 times that norm's output energy at c.

Per-block MLP widths (`mlp_allocation="dp"`): each kept block gets its own width, in
multiples of `round_to` (of DP_STEP = 64 when round_to is 1: SmolLM2's 1536 gives 24
choices) plus the width uniform `mlp_ratio` gives, such that the kept neurons, summed over the
blocks, are at most uniform's (every block's neuron carries the same parameters, so that is
the same parameter budget), minimising the summed scores of the neurons removed (the lowest
in each block, by the chosen importance). The DP is widths.py's, prunekit.budget.dp.solve,
in its exact integer mode; uniform's widths are among the choices, so the DP never removes
more importance than uniform.

The cut itself is structured.remove's (`remove_slices` on channel classes built from the known
Llama layout rather than traced: the layout is checked module by module first).
Recovery by distillation lives in structured.distill.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, get_args, get_type_hints

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.batches import as_batches, output_tensor, run_batch
from prunekit.config import Config
from prunekit.errors import PruneError
from prunekit.progress import Progress
from prunekit.structured.graph import ChannelClass
from prunekit.structured.measure import count_params, modes_restored
from prunekit.structured.remove import copy_model, remove_slices

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class LLMShrink(Config):
    """What to remove from a Llama-architecture causal LM (counts and fractions KEPT).

    `heads`: query heads kept per layer, a multiple of the key/value heads kept (every
    key/value head serves the same number of query heads); `kv_heads`: key/value heads kept
    per layer (whole groups with their query heads; heads defaults to the same group size).
    `mlp_ratio`: fraction of MLP neurons kept in every layer, or `mlp_per_layer` one fraction
    per block (then the widths differ and the model saves in prunekit's format).
    `hidden_ratio`: fraction of the hidden (residual) channels kept. `drop_blocks`: whole
    blocks removed, the lowest by `block_metric` ("influence": 1 - cos(in, out);
    "perplexity": calibration perplexity without the block, one forward per block). Kept
    widths are rounded up to multiples of `round_to`. `reconstruct`: refit o_proj
    ("attention") or o_proj and down_proj ("all") on the heads and neurons kept, by least
    squares against the dense layer's output on the calibration tokens (as ZipLM and SlimGPT
    do; `damp` adds that fraction of the mean diagonal to the Gram matrix); "none" leaves the
    kept weights as they are, so the model equals the original with the removed units
    zeroed. The refit needs many more calibration tokens than the layer has inputs: on
    SmolLM2 (MLP 1536 wide) keeping 1024 neurons, perplexity went 46.2 -> 40.0 with the
    refit on 64 x 256 tokens but 48.4 -> 52.3 on 16 x 256; shrink_llm warns below 8 tokens
    per input.
    `importance`: how heads, groups, neurons and hidden channels are scored ("activation",
    "taylor", "error"; the module docstring has the formulas). `mlp_allocation`: "uniform"
    (mlp_ratio in every block) or "dp" (per-block widths whose kept MLP parameters are at
    most uniform mlp_ratio's, chosen by the DP to remove the least summed importance).
    """

    name: ClassVar[str] = "llmshrink"

    heads: int | None = None
    kv_heads: int | None = None
    mlp_ratio: float = 1.0
    mlp_per_layer: tuple[float, ...] | None = None
    hidden_ratio: float = 1.0
    drop_blocks: int = 0
    block_metric: Literal["influence", "perplexity"] = "influence"
    round_to: int = 1
    reconstruct: Literal["none", "attention", "all"] = "all"
    damp: float = 0.01
    importance: Literal["activation", "taylor", "error"] = "activation"
    mlp_allocation: Literal["uniform", "dp"] = "uniform"

    def check(self) -> None:
        for k in ("mlp_ratio", "hidden_ratio"):
            v = getattr(self, k)
            if not 0 < v <= 1:
                raise PruneError(f"LLMShrink.{k}={v} must be in (0, 1]: it is the fraction "
                                 f"kept")
        for i, v in enumerate(self.mlp_per_layer or ()):
            if not 0 < v <= 1:
                raise PruneError(f"LLMShrink.mlp_per_layer[{i}]={v} must be in (0, 1]")
        for k in ("heads", "kv_heads"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise PruneError(f"LLMShrink.{k}={v} must be at least 1 (to remove a whole "
                                 f"attention, drop the block instead: drop_blocks)")
        if self.drop_blocks < 0:
            raise PruneError(f"LLMShrink.drop_blocks={self.drop_blocks} must be >= 0")
        if self.round_to < 1:
            raise PruneError(f"LLMShrink.round_to={self.round_to} must be at least 1")
        if not self.damp >= 0:
            raise PruneError(f"LLMShrink.damp={self.damp} must be >= 0")
        if self.mlp_allocation == "dp" and self.mlp_per_layer is not None:
            raise PruneError("LLMShrink.mlp_allocation='dp' chooses the per-block MLP widths "
                             "itself: give the budget as mlp_ratio, not mlp_per_layer")
        if self.mlp_allocation == "dp" and self.mlp_ratio >= 1:
            raise PruneError(f"LLMShrink.mlp_allocation='dp' spreads an MLP cut over the "
                             f"blocks: it needs mlp_ratio < 1 (the fraction of MLP parameters "
                             f"kept), got {self.mlp_ratio}")


#: the importance criteria LLMShrink takes (its Literal; the CLI's choices)
IMPORTANCES: tuple[str, ...] = get_args(get_type_hints(LLMShrink)["importance"])


# -- the layout ------------------------------------------------------------------------------

def llama_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-architecture causal LM, after checking every module this
    file cuts; a PruneError names the first module that does not fit and the way out."""
    what = type(model).__name__
    out = ("structured.llm prunes Llama-architecture causal LMs; use "
           "prunekit.structured.shrink (the traced graph) for other models")
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise PruneError(f"{what} has no block list model.layers; {out}")
    embed = getattr(decoder, "embed_tokens", None)
    if not isinstance(embed, nn.Embedding):
        raise PruneError(f"{what}: model.embed_tokens is not an nn.Embedding; {out}")
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or head.in_features != embed.embedding_dim:
        raise PruneError(f"{what}: lm_head is not a Linear reading the hidden size; {out}")
    d = embed.embedding_dim
    _check_norm(getattr(decoder, "norm", None), "model.norm", d, out)
    for i, layer in enumerate(layers):
        at = f"model.layers.{i}"
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        for part, names in (("self_attn", _ATTN), ("mlp", _MLP)):
            mod = attn if part == "self_attn" else mlp
            for n in names:
                if not isinstance(getattr(mod, n, None), nn.Linear):
                    raise PruneError(f"{at}.{part}.{n} is missing or not an nn.Linear; {out}")
        for n in _NORMS:
            _check_norm(getattr(layer, n, None), f"{at}.{n}", d, out)
        hd = getattr(attn, "head_dim", None)
        q, k, v, o = (getattr(attn, n) for n in _ATTN)
        if not isinstance(hd, int) or q.out_features % hd or k.out_features % hd:
            raise PruneError(f"{at}.self_attn: q_proj ({q.out_features}) and k_proj "
                             f"({k.out_features}) outputs are not whole heads of head_dim "
                             f"{hd}; {out}")
        if k.out_features != v.out_features or (q.out_features // hd) % (k.out_features // hd):
            raise PruneError(f"{at}.self_attn: {q.out_features // hd} query heads cannot be "
                             f"split evenly over {k.out_features // hd} key/value heads")
        if o.in_features != q.out_features or q.in_features != d or o.out_features != d:
            raise PruneError(f"{at}.self_attn: o_proj/q_proj shapes do not match the "
                             f"hidden size {d}; {out}")
        if mlp.down_proj.in_features != mlp.up_proj.out_features:
            raise PruneError(f"{at}.mlp: down_proj reads {mlp.down_proj.in_features}, "
                             f"up_proj gives {mlp.up_proj.out_features}")
    return layers


def _check_norm(norm, at: str, d: int, out: str) -> None:
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (d,) or \
            not isinstance(getattr(norm, "variance_epsilon", None), float) or \
            getattr(norm, "bias", None) is not None:
        raise PruneError(f"{at} is not an RMSNorm with a weight of the hidden size {d} "
                         f"({type(norm).__name__}); {out}")


def _heads(layer) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of one block."""
    a = layer.self_attn
    return a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim, a.head_dim


# -- calibration statistics ------------------------------------------------------------------

@dataclass
class LLMStats:
    """What one calibration pass measures (per block, in block order)."""

    head: list[torch.Tensor]  # (query heads,) output energy after o_proj
    neuron: list[torch.Tensor]  # (MLP width,) ||x_i||^2 ||W_down[:, i]||^2
    hidden: torch.Tensor  # (hidden,) energy at every RMSNorm output, summed
    influence: list[float]  # 1 - mean cos(block input, block output)
    tokens: int
    o_gram: list[torch.Tensor] | None = None  # X^T X of o_proj's input (grams=True)
    down_gram: list[torch.Tensor] | None = None  # X^T X of down_proj's input
    # (hidden,) energy at each RMSNorm's output: block i's input and post-attention norms
    # at 2i and 2i + 1, the final norm last (their sum is `hidden`)
    norm_energy: list[torch.Tensor] = field(default_factory=list)
    taylor: UnitScores | None = None  # importance="taylor" (taylor=True, or on first use)


@dataclass
class UnitScores:
    """One criterion's score of every unit (higher is kept), per block in block order."""

    head: list[torch.Tensor]  # (query heads,)
    group: list[torch.Tensor]  # (key/value heads,): the group with all its query heads
    neuron: list[torch.Tensor]  # (MLP width,)
    hidden: torch.Tensor  # (hidden,)


@torch.no_grad()
def collect_stats(model: nn.Module, calib, progress: bool = False,
                  grams: bool = True, taylor: bool = False) -> LLMStats:
    """One pass over the calibration batches with hooks (nothing is kept but sums; with
    `grams`, the Gram matrices of every o_proj and down_proj input, for reconstruct and
    importance="error"); with `taylor`, also the gradient pass of importance="taylor"."""
    layers = llama_layers(model)
    n = len(layers)
    gram = [None] * n
    sq = [None] * n
    o_full = [None] * n
    d_full = [None] * n
    energy = [None] * (2 * n + 1)
    infl = [0.0] * n
    tokens = 0
    hooks = []

    def o_in(i, hd):
        def hook(m, args):
            x = args[0].detach().double().reshape(-1, m.in_features)
            if grams:
                o_full[i] = x.T @ x if o_full[i] is None else o_full[i] + x.T @ x
                return
            x = x.reshape(len(x), -1, hd)
            g = torch.einsum("nhi,nhj->hij", x, x)
            gram[i] = g if gram[i] is None else gram[i] + g
        return hook

    def down_in(i):
        def hook(m, args):
            x = args[0].detach().double().reshape(-1, m.in_features)
            if grams:
                d_full[i] = x.T @ x if d_full[i] is None else d_full[i] + x.T @ x
                return
            s = x.pow(2).sum(0)
            sq[i] = s if sq[i] is None else sq[i] + s
        return hook

    def norm_out(k):
        def hook(m, args, out):
            s = out.detach().double().reshape(-1, out.shape[-1]).pow(2).sum(0)
            energy[k] = s if energy[k] is None else energy[k] + s
        return hook

    def block(i):
        def hook(m, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, (tuple, list)) else out
            cos = F.cosine_similarity(x.float().reshape(-1, x.shape[-1]),
                                      y.float().reshape(-1, y.shape[-1]), dim=-1)
            infl[i] += float((1 - cos).double().sum())
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            o_in(i, layer.self_attn.head_dim)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(down_in(i)))
        for j, nm in enumerate(_NORMS):
            hooks.append(getattr(layer, nm).register_forward_hook(norm_out(2 * i + j)))
        hooks.append(layer.register_forward_hook(block(i), with_kwargs=True))
    hooks.append(model.model.norm.register_forward_hook(norm_out(2 * n)))
    batches = list(as_batches(calib))
    if not batches:
        raise PruneError("structured.llm needs calibration batches (token ids) to score heads, "
                         "neurons, channels and blocks; got none")
    was = model.training
    model.eval()
    try:
        with Progress(enabled=progress) as bar:
            task = bar.add("calibration", total=len(batches))
            for b in batches:
                ids = b["input_ids"] if isinstance(b, dict) else b
                tokens += ids.numel()
                run_batch(model, _no_cache(b))
                bar.advance(task)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    heads = []
    for i, layer in enumerate(layers):
        w = layer.self_attn.o_proj.weight.detach().double()  # (d, H * hd)
        hq, _, hd = _heads(layer)
        if grams:  # the per-head blocks of the diagonal, and the diagonal
            g = o_full[i].reshape(hq, hd, hq, hd)
            gram[i] = torch.stack([g[h, :, h] for h in range(hq)])
            sq[i] = torch.diagonal(d_full[i])
        wh = w.reshape(w.shape[0], hq, hd).permute(1, 0, 2)  # (H, d, hd)
        heads.append(torch.einsum("hdi,hij,hdj->h", wh, gram[i], wh).float())
    neurons = [sq[i] * layer.mlp.down_proj.weight.detach().double().pow(2).sum(0)
               for i, layer in enumerate(layers)]
    return LLMStats(head=heads, neuron=[s.float() for s in neurons],
                    hidden=sum(energy).float(),
                    influence=[v / max(tokens, 1) for v in infl], tokens=tokens,
                    o_gram=o_full if grams else None, down_gram=d_full if grams else None,
                    norm_energy=energy,
                    taylor=taylor_scores(model, batches, progress) if taylor else None)


def _no_cache(batch):
    return {**batch, "use_cache": False} if isinstance(batch, dict) else \
        {"input_ids": batch, "use_cache": False}


def taylor_scores(model: nn.Module, calib, progress: bool = False,
                  micro_batch: int = 4) -> UnitScores:
    """First-order Taylor importance (gate form, module docstring) of every query head,
    key/value group, MLP neuron and hidden channel: per calibration batch, the sum of
    grad * weight over the unit's gate slices, squared; summed over batches. The loss is the
    batch's mean next-token cross-entropy (labels = inputs), its gradient accumulated over
    pieces of `micro_batch` sequences (the same sum, less memory). Uses torch.autograd.grad,
    so no .grad is written; requires_grad flags and every module's mode are restored."""
    layers = llama_layers(model)
    batches = [_no_cache(b) for b in as_batches(calib)]
    if not batches:
        raise PruneError("importance='taylor' needs calibration batches (token ids); got none")
    if micro_batch < 1:
        raise PruneError(f"micro_batch={micro_batch} must be at least 1")
    o_w = [b.self_attn.o_proj.weight for b in layers]
    down_w = [b.mlp.down_proj.weight for b in layers]
    weights = o_w + down_w
    shapes = [_heads(b) for b in layers]
    d = model.model.embed_tokens.embedding_dim
    head = [torch.zeros(hq, dtype=torch.float64) for hq, _, _ in shapes]
    group = [torch.zeros(hkv, dtype=torch.float64) for _, hkv, _ in shapes]
    neuron = [torch.zeros(w.shape[1], dtype=torch.float64) for w in down_w]
    hidden = torch.zeros(d, dtype=torch.float64)
    embedded = []

    def leaf(m, args, out):  # the embedding's output as a leaf: its own gradient, nothing else
        out = out.detach().requires_grad_(True)
        embedded.append(out)
        return out

    flags = [(p, p.requires_grad) for p in model.parameters()]
    hook = model.model.embed_tokens.register_forward_hook(leaf)
    try:
        with modes_restored(model), torch.enable_grad(), Progress(enabled=progress) as bar:
            model.eval()
            for p, _ in flags:  # gradients for the weights scored, none kept for the others
                p.requires_grad_(False)
            for w in weights:
                w.requires_grad_(True)
            task = bar.add("Taylor: gradients", total=len(batches))
            for b in batches:
                grads = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
                emb = torch.zeros(d, dtype=torch.float64)
                count = _targets(b)[1].sum()
                for piece in _pieces(b, micro_batch):
                    embedded.clear()
                    logits = output_tensor(run_batch(model, piece))[:, :-1].float()
                    labels, valid = _targets(piece)
                    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          labels.reshape(-1), reduction="none")
                    loss = (nll * valid.reshape(-1)).sum() / count
                    got = torch.autograd.grad(loss, weights + embedded[:1], allow_unused=True)
                    for acc, g in zip(grads, got):
                        if g is not None:
                            acc += g.double()
                    x, g = embedded[0], got[-1]
                    if g is not None:
                        emb += (x.detach().double() * g.double()).reshape(-1, d).sum(0)
                wire = emb
                for i, (hq, hkv, hd) in enumerate(shapes):
                    go = grads[i] * o_w[i].detach().double()  # (d, hq * hd)
                    per_head = go.sum(0).reshape(hq, hd).sum(1)
                    head[i] += per_head.pow(2)
                    group[i] += per_head.reshape(hkv, hq // hkv).sum(1).pow(2)
                    gd = grads[len(layers) + i] * down_w[i].detach().double()
                    neuron[i] += gd.sum(0).pow(2)
                    wire = wire + go.sum(1) + gd.sum(1)
                hidden += wire.pow(2)
                bar.advance(task)
    finally:
        hook.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return UnitScores([h.float() for h in head], [g.float() for g in group],
                      [v.float() for v in neuron], hidden.float())


def _targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token labels, 1.0 where counted): positions 1.. of input_ids, masked padding."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    valid = torch.ones_like(ids[:, 1:], dtype=torch.float32) if mask is None else \
        mask[:, 1:].float()
    return ids[:, 1:], valid


def _pieces(batch: dict, size: int) -> list[dict]:
    n = batch["input_ids"].shape[0]
    return [{k: v[s:s + size] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v
             for k, v in batch.items()} for s in range(0, n, size)]


def _damped(g: torch.Tensor, damp: float) -> torch.Tensor:
    """G + (damp * mean diagonal + 1e-12) I: the Gram matrix the refit and its cost solve."""
    return g + torch.eye(len(g), dtype=g.dtype) * (
        damp * float(torch.diagonal(g).mean()) + 1e-12)


@torch.no_grad()
def removal_error(weight: torch.Tensor, gram: torch.Tensor, size: int = 1,
                  refit: bool = False, damp: float = 0.0) -> torch.Tensor:
    """One-shot output error of removing each block of `size` consecutive input columns of a
    linear layer alone, from the Gram matrix G = X^T X of its inputs: tr(W_B G_BB W_B^T)
    without the refit, tr(W_B [(G^-1)_BB]^-1 W_B^T) with the least-squares refit of the
    other columns (OBS; G damped as _damped says). Returns (in_features // size,)."""
    w = weight.detach().double()
    n = w.shape[1] // size
    wb = w.reshape(w.shape[0], n, size).permute(1, 0, 2)  # (n, out, size)
    g = gram.double()
    if refit:
        chol, info = torch.linalg.cholesky_ex(_damped(g, damp))
        if info:
            raise PruneError(f"the refit's Gram matrix ({len(g)} inputs) is singular: fewer "
                             f"calibration tokens than inputs, or dead inputs; give damp > 0 "
                             f"(got {damp}) or more calibration text")
        g = torch.cholesky_inverse(chol)
    blocks = g.reshape(n, size, n, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    if refit:
        blocks = torch.linalg.inv(blocks)
    return torch.einsum("nos,nst,not->n", wb, blocks, wb)


@torch.no_grad()
def block_perplexity_cost(model: nn.Module, calib) -> list[float]:
    """Calibration perplexity of the model with each block left out, one block at a time."""
    layers = llama_layers(model)
    batches = list(as_batches(calib))
    decoder = model.model
    costs = []
    try:
        for i in range(len(layers)):
            decoder.layers = nn.ModuleList([b for j, b in enumerate(layers) if j != i])
            nll = count = 0.0
            for b in batches:
                ids = b["input_ids"] if isinstance(b, dict) else b
                logits = output_tensor(run_batch(model, _no_cache(b)))[:, :-1].float()
                nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1), reduction="sum"))
                count += ids[:, 1:].numel()
            costs.append(math.exp(nll / count))
    finally:
        decoder.layers = layers
    return costs


# -- the plan ---------------------------------------------------------------------------------

@dataclass
class LLMPlan:
    """What stays, in the original model's numbering: the kept blocks, per kept block the
    kept query heads, key/value heads and MLP neurons, and the kept hidden channels."""

    blocks: list[int]
    heads: dict[int, list[int]]
    kv_heads: dict[int, list[int]]
    neurons: dict[int, list[int]]
    hidden: list[int]
    block_scores: list[float] = field(default_factory=list)

    def uniform(self) -> bool:
        """Every kept block has the same widths (a plain transformers config can hold it)."""
        return all(len({len(v[b]) for b in self.blocks}) <= 1
                   for v in (self.heads, self.kv_heads, self.neurons))


def _round_up(x: float, to: int, most: int) -> int:
    return min(most, max(to, int(math.ceil(x / to - 1e-9)) * to))


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores, k).indices.tolist())


def unit_scores(model: nn.Module, config: LLMShrink, stats: LLMStats) -> UnitScores:
    """The scores config.importance ranks heads, groups, neurons and hidden channels by."""
    layers = llama_layers(model)
    if config.importance == "activation":
        return UnitScores(stats.head, [h.reshape(_heads(b)[1], -1).sum(1)
                                       for h, b in zip(stats.head, layers)],
                          stats.neuron, stats.hidden)
    if config.importance == "taylor":
        if stats.taylor is None:
            raise PruneError("LLMShrink.importance='taylor' needs the gradient pass: "
                             "collect_stats(..., taylor=True) (shrink_llm runs it)")
        return stats.taylor
    if stats.o_gram is None or not stats.norm_energy:
        raise PruneError("LLMShrink.importance='error' reads the Gram matrices: "
                         "collect_stats(..., grams=True) (shrink_llm collects them)")
    heads, groups, neurons = [], [], []
    attn_refit, mlp_refit = config.reconstruct != "none", config.reconstruct == "all"
    hidden = torch.zeros_like(stats.norm_energy[0])

    def reads(e, *lins):  # what zeroing input channel c takes from these layers' outputs
        return e * sum(lin.weight.detach().double().pow(2).sum(0) for lin in lins)

    for i, b in enumerate(layers):
        a, m = b.self_attn, b.mlp
        hq, hkv, hd = _heads(b)
        heads.append(removal_error(a.o_proj.weight, stats.o_gram[i], hd, attn_refit,
                                   config.damp).float())
        groups.append(removal_error(a.o_proj.weight, stats.o_gram[i], hd * hq // hkv,
                                    attn_refit, config.damp).float())
        neurons.append(removal_error(m.down_proj.weight, stats.down_gram[i], 1, mlp_refit,
                                     config.damp).float())
        hidden += reads(stats.norm_energy[2 * i], a.q_proj, a.k_proj, a.v_proj) + \
            reads(stats.norm_energy[2 * i + 1], m.gate_proj, m.up_proj)
    hidden += reads(stats.norm_energy[-1], model.lm_head)
    return UnitScores(heads, groups, neurons, hidden.float())


#: the width step of mlp_allocation="dp" when round_to is 1
DP_STEP = 64


def mlp_widths(neuron: list[torch.Tensor], ratio: float, round_to: int = 1) -> list[int]:
    """Kept MLP width per block (the blocks of `neuron`, each its neurons' scores) with the
    summed kept width at most uniform `ratio`'s, minimising the summed scores removed (the
    lowest in each block). Choices per block: the full width, the multiples of round_to (of
    DP_STEP when round_to is 1) below it, and uniform's width; solved exactly by
    prunekit.budget.dp.solve (costs in kept neurons, every neuron the same parameters)."""
    from prunekit.budget.dp import solve

    full = [len(s) for s in neuron]
    uniform = [_round_up(ratio * w, round_to, w) for w in full]
    step = round_to if round_to > 1 else DP_STEP
    choices = [sorted({w, u, *range(step, w, step)}, reverse=True)
               for w, u in zip(full, uniform)]
    errors = []
    for s, ws in zip(neuron, choices):
        low = torch.cat([torch.zeros(1, dtype=torch.float64),
                         torch.sort(s.double()).values.cumsum(0)])
        errors.append([float(low[len(s) - w]) for w in ws])  # the len(s) - w lowest go
    unit = math.gcd(*(w for ws in choices for w in ws), sum(uniform))
    levels = max(len(ws) for ws in choices)
    err = np.full((len(full), levels), np.inf)
    cost = np.zeros((len(full), levels))
    for i, (ws, e) in enumerate(zip(choices, errors)):
        err[i, :len(ws)] = e
        cost[i, :len(ws)] = [w // unit for w in ws]
    pick = solve(err, cost, sum(uniform) // unit, resolution=None)
    return [ws[k] for ws, k in zip(choices, pick)]


def plan_llm(model: nn.Module, config: LLMShrink, stats: LLMStats,
             block_scores: list[float] | None = None) -> LLMPlan:
    """Choose what stays (refusing a config the model cannot hold before any work)."""
    layers = llama_layers(model)
    n = len(layers)
    check_config(model, config)
    scores = block_scores if block_scores is not None else stats.influence
    if config.block_metric == "perplexity" and block_scores is None and config.drop_blocks:
        raise PruneError("block_metric='perplexity' needs block_scores= from "
                         "block_perplexity_cost (shrink_llm computes them)")
    # influence: a low value changes the stream least; perplexity without the block: a low
    # value hurts least. Either way the lowest go.
    order = sorted(range(n), key=lambda i: scores[i])
    dropped = set(order[:config.drop_blocks])
    blocks = [i for i in range(n) if i not in dropped]
    u = unit_scores(model, config, stats)
    if config.mlp_allocation == "dp":
        widths = dict(zip(blocks, mlp_widths([u.neuron[i] for i in blocks], config.mlp_ratio,
                                             config.round_to)))
    heads, kvs, neurons = {}, {}, {}
    for i in blocks:
        hq, hkv, _ = _heads(layers[i])
        group = hq // hkv
        kv_keep = config.kv_heads or hkv
        per = (config.heads // kv_keep) if config.heads else group
        s = u.head[i].reshape(hkv, group)
        kv = _top(u.group[i], kv_keep)
        kvs[i] = kv
        heads[i] = [g * group + j for g in kv for j in _top(s[g], per)]
        width = layers[i].mlp.down_proj.in_features
        ratio = config.mlp_per_layer[i] if config.mlp_per_layer else config.mlp_ratio
        neurons[i] = _top(u.neuron[i], widths[i] if config.mlp_allocation == "dp" else
                          _round_up(ratio * width, config.round_to, width))
    d = model.model.embed_tokens.embedding_dim
    hidden = _top(u.hidden, _round_up(config.hidden_ratio * d, config.round_to, d))
    return LLMPlan(blocks, heads, kvs, neurons, hidden, list(scores))


def check_config(model: nn.Module, config: LLMShrink) -> None:
    """Refuse what the model's attention or depth cannot hold, naming the module."""
    layers = llama_layers(model)
    n = len(layers)
    if config.drop_blocks >= n:
        raise PruneError(f"drop_blocks={config.drop_blocks} would remove every one of the {n} "
                         f"blocks of model.layers; keep at least one (drop_blocks <= {n - 1})")
    if config.mlp_per_layer is not None and len(config.mlp_per_layer) != n:
        raise PruneError(f"mlp_per_layer has {len(config.mlp_per_layer)} fractions for the "
                         f"{n} blocks of model.layers; give one per block")
    for i, layer in enumerate(layers):
        hq, hkv, hd = _heads(layer)
        at = f"model.layers.{i}.self_attn"
        kv_keep = config.kv_heads or hkv
        if kv_keep > hkv:
            raise PruneError(f"{at} has {hkv} key/value heads; kv_heads={kv_keep} cannot keep "
                             f"more (1..{hkv})")
        if config.heads is not None:
            group = hq // hkv
            if config.heads % kv_keep or not 0 < config.heads // kv_keep <= group:
                ok = [kv_keep * j for j in range(1, group + 1)]
                raise PruneError(
                    f"{at}: heads={config.heads} with {kv_keep} key/value heads kept breaks "
                    f"grouped-query attention: every key/value head serves the same number "
                    f"of query heads (at most {group}, head_dim {hd} unchanged), so heads must "
                    f"be one of {ok}; or change kv_heads")


# -- the cut -----------------------------------------------------------------------------------

def _classes(model: nn.Module, plan: LLMPlan) -> list[ChannelClass]:
    """Channel classes (structured.graph's unit) for everything the plan removes."""
    layers = model.model.layers
    names = {id(m): n for n, m in model.named_modules()}
    out: list[ChannelClass] = []

    def add(slices, readers):
        out.append(ChannelClass(len(out), slices, readers))

    def rows(lin, idx, dim):  # weight slices along dim, and the bias when it is cut
        p = names[id(lin)]
        s = [(f"{p}.weight", dim, j) for j in idx]
        if dim == 0 and lin.bias is not None:
            s += [(f"{p}.bias", 0, j) for j in idx]
        return s

    for i in plan.blocks:
        a, m = layers[i].self_attn, layers[i].mlp
        hq, hkv, hd = _heads(layers[i])
        group = hq // hkv
        heads, kvs = set(plan.heads[i]), set(plan.kv_heads[i])
        for h in range(hq):
            if h not in heads:
                r = range(h * hd, (h + 1) * hd)
                add(rows(a.q_proj, r, 0) + rows(a.o_proj, r, 1), rows(a.o_proj, r, 1))
        for g in range(hkv):
            if g not in kvs:
                r = range(g * hd, (g + 1) * hd)
                add(rows(a.k_proj, r, 0) + rows(a.v_proj, r, 0), [])
                assert not heads & set(range(g * group, (g + 1) * group))
        keep = set(plan.neurons[i])
        for j in range(m.down_proj.in_features):
            if j not in keep:
                add(rows(m.gate_proj, [j], 0) + rows(m.up_proj, [j], 0) +
                    rows(m.down_proj, [j], 1), rows(m.down_proj, [j], 1))
    d = model.model.embed_tokens.embedding_dim
    keep = set(plan.hidden)
    readers = [model.lm_head] + [getattr(layers[i].self_attn, n) for i in plan.blocks
                                 for n in _ATTN[:3]] + \
        [getattr(layers[i].mlp, n) for i in plan.blocks for n in _MLP[:2]]
    writers = [layers[i].self_attn.o_proj for i in plan.blocks] + \
        [layers[i].mlp.down_proj for i in plan.blocks]
    norms = [getattr(layers[i], n) for i in plan.blocks for n in _NORMS] + [model.model.norm]
    embed = names[id(model.model.embed_tokens)]
    for c in range(d):
        if c in keep:
            continue
        r = [c]
        read = [s for lin in readers for s in rows(lin, r, 1)]
        add([(f"{embed}.weight", 1, c)] + read + [s for lin in writers for s in rows(lin, r, 0)]
            + [(f"{names[id(nm)]}.weight", 0, c) for nm in norms], read)
    return out


def apply_plan(model: nn.Module, plan: LLMPlan) -> nn.Module:
    """A smaller copy of `model` holding what the plan keeps (the input is not modified)."""
    layers = llama_layers(model)
    d = model.model.embed_tokens.embedding_dim
    small = remove_slices(model, _classes(model, plan)) if _cuts(model, plan) else \
        copy_model(model)
    small.model.layers = nn.ModuleList([small.model.layers[i] for i in plan.blocks])
    for j, layer in enumerate(small.model.layers):
        layer.self_attn.layer_idx = j
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = j
    d2 = len(plan.hidden)
    if d2 != d:  # RMSNorm now averages over d2 channels: make it compute what it did on d
        with torch.no_grad():
            for norm in [small.model.norm] + [getattr(b, n) for b in small.model.layers
                                              for n in _NORMS]:
                norm.weight.mul_(math.sqrt(d / d2))
                norm.variance_epsilon = norm.variance_epsilon * d / d2
    _update_config(small, plan, layers)
    small.tokenizer = getattr(model, "tokenizer", None)
    return small


@torch.no_grad()
def reconstruct(dense: nn.Module, small: nn.Module, plan: LLMPlan, stats: LLMStats,
                damp: float = 0.01, mlp: bool = True) -> None:
    """Refit every kept block's o_proj and (mlp=True) down_proj in `small` on the inputs
    they keep:
    W' = W G[:, K] (G[K, K] + damp * mean diag)^-1, the least-squares fit of the dense
    layer's output W X from the kept rows X_K, with G = X X^T from the calibration tokens;
    the rows are then cut to the kept hidden channels."""
    rows = torch.as_tensor(plan.hidden)
    warned = False
    for j, i in enumerate(plan.blocks):
        old, new = dense.model.layers[i], small.model.layers[j]
        hd = old.self_attn.head_dim
        cols = torch.as_tensor([h * hd + t for h in plan.heads[i] for t in range(hd)])
        for lin, big, g, keep in ((new.self_attn.o_proj, old.self_attn.o_proj,
                                   stats.o_gram[i], cols),
                                  (new.mlp.down_proj, old.mlp.down_proj, stats.down_gram[i],
                                   torch.as_tensor(plan.neurons[i]))):
            if len(keep) == big.in_features or (lin is new.mlp.down_proj and not mlp):
                continue
            if stats.tokens < 8 * big.in_features and not warned:
                warned = True
                warnings.warn(f"the refit of model.layers.{i} fits layers of "
                              f"{big.in_features} inputs on {stats.tokens} calibration tokens; "
                              f"with fewer than {8 * big.in_features} it overfits them and may "
                              f"raise perplexity: give more calibration text or "
                              f"reconstruct='none'", stacklevel=3)
            gk = _damped(g[keep][:, keep], damp)
            w = big.weight.double()
            fit = torch.linalg.solve(gk, (w @ g[:, keep]).T).T  # (d, |K|): gk symmetric
            lin.weight.copy_(fit[rows].to(lin.weight.dtype))


def _cuts(model, plan: LLMPlan) -> bool:
    layers = model.model.layers
    return len(plan.hidden) < model.model.embed_tokens.embedding_dim or any(
        len(plan.heads[i]) < _heads(layers[i])[0] or
        len(plan.kv_heads[i]) < _heads(layers[i])[1] or
        len(plan.neurons[i]) < layers[i].mlp.down_proj.in_features for i in plan.blocks)


def _update_config(small: nn.Module, plan: LLMPlan, old_layers) -> None:
    cfg = getattr(small, "config", None)
    if cfg is None:
        return
    first = small.model.layers[0]
    hq, hkv, hd = _heads(first)
    d_old = old_layers[0].self_attn.q_proj.in_features
    d = len(plan.hidden)
    cfg.head_dim = hd  # explicit: hidden_size // heads no longer gives it
    cfg.num_attention_heads = hq
    cfg.num_key_value_heads = hkv
    cfg.intermediate_size = max(b.mlp.down_proj.in_features for b in small.model.layers)
    cfg.hidden_size = d
    if d != d_old:
        cfg.rms_norm_eps = small.model.norm.variance_epsilon
    cfg.num_hidden_layers = len(plan.blocks)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in plan.blocks]


# -- the entry point ---------------------------------------------------------------------------

@dataclass
class LLMShrinkReport:
    """Sizes before and after, what was kept, and the block scores that chose the depth."""

    params_before: int
    params_after: int
    block_params_before: int
    block_params_after: int
    dropped_blocks: list[int]
    heads: list[int]  # per kept block
    kv_heads: list[int]
    mlp: list[int]
    hidden: int
    uniform: bool
    block_metric: str
    block_scores: list[float]
    config: dict = field(default_factory=dict)

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def block_params_ratio(self) -> float:
        return self.block_params_after / max(self.block_params_before, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "params_ratio": self.params_ratio,
                "block_params_ratio": self.block_params_ratio}

    def __str__(self) -> str:
        def widths(v):
            return str(v[0]) if len(set(v)) == 1 else f"{min(v)}..{max(v)} (per block)"
        return "\n".join([
            f"params        {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_ratio:.3f}x)",
            f"block params  {self.block_params_before:,} -> {self.block_params_after:,} "
            f"({self.block_params_ratio:.3f}x)",
            f"blocks        {len(self.heads)} kept, dropped {self.dropped_blocks or 'none'} "
            f"(by {self.block_metric})",
            f"attention     {widths(self.heads)} query heads, {widths(self.kv_heads)} "
            f"key/value heads",
            f"MLP           {widths(self.mlp)} neurons",
            f"hidden        {self.hidden}"])


def block_params(model: nn.Module) -> int:
    """Parameters inside the decoder blocks (what the width and depth budgets count)."""
    return sum(count_params(b) for b in llama_layers(model))


def shrink_llm(model: nn.Module, config: LLMShrink, calib, progress: bool = False,
               stats: LLMStats | None = None) -> tuple[nn.Module, LLMShrinkReport]:
    """Return (smaller model, report); the input model is not modified. `calib`: batches of
    token ids ({'input_ids': (b, T)} or tensors), e.g. models.calibration_batches. `stats`:
    a collect_stats result for this model, reused (several configs from one pass; the
    Taylor scores are added to it the first time importance="taylor" needs them)."""
    if not isinstance(config, LLMShrink):
        raise PruneError(f"config must be an LLMShrink, got {type(config).__name__}")
    check_config(model, config)
    taylor = config.importance == "taylor"
    if stats is None:
        stats = collect_stats(model, calib, progress, taylor=taylor,
                              grams=config.reconstruct != "none" or config.importance == "error")
    elif taylor and stats.taylor is None:  # kept on the stats, for the next config
        stats.taylor = taylor_scores(model, calib, progress)
    costs = None
    if config.block_metric == "perplexity" and config.drop_blocks:
        costs = block_perplexity_cost(model, calib)
    plan = plan_llm(model, config, stats, costs)
    small = apply_plan(model, plan)
    if config.reconstruct != "none":
        if stats.o_gram is None:
            raise PruneError("reconstruct needs the Gram matrices: collect_stats(..., "
                             "grams=True), or LLMShrink(reconstruct='none')")
        reconstruct(model, small, plan, stats, config.damp, config.reconstruct == "all")
    with torch.no_grad():  # the cut model runs (a cheap guard against a silent misfit)
        small(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=False)
    layers = small.model.layers
    report = LLMShrinkReport(
        params_before=count_params(model), params_after=count_params(small),
        block_params_before=block_params(model), block_params_after=block_params(small),
        dropped_blocks=[i for i in range(len(model.model.layers)) if i not in plan.blocks],
        heads=[_heads(b)[0] for b in layers], kv_heads=[_heads(b)[1] for b in layers],
        mlp=[b.mlp.down_proj.in_features for b in layers], hidden=len(plan.hidden),
        uniform=plan.uniform(), block_metric=config.block_metric,
        block_scores=[round(s, 6) for s in plan.block_scores], config=config.options())
    small.prune_plan = plan  # what stays, in the original numbering (distillation uses it)
    return small, report


# -- saving ------------------------------------------------------------------------------------

def is_uniform(model: nn.Module) -> bool:
    layers = llama_layers(model)
    return len({(_heads(b), b.mlp.down_proj.in_features) for b in layers}) == 1


def save_llm(model: nn.Module, path) -> Path:
    """Uniform widths: a plain transformers folder (config updated) that
    AutoModelForCausalLM.from_pretrained loads. Per-block widths: prunekit's shrunk format
    (save_shrunk, one safetensors file; load_llm reloads it), since no transformers Llama
    config holds different widths per block."""
    from prunekit.models.llm import save_pretrained
    from prunekit.structured.api import save_shrunk

    if is_uniform(model):
        return save_pretrained(model, path)
    path = Path(path)
    if path.is_dir():
        raise PruneError(f"{path} is a folder, but a model with per-block widths saves as one "
                         f"safetensors file (save_shrunk format): give a file path")
    cfg = model.config.to_dict()
    note = ("per-block widths: no transformers LlamaConfig holds them (one "
            "intermediate_size and one head count for every block); configs with per-layer "
            "lists (e.g. DeciLM / Nemotron-NAS block_configs, OpenELM) could")
    save_shrunk(model, path, extra={"config": cfg, "note": note})
    return path


def load_llm(path) -> nn.Module:
    """A model saved by save_llm: a transformers folder or a save_shrunk file."""
    from prunekit.models.llm import from_pretrained
    from prunekit.structured.api import load_shrunk, read_description

    path = Path(path)
    if path.is_dir():
        return from_pretrained(path)
    desc = read_description(path)
    cfg = desc.get("extra", {}).get("config")
    if not cfg:
        raise PruneError(f"{path} has no transformers config in its description; it was not "
                         f"saved by structured.llm.save_llm")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return load_shrunk(base, path, inplace=True).eval()


# -- speed -------------------------------------------------------------------------------------

def compare_speed(models: dict[str, nn.Module], prompt_tokens: int = 512,
                  decode_tokens: int = 32, repeats: int = 3, seed: int = 0) -> dict:
    """Prefill seconds (one forward over a prompt of `prompt_tokens`) and decode tokens/s
    (batch 1, KV cache, after a 16-token prompt) of every model, measured in turns (model A,
    model B, A, B, ...) so a busy machine slows all of them alike; medians over `repeats`.
    Returns {name: {"prefill_s", "decode_tokens_per_s"}}."""
    import statistics

    from prunekit.runtime.decode import decode_tokens_per_second, prefill_seconds

    if prompt_tokens < 1 or decode_tokens < 1 or repeats < 1:
        raise PruneError("prompt_tokens, decode_tokens and repeats must be positive")
    vocab = min(m.model.embed_tokens.num_embeddings for m in models.values())
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=g)
    short = prompt[:, :16]
    for m in models.values():  # warm up (first calls allocate)
        m.eval()
        prefill_seconds(m, prompt[:, :32])
    pre: dict[str, list[float]] = {k: [] for k in models}
    dec: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            pre[k].append(prefill_seconds(m, prompt))
            dec[k].append(decode_tokens_per_second(m, short, decode_tokens)["tokens_per_s"])
    return {k: {"prefill_s": statistics.median(pre[k]),
                "decode_tokens_per_s": statistics.median(dec[k])} for k in models}
