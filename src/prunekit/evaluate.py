"""Quality metrics: top-1 accuracy, STS-B Spearman, perplexity, fidelity to the dense model,
and batch-norm re-estimation after pruning.

`evaluate(model, name)` gives a registry model's standard metric on its own data set:
{"top1": percent} for image classifiers, {"stsb_spearman": x100} for the sentence encoder,
{"perplexity": ...} for causal LMs (WikiText-2 or TinyShakespeare, `lm_perplexity`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from prunekit.batches import output_tensor, run_batch
from prunekit.errors import PruneError
from prunekit.progress import Progress


@torch.no_grad()
def topk_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  ks: tuple[int, ...] = (1,), batch_size: int = 256,
                  progress: bool = False) -> dict[int, float]:
    """Top-k accuracies in percent for each k in ks, from one pass (the model is put in eval
    mode): the one home of classification accuracy."""
    if len(images) != len(labels) or not len(images):
        raise PruneError(f"top-1 needs as many labels as images (at least one), got "
                         f"{len(images)} images and {len(labels)} labels")
    model.eval()
    hits = dict.fromkeys(ks, 0)
    with Progress(enabled=progress) as bar:
        task = bar.add("top-1", total=len(images))
        for i in range(0, len(images), batch_size):
            logits = output_tensor(model(images[i:i + batch_size]))
            best = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
            hit = best == labels[i:i + batch_size, None]
            for k in ks:
                hits[k] += int(hit[:, :k].any(1).sum())
            bar.advance(task, len(logits))
    return {k: 100.0 * hits[k] / len(images) for k in ks}


def top1_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 256, progress: bool = False) -> float:
    """Top-1 accuracy in percent (the model is put in eval mode)."""
    return topk_accuracy(model, images, labels, (1,), batch_size, progress)[1]


@torch.no_grad()
def embed(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 128,
          max_length: int = 256, progress: bool = False) -> torch.Tensor:
    """L2-normalised sentence embeddings (rows in the order of `sentences`); sentences are
    batched by length so little padding is computed."""
    model.eval()
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.empty(0)
    with Progress(enabled=progress) as bar:
        task = bar.add("embed", total=len(sentences))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            enc = tokenizer([sentences[j] for j in idx], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            e = output_tensor(model(input_ids=enc["input_ids"],
                                    attention_mask=enc["attention_mask"]))
            if out.numel() == 0:
                out = torch.empty(len(sentences), e.shape[-1])
            out[idx] = e.float()
            bar.advance(task, len(idx))
    return F.normalize(out, dim=1)


def stsb_spearman(model: nn.Module, tokenizer, pairs, batch_size: int = 128,
                  progress: bool = False) -> float:
    """Spearman rank correlation (x100) between the cosine similarity of the two sentences'
    embeddings and the gold STS-B score, over (sentence1, sentence2, score) pairs."""
    if len(pairs) < 2:
        raise PruneError(f"STS-B Spearman needs at least 2 pairs, got {len(pairs)}")
    sentences = list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))
    index = {s: i for i, s in enumerate(sentences)}
    e = embed(model, tokenizer, sentences, batch_size, progress=progress)
    a = e[[index[p[0]] for p in pairs]]
    b = e[[index[p[1]] for p in pairs]]
    cos = (a * b).sum(1).numpy()
    return 100.0 * float(spearmanr(cos, [p[2] for p in pairs]).statistic)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer_or_ids, text: str | None = None,
               seq_len: int = 128, stride: int | None = None, max_tokens: int | None = None,
               batch_size: int = 8, progress: bool = False) -> float:
    """Perplexity of a causal LM: exp of the mean next-token loss over a token stream, given
    as a tokenizer plus text or as a 1-D tensor of ids. The stream is cut into windows of
    seq_len tokens starting every `stride` tokens (default seq_len: no overlap); each token
    is scored once, in the first window that predicts it from the most context."""
    if isinstance(tokenizer_or_ids, torch.Tensor):
        ids = tokenizer_or_ids.reshape(-1)
    else:
        if text is None:
            raise PruneError("perplexity needs the text to score when given a tokenizer")
        ids = torch.as_tensor(tokenizer_or_ids(text)["input_ids"]).reshape(-1)
    if max_tokens:
        ids = ids[:max_tokens]
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise PruneError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    if len(ids) < 2:
        raise PruneError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    # (begin, end, number of tokens at the end of the window scored here)
    windows, prev_end, begin = [], 0, 0
    while prev_end < len(ids):
        end = min(begin + seq_len, len(ids))
        new = min(end - prev_end, end - begin - 1)
        if new > 0:
            windows.append((begin, end, new))
        prev_end, begin = end, begin + stride
    model.eval()
    nll, count = 0.0, 0
    with Progress(enabled=progress) as bar:
        task = bar.add("perplexity", total=len(windows))
        i = 0
        while i < len(windows):
            size, group = windows[i][1] - windows[i][0], []
            for w in windows[i:i + batch_size]:
                if w[1] - w[0] != size:
                    break
                group.append(w)
            batch = torch.stack([ids[b:e] for b, e, _ in group])
            logits = output_tensor(model(input_ids=batch))[:, :-1].float()
            losses = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            for row, (_, _, new) in zip(losses, group):
                nll += float(row[len(row) - new:].sum())
                count += new
            i += len(group)
            bar.advance(task, len(group))
    return math.exp(nll / count)


def lm_windows(ids: torch.Tensor, seq_len: int = 1024, windows: int | None = None
               ) -> torch.Tensor:
    """The token stream cut into non-overlapping windows of seq_len tokens (a last, partial
    window is dropped), as (k, seq_len); with `windows` = N, only windows floor(i * n / N)
    for i = 0..N-1, spread evenly over the n there are."""
    ids = torch.as_tensor(ids).reshape(-1)
    if not isinstance(seq_len, int) or seq_len < 2:
        raise PruneError(f"perplexity windows need at least 2 tokens, got seq_len={seq_len!r}")
    n = len(ids) // seq_len
    if n == 0:
        raise PruneError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}; "
                         f"use a shorter --seq-len")
    cut = ids[:n * seq_len].reshape(n, seq_len)
    if windows is None:
        return cut
    if not isinstance(windows, int) or not 0 < windows <= n:
        raise PruneError(f"windows must be in 1..{n} (the text has {n} windows of {seq_len} "
                         f"tokens), got {windows!r}")
    return cut[[i * n // windows for i in range(windows)]]


def lm_seq_len(model: nn.Module, seq_len: int | None = None) -> int:
    """The perplexity window for `model`: seq_len (default 1024, or the model's context when
    that is shorter), checked against the model's context."""
    from prunekit.models.llm import context_length

    context = context_length(model)
    if seq_len is None:
        return min(1024, context) if context else 1024
    if context is not None and seq_len > context:
        raise PruneError(f"windows of {seq_len} tokens are longer than the model's context "
                         f"({context} positions); use --seq-len {context} or less")
    return seq_len


