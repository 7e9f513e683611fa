"""Quality metrics: top-1 accuracy, STS-B Spearman, perplexity, fidelity to the dense model,
and batch-norm re-estimation after pruning."""

from __future__ import annotations

import math

import torch
from scipy.stats import spearmanr
from torch import nn

from prunekit.calibrate import run_batch
from prunekit.errors import PruneError


@torch.no_grad()
def top1_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 500) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size])
                       .sum())
    return 100.0 * correct / len(images)


@torch.no_grad()
def stsb_spearman(model: nn.Module, tokenizer, pairs, batch_size: int = 128) -> float:
    """Spearman correlation (x100) between cosine similarities and gold STS-B scores."""
    model.eval()
    sentences = sorted({s for a, b, _ in pairs for s in (a, b)}, key=len)  # less padding
    index = {s: i for i, s in enumerate(sentences)}
    embs = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                        max_length=256, return_tensors="pt")
        embs.append(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
    e = torch.nn.functional.normalize(torch.cat(embs), dim=1)
    a = e[[index[p[0]] for p in pairs]]
    b = e[[index[p[1]] for p in pairs]]
    cos = (a * b).sum(1).numpy()
    return 100.0 * float(spearmanr(cos, [p[2] for p in pairs]).statistic)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, text: str, seq_len: int = 128,
               stride: int | None = None, max_tokens: int | None = None) -> float:
    """Perplexity of a causal LM on text, in windows of seq_len tokens; with stride < seq_len
    the windows overlap and only the new tokens are scored."""
    model.eval()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0] if tokenizer else text
    if max_tokens:
        ids = ids[:max_tokens]
    stride = stride or seq_len
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + seq_len, len(ids))
        window = ids[begin:end].unsqueeze(0)
        new = end - prev_end
        logits = model(input_ids=window).logits[0, :-1]
        targets = window[0, 1:]
        losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        scored = losses[-min(new, len(losses)):]
        nll += float(scored.sum())
        count += len(scored)
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / max(count, 1))


def _output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)):
        return out[0]
    raise PruneError(f"cannot read a tensor from model output of type {type(out).__name__}")


@torch.no_grad()
def fidelity(dense: nn.Module, pruned: nn.Module, batches) -> dict:
    """How close the pruned model's outputs are to the dense model's on the same inputs:
    relative error ||y' - y||^2 / ||y||^2 and the mean cosine between output vectors."""
    dense.eval()
    pruned.eval()
    num = den = 0.0
    cos, n = 0.0, 0
    for batch in batches:
        y = _output(run_batch(dense, batch)).float()
        y2 = _output(run_batch(pruned, batch)).float()
        num += float((y2 - y).pow(2).sum())
        den += float(y.pow(2).sum())
        flat, flat2 = y.reshape(-1, y.shape[-1]), y2.reshape(-1, y2.shape[-1])
        cos += float(torch.nn.functional.cosine_similarity(flat, flat2, dim=1).sum())
        n += flat.shape[0]
    return {"rel_output_error": num / den if den else 0.0, "embedding_cosine": cos / max(n, 1)}


@torch.no_grad()
def reestimate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance on `images` (a cumulative average
    over the batches), as pruned CNNs need; other modules stay in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    was_training = model.training
    saved = [(m.momentum, m.training) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size])
    finally:
        for m, (mom, tr) in zip(bns, saved):
            m.momentum = mom
            m.train(tr)
        model.train(was_training)
        for m, (_, tr) in zip(bns, saved):
            m.train(tr)
    return model


def evaluate(model: nn.Module, name, split: str = "test", limit: int | None = None) -> dict:
    """The standard quality metric of a registry model on its own dataset."""
    from prunekit import data
    from prunekit.models import get_info

    info = get_info(name)
    if info.dataset == "cifar10":
        x, y = data.cifar10_tensors(split, limit=limit)
        return {"top1": top1_accuracy(model, x, y)}
    if info.dataset == "digits":
        x, y = data.load_digits(split)
        return {"top1": top1_accuracy(model, x[:limit], y[:limit])}
    if info.dataset == "stsb":
        pairs = data.load_stsb("test" if split == "test" else "dev")[:limit]
        return {"stsb_spearman": stsb_spearman(model, model.tokenizer, pairs)}
    if info.task == "causal-lm" and getattr(model, "tokenizer", None) is not None:
        text = data.load_wikitext2("test" if split == "test" else "valid")
        return {"perplexity": perplexity(model, model.tokenizer, text, max_tokens=limit)}
    raise PruneError(f"no standard evaluation for {info.name}; use prunekit.evaluate's "
                     f"functions with your own data")
