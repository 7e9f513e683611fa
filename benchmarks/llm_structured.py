"""Structured (width and depth) pruning of a real LLM: SmolLM2-135M-Instruct (Llama, 30 blocks,
9 query heads over 3 key/value heads, MLP 1536, hidden 576) shrunk by prunekit.structured.llm
to 75% and 50% of its block parameters, one-shot and after the same distillation budget;
perplexity, and prefill and decode speed measured against the dense model side by side.

Rows (block parameters kept; the embedding and tied head are not counted):
  dense
  width/25%   MLP 1024 of 1536 neurons per block: exactly 75.0% kept
  width/25%-heads  heads 6 (2 per key/value group) + MLP 1152: exactly 75.0% kept (query
              heads cost far more perplexity per parameter than MLP neurons here)
  width/50%   MLP 512: exactly 50.0% kept
  depth/25%   8 of 30 blocks dropped by block influence (73.3% kept; 7.5 blocks is 25%)
  depth/50%   15 of 30 blocks dropped (50.0% kept)
  mix/25%     4 blocks dropped + MLP 1260 in the other 26 (75.0% kept)
  sparsegpt/2:4  SparseGPT 2:4 (block by block, the embedding and head dense) from
              prunekit.prune: half the block weights zero, none removed, so no speed here
  width/25%/taylor, width/25%/error  MLP 1024 as width/25%, neurons ranked by first-order
              Taylor (causal-LM loss gradients on the calibration tokens) or by the one-shot
              output error with the refit (OBS: ||W_down[:, i]||^2 / [G^-1]_ii) instead of
              the activation energy (LLMShrink.importance)
  width/25%/dp  the same MLP parameters (at most 1024 x 30 neurons in all) spread over the
              blocks by the DP, each block its own width in multiples of 64, least summed
              activation score removed (LLMShrink.mlp_allocation="dp"; per-block widths, so
              the speed_shapes run leaves it out and its speed is the one measured beside it)
  <row>~none, <row>~attention  the same cut with reconstruct="none" (kept weights unchanged)
              or "attention" (o_proj refit only) instead of "all": what the refit buys
  <row>+distill  the same model after --distill-steps steps of logit distillation from the
              dense model (KL, sequences of --distill-len tokens, batch --distill-batch, drawn
              from WikiText-2 validation, lr --distill-lr); <row>+distill300: 300 steps
Calibration (scores for heads, neurons, channels and blocks, and the Gram matrices of the
least-squares refit of o_proj and down_proj, reconstruct="all"): --calib-n segments x 256
tokens of WikiText-2 validation (64, i.e. 16k tokens; the depth rows of the first run used
16, which the refit does not touch), seed 0, one pass shared by every row.

Perplexity: WikiText-2 test, 1024-token windows (prunekit.evaluate.lm_perplexity); the whole
test set (297 windows) by default, or --eval-windows N spread evenly over it (the whole set
takes about 20 s a window per model on the 2 busy cores this was written on).
Speed: prefill of a 512-token prompt and greedy decoding of 32 tokens at batch 1 with the KV
cache (structured.llm.compare_speed: dense and pruned in turns, medians of 3).

    python benchmarks/llm_structured.py --threads 2 --eval-windows 8
    python benchmarks/llm_structured.py --only 'width/25%*' --distill-steps 60

    python benchmarks/llm_structured.py --speed-shapes --threads 2   # the speed table alone

--speed-shapes times every measured row's shapes again, all in one interleaved run (dense, a
second dense copy as the noise control, and a randomly initialised model of each row's
widths and depth: speed depends on the shapes only; distilled rows share their one-shot
row's), 5 repeats, and records it under "speed_shapes"; the table prefers it to the speed
measured beside each row, which a busy machine can skew (another job starting mid-row).

Each row is written to the results file as soon as it is measured (resumable: rows already
there for the same evaluation are skipped), with the run's provenance.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch

from prunekit.bench.provenance import load_result, provenance, select, write_result
from prunekit.data import lm_tokens
from prunekit.evaluate import lm_perplexity
from prunekit.models import calibration_batches, create
from prunekit.structured.distill import distill
from prunekit.structured.llm import LLMShrink, collect_stats, compare_speed, shrink_llm

RESULTS = Path(__file__).parent / "results" / "llm_structured"
CONFIGS = {
    "width/25%": LLMShrink(mlp_ratio=1024 / 1536),
    "width/25%-heads": LLMShrink(heads=6, mlp_ratio=1152 / 1536),
    "width/50%": LLMShrink(mlp_ratio=512 / 1536),
    "depth/25%": LLMShrink(drop_blocks=8),
    "depth/50%": LLMShrink(drop_blocks=15),
    "mix/25%": LLMShrink(drop_blocks=4, mlp_ratio=1260 / 1536),
    "width/25%/taylor": LLMShrink(mlp_ratio=1024 / 1536, importance="taylor"),
    "width/25%/error": LLMShrink(mlp_ratio=1024 / 1536, importance="error"),
    "width/25%/dp": LLMShrink(mlp_ratio=1024 / 1536, mlp_allocation="dp"),
}
#: the order rows run in (cheap and most wanted first)
ORDER = ["dense", "width/25%", "depth/25%", "width/25%+distill", "width/50%", "depth/50%",
         "depth/25%+distill", "mix/25%", "width/25%-heads", "mix/25%+distill",
         "width/50%+distill", "depth/50%+distill", "sparsegpt/2:4",
         "width/25%~none", "width/25%-heads~none", "width/25%-heads~attention",
         "width/25%+distill300", "depth/25%+distill300",
         "width/25%/taylor", "width/25%/error", "width/25%/dp"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default="*", help="comma-separated globs over row keys")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=None,
                    help="1024-token WikiText-2 test windows spread evenly (default: all)")
    ap.add_argument("--calib-n", type=int, default=64, help="calibration segments of 256")
    ap.add_argument("--distill-steps", type=int, default=60)
    ap.add_argument("--distill-len", type=int, default=128)
    ap.add_argument("--distill-batch", type=int, default=2)
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--no-speed", action="store_true", help="skip the prefill/decode timing")
    ap.add_argument("--speed-shapes", action="store_true",
                    help="time the shapes of every measured row together (no perplexity)")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats for --speed-shapes")
    ap.add_argument("--out", default=str(RESULTS / "results.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        chosen = select(list(ORDER), args.only)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    out = Path(args.out)
    saved = load_result(out)
    results: dict = saved.get("rows", {})
    prov = provenance(argv, script=__file__, threads=args.threads)
    runs = saved.get("runs", []) + [{**prov, "pid": os.getpid()}]
    evaluation = f"wikitext2-test/{args.eval_windows or 'all'}x1024"

    def save():
        extra = {"speed_shapes": saved["speed_shapes"]} if "speed_shapes" in saved else {}
        write_result(out, {"model": "smollm2-135m", "runs": runs, "rows": results, **extra},
                     prov)

    dense = create("smollm2-135m", pretrained=True)
    if args.speed_shapes:
        saved["speed_shapes"] = speed_shapes(dense, results, args.repeats, len(runs) - 1)
        write_result(out, {"model": "smollm2-135m", "runs": runs, "rows": results,
                           "speed_shapes": saved["speed_shapes"]}, prov)
        print(table(results, evaluation, saved["speed_shapes"]))
        return 0
    ids = lm_tokens(dense.tokenizer, "wikitext2", "test")
    calib = calibration_batches("smollm2-135m", n=args.calib_n, seq_len=256, seed=0,
                                batch_size=16, tokenizer=dense.tokenizer)
    stats = None
    for key in chosen:
        have = results.get(key, {})
        if evaluation in have.get("ppl", {}):
            continue
        base, _, extra = key.partition("+")
        start = time.perf_counter()
        entry = {"run": len(runs) - 1, "threads": args.threads, "ppl": have.get("ppl", {}),
                 "eval_s": have.get("eval_s", {})}
        if base == "dense":
            model = dense
            entry.update(block_params_ratio=1.0, params=sum(p.numel()
                                                            for p in dense.parameters()))
        elif base == "sparsegpt/2:4":
            import copy

            import prunekit
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            rep = prunekit.prune(model, prunekit.SparseGPT(pattern="2:4", sequential=True,
                                                           exclude=("lm_head",)),
                                 calib, progress=False)
            entry.update(prune_s=time.perf_counter() - t0, sparsity=rep.sparsity,
                         block_params_ratio=1.0 - rep.sparsity * _linear_share(dense),
                         calib_tokens=sum(b["input_ids"].numel() for b in calib),
                         note="zeros, not removed: the dense kernels run the same shapes")
        else:
            if stats is None:
                t0 = time.perf_counter()
                stats = collect_stats(dense, calib)
                print(f"calibration statistics {time.perf_counter() - t0:.0f} s", flush=True)
            name, _, refit = base.partition("~")
            cfg = CONFIGS[name]
            if refit:
                cfg = dataclasses.replace(cfg, reconstruct=refit)
            t0 = time.perf_counter()
            model, report = shrink_llm(dense, cfg, calib, stats=stats)
            entry.update(config=cfg.options(), prune_s=time.perf_counter() - t0,
                         calib_tokens=stats.tokens,
                         params=report.params_after, block_params_ratio=report.block_params_ratio,
                         dropped_blocks=report.dropped_blocks, heads=report.heads[0],
                         kv_heads=report.kv_heads[0], hidden=report.hidden,
                         mlp=report.mlp[0] if report.uniform else None,
                         **({} if report.uniform else {"mlp_per_block": report.mlp}))
            if extra.startswith("distill"):
                steps = int(extra[len("distill"):] or args.distill_steps)
                batches = calibration_batches(
                    "smollm2-135m", n=min(steps * args.distill_batch, 512),
                    seq_len=args.distill_len, seed=1, batch_size=args.distill_batch,
                    tokenizer=dense.tokenizer)
                entry["distill"] = {
                    **distill(model, dense, batches, steps, lr=args.distill_lr),
                    "len": args.distill_len, "batch": args.distill_batch, "lr": args.distill_lr}
                print(f"{key}: distilled {steps} steps in "
                      f"{entry['distill']['seconds']:.0f} s (loss "
                      f"{entry['distill']['loss_first']:.3f} -> "
                      f"{entry['distill']['loss_last']:.3f})", flush=True)
        t0 = time.perf_counter()
        entry["ppl"][evaluation] = lm_perplexity(model, ids, 1024, windows=args.eval_windows)
        entry["eval_s"][evaluation] = time.perf_counter() - t0
        if (base != "dense" and "~" not in base and not args.no_speed
                and "speed" not in have):
            speed = compare_speed({"dense": dense, "pruned": model}, 512, 32)
            entry.update(speed=speed,
                         prefill_speedup=speed["dense"]["prefill_s"]
                         / speed["pruned"]["prefill_s"],
                         decode_speedup=speed["pruned"]["decode_tokens_per_s"]
                         / speed["dense"]["decode_tokens_per_s"])
        elif "speed" in have:
            entry.update({k: have[k] for k in ("speed", "prefill_speedup", "decode_speedup")})
        entry["row_s"] = time.perf_counter() - start
        results[key] = entry
        save()
        print(f"{key:<20} ppl {entry['ppl'][evaluation]:8.2f}  block params "
              f"{entry['block_params_ratio']:.3f}  prefill x{entry.get('prefill_speedup', 1):.2f}"
              f"  decode x{entry.get('decode_speedup', 1):.2f}", flush=True)
    print(table(results, evaluation, saved.get("speed_shapes")))
    return 0


def shaped(dense, row: dict):
    """A randomly initialised model with a row's widths and depth (same shapes, same speed)."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(dense.config)
    cfg.head_dim = dense.config.head_dim
    cfg.num_attention_heads, cfg.num_key_value_heads = row["heads"], row["kv_heads"]
    cfg.intermediate_size, cfg.hidden_size = row["mlp"], row["hidden"]
    cfg.num_hidden_layers = dense.config.num_hidden_layers - len(row["dropped_blocks"])
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def speed_shapes(dense, results: dict, repeats: int, run: int) -> dict:
    """Prefill and decode of the dense model, a dense copy and every row's shapes, in turns."""
    import copy

    models = {"dense": dense, "dense-copy": copy.deepcopy(dense)}
    for key in ORDER:
        r = results.get(key)
        if r and "heads" in r and r.get("mlp") and "+" not in key and "~" not in key:
            models[key] = shaped(dense, r)
    speed = compare_speed(models, 512, 32, repeats=repeats)
    base = speed["dense"]
    return {"run": run, "repeats": repeats, "prompt_tokens": 512, "decode_tokens": 32,
            "models": speed,
            "prefill_speedup": {k: base["prefill_s"] / v["prefill_s"] for k, v in speed.items()},
            "decode_speedup": {k: v["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                               for k, v in speed.items()}}


def _linear_share(model) -> float:
    """The fraction of the block parameters that sit in the blocks' linear layers."""
    blocks = sum(p.numel() for b in model.model.layers for p in b.parameters())
    return sum(m.weight.numel() for b in model.model.layers for m in b.modules()
               if isinstance(m, torch.nn.Linear)) / blocks


def table(results: dict, evaluation: str, shapes: dict | None = None) -> str:
    dense = results.get("dense", {}).get("ppl", {}).get(evaluation)
    shapes = shapes or {}
    lines = [f"{'row':<26} {'block params':>12} {'ppl':>9} {'x dense':>8} {'prefill':>8} "
             f"{'decode':>8}   ({evaluation})"]
    for key in ORDER:
        r = results.get(key)
        if not r or evaluation not in r.get("ppl", {}):
            continue
        p = r["ppl"][evaluation]
        base = ("dense-copy" if key == "sparsegpt/2:4"
                else key.partition("+")[0].partition("~")[0])
        pre = shapes.get("prefill_speedup", {}).get(base, r.get("prefill_speedup", 1.0))
        dec = shapes.get("decode_speedup", {}).get(base, r.get("decode_speedup", 1.0))
        lines.append(f"{key:<26} {r['block_params_ratio']:>12.3f} {p:>9.2f} "
                     f"{p / dense if dense else float('nan'):>8.2f} "
                     f"{pre:>7.2f}x {dec:>7.2f}x")
    if shapes:
        lines.append(f"speed: the rows' shapes timed together ({shapes['repeats']} repeats, "
                     f"run {shapes['run']}); dense vs a dense copy: prefill "
                     f"{shapes['prefill_speedup']['dense-copy']:.2f}x, decode "
                     f"{shapes['decode_speedup']['dense-copy']:.2f}x (the noise)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