@torch.no_grad()
def lm_perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int | None = None,
                  windows: int | None = None, batch_size: int = 1,
                  progress: bool = False) -> float:
    """Perplexity as LLM pruning papers report it: the whole text tokenized once (`ids`), cut
    into non-overlapping windows of seq_len tokens (lm_windows; `windows` = N keeps N spread
    evenly), each window scored on its own: exp of the mean next-token loss over every
    predicted token of every window (seq_len - 1 per window)."""
    seq_len = lm_seq_len(model, seq_len)
    cut = lm_windows(ids, seq_len, windows)
    model.eval()
    nll, count = 0.0, 0
    with Progress(enabled=progress) as bar:
        task = bar.add("perplexity", total=len(cut))
        for batch in cut.split(max(1, batch_size)):
            logits = output_tensor(model(input_ids=batch))[:, :-1].float()
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         batch[:, 1:].reshape(-1), reduction="sum"))
            count += batch[:, 1:].numel()
            bar.advance(task, len(batch))
    return math.exp(nll / count)


@torch.no_grad()
def fidelity(dense: nn.Module, pruned: nn.Module, batches) -> dict:
    """How close the pruned model's outputs stay to the dense model's on the same inputs:
    rel_output_error = sum ||y' - y||^2 / sum ||y||^2, and embedding_cosine = the mean cosine
    between output vectors (last dimension; padded tokens left out when the batch has an
    attention_mask)."""
    dense.eval()
    pruned.eval()
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]
    num = den = cos = 0.0
    n = 0
    for batch in batches:
        y = output_tensor(run_batch(dense, batch)).float()
        y2 = output_tensor(run_batch(pruned, batch)).float()
        if y.shape != y2.shape:
            raise PruneError(f"dense and pruned outputs differ in shape: {tuple(y.shape)} vs "
                             f"{tuple(y2.shape)}")
        if isinstance(batch, Mapping) and "attention_mask" in batch and y.dim() == 3:
            keep = batch["attention_mask"].bool()
            y, y2 = y[keep], y2[keep]
        flat, flat2 = y.reshape(-1, y.shape[-1]), y2.reshape(-1, y2.shape[-1])
        num += float((flat2 - flat).pow(2).sum())
        den += float(flat.pow(2).sum())
        cos += float(F.cosine_similarity(flat, flat2, dim=1).sum())
        n += flat.shape[0]
    if not n:
        raise PruneError("fidelity needs at least one batch")
    return {"rel_output_error": num / den if den else 0.0, "embedding_cosine": cos / n}


