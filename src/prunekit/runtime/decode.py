"""Causal-LM speed as a user meets it: prefill (one forward over the prompt) and decode (one
token at a time at batch 1, with the key/value cache), on any transformers causal LM, dense,
converted to sparse kernels or to quantized ones (runtime.convert).

`quantized_runtime(model)` converts a quantized model's layers to the int4/int8 kernels;
`int4_speed_and_perplexity()` is the demo's pair of numbers for SmolLM2-135M: perplexity on a
few WikiText-2 windows and decode tokens/s, int4 kernels against the dense float32 model.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.runtime.latency import num_threads


def _ids(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.dtype not in (torch.int64, torch.int32):
        raise PruneError(f"prompt ids must be one integer sequence (1, T), got "
                         f"{tuple(ids.shape)} {ids.dtype}")
    return ids.long()


def prefill_seconds(model: nn.Module, ids) -> float:
    """Seconds of one forward pass over the prompt `ids` (1, T), cache on."""
    ids = _ids(ids)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=True)
        return time.perf_counter() - t0


def decode_tokens_per_second(model: nn.Module, ids, tokens: int = 32) -> dict:
    """Greedy decoding of `tokens` tokens after the prompt `ids`, one token a step at batch 1
    with the key/value cache. Returns {"tokens_per_s", "seconds", "tokens", "prefill_s",
    "ids"} (the decode time alone, the prefill apart; ids: the tokens produced)."""
    if not isinstance(tokens, int) or tokens < 1:
        raise PruneError(f"tokens must be a positive integer, got {tokens!r}")
    ids = _ids(ids)
    out_ids = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill = time.perf_counter() - t0
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            out_ids.append(int(nxt))
        seconds = time.perf_counter() - t0
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
            "prefill_s": prefill, "ids": out_ids}


def quantized_runtime(model: nn.Module, kernels=("int4", "int8"), sample=None,
                      choose: str = "first", progress: bool = False):
    """A copy of a quantized model whose quantized layers run on the quantized kernels
    (`kernels` in order of preference with choose="first"; "fastest" measures them on
    `sample`, by default one decode step's input). Returns (model, ConversionReport)."""
    from prunekit.quant.model import quantized_layers
    from prunekit.runtime.convert import convert

    names = list(quantized_layers(model))
    if not names:
        raise PruneError(f"{type(model).__name__} has no quantized layer; quantize it first "
                         f"(prunekit.quantize)")
    batch = torch.zeros(1, 1, dtype=torch.long) if sample is None else sample
    return convert(model, batch, kernels=kernels, include=names, choose=choose,
                   progress=progress)


def int4_speed_and_perplexity(windows: int = 4, tokens: int = 32, threads: int | None = 2,
                              group_size: int = 64, prompt_tokens: int = 32) -> dict:
    """SmolLM2-135M quantized to 4 bits (RTN, symmetric groups of `group_size`: not the Q4_1
    grid its weights came from) on the int4 kernel, next to the dense float32 model:
    perplexity on `windows` WikiText-2 test windows of 1024 tokens, decode tokens/s at batch
    1 (the two timed side by side, dense first). lm_head (tied to the embeddings) stays
    float32. About a minute on 2 cores. Returns {"perplexity", "dense_perplexity",
    "decode_tokens_per_s", "dense_decode_tokens_per_s", "decode_speedup", ...}."""
    import prunekit
    from prunekit.evaluate import evaluate
    from prunekit.models import create

    dense = create("smollm2-135m", pretrained=True)
    model = create("smollm2-135m", pretrained=True)
    cfg = prunekit.RTN(bits=4, group_size=group_size, exclude=("lm_head",))
    prunekit.quantize(model, cfg, None, progress=False)
    fast, _ = quantized_runtime(model, kernels=("int4",))
    prompt = torch.arange(prompt_tokens).unsqueeze(0) + 1000
    with num_threads(threads):
        d = decode_tokens_per_second(dense, prompt, tokens)
        q = decode_tokens_per_second(fast, prompt, tokens)
        ppl_d = evaluate(dense, "smollm2-135m", windows=windows)["perplexity"]
        ppl_q = evaluate(fast, "smollm2-135m", windows=windows)["perplexity"]
    return {"perplexity": ppl_q, "dense_perplexity": ppl_d,
            "decode_tokens_per_s": q["tokens_per_s"],
            "dense_decode_tokens_per_s": d["tokens_per_s"],
            "decode_speedup": q["tokens_per_s"] / d["tokens_per_s"], "grid": cfg.grid.spec,
            "windows": windows, "tokens": tokens, "threads": threads}