@torch.no_grad()
def reestimate_bn(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor],
                  batch_size: int = 128, progress: bool = False) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance from `images` (a tensor, cut
    into batches, or an iterable of batches): statistics reset, BatchNorm layers in train
    mode with momentum=None (an equal-weight average over the batches), no gradients, every
    module's mode and momentum restored afterwards. One-shot pruning of a CNN shifts the
    activation statistics; a few hundred training images put them right."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    batches = list(images.split(batch_size)) if isinstance(images, torch.Tensor) else \
        list(images)
    if not batches:
        raise PruneError("reestimate_bn needs at least one batch of images")
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with Progress(enabled=progress) as bar:
            task = bar.add("re-estimate batch norm", total=len(batches))
            for b in batches:
                model(b)
                bar.advance(task)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for m, mode in modes.items():
            m.training = mode
    return model


#: metric name per data set
METRICS = {"cifar10": "top1", "digits": "top1", "stsb": "stsb_spearman",
           "wikitext2": "perplexity", "tinyshakespeare": "perplexity"}


def evaluate(model: nn.Module, name_or_info=None, split: str = "test",
             limit: int | None = None, batch_size: int | None = None,
             dataset: str | None = None, progress: bool = False, seq_len: int | None = None,
             windows: int | None = None) -> dict:
    """The standard quality metric of a model on its data set: a registry name or ModelInfo
    says which, or `dataset` ('cifar10', 'digits', 'stsb', 'wikitext2', 'tinyshakespeare')
    for any model. split 'test' (default) or the train/validation side; limit keeps the first
    N examples (tokens for perplexity). Perplexity takes windows of seq_len tokens (default
    1024, capped by a shorter context) and `windows` = N of them spread evenly (lm_perplexity).
    """
    from prunekit import data

    if dataset is None:
        if name_or_info is None:
            raise PruneError("evaluate needs a registry model name or dataset=")
        from prunekit.models import get_info
        info = get_info(name_or_info)
        dataset = info.dataset
        if dataset is None:
            raise PruneError(f"{info.name} has no standard data set; pass dataset= one of "
                             f"{', '.join(METRICS)}")
    if dataset not in METRICS:
        raise PruneError(f"no evaluation for data set {dataset!r}; choose from "
                         f"{', '.join(METRICS)}")
    if dataset in ("cifar10", "digits"):
        _check_split(dataset, split, ("test", "train"))
        if dataset == "cifar10":
            x, y = data.cifar10_tensors(split, limit=limit)
        else:
            x, y = data.load_digits(split)
            x, y = x[:limit], y[:limit]
        return {"top1": top1_accuracy(model, x, y, batch_size or 256, progress=progress)}
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise PruneError(f"evaluating on {dataset} needs the model's tokenizer as "
                         f"model.tokenizer")
    if dataset == "stsb":
        split = _check_split(dataset, split, ("test", "dev"))
        pairs = data.load_stsb(split)[:limit]
        return {"stsb_spearman": stsb_spearman(model, tokenizer, pairs, batch_size or 128,
                                               progress=progress)}
    split = _check_split(dataset, split, data.LM_SPLITS[dataset])
    ids = data.lm_tokens(tokenizer, dataset, split)[:limit]
    return {"perplexity": lm_perplexity(model, ids, seq_len, windows, batch_size or 1,
                                        progress=progress)}


def _check_split(dataset: str, split: str, allowed: tuple[str, str]) -> str:
    """The split's name for `dataset`; 'dev', 'valid' and 'validation' name the same side."""
    if split in ("dev", "valid", "validation") and allowed[1] in ("dev", "valid"):
        return allowed[1]
    if split not in allowed:
        raise PruneError(f"{dataset} has no split {split!r}; use {' or '.join(allowed)}")
    return split
