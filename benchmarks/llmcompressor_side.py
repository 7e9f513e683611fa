"""prunekit and llm-compressor side by side on SmolLM2-135M (issues 20 and 21): the same
model folder, the same calibration tokens, the same perplexity evaluator.

llm-compressor 0.14.0.1 needs torch 2.10..2.14.0 and transformers 5.15..5.17, so it runs in
its own virtualenv (never imported into prunekit, nothing of it copied):

    python -m venv /work/venvs/llmc
    /work/venvs/llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1

One run of this script (in prunekit's environment) does, for each row:
  1. prepare (once): SmolLM2-135M as prunekit loads it, written as a transformers folder,
     and the calibration tokens (32 x 512 WikiText-2 validation segments, seed 0, the ones
     prunekit's quantize/prune commands draw) as a safetensors file;
  2. prunekit's method in a subprocess of this Python (time and peak RSS of that process),
     the model saved as a transformers folder;
  3. llm-compressor's modifier in a subprocess of the venv's Python running this same file
     with --llmc-worker (oneshot on the folder and tokens; time and peak RSS of that
     process), saved compressed (compressed-tensors);
  4. both saved models loaded by transformers in prunekit's environment (compressed-tensors
     0.20.0 decompresses llm-compressor's) and scored by prunekit.evaluate on the same
     WikiText-2 test windows: --windows N spread over the rebuilt test set, or --eval
     steering8 for the issue's 8 steering windows (benchmarks/llm_oneshot.py's eval_ids, the
     windows llm_oneshot.py and llm_reference.py report).

    python benchmarks/llmcompressor_side.py --rows gptq-w4g64 --windows 16
    python benchmarks/llmcompressor_side.py --rows gptq-w4g64,sparsegpt-50,wanda-50
    python benchmarks/llmcompressor_side.py --rows sparsegpt-50,wanda-50 --eval steering8

Results: benchmarks/results/llmcompressor_side/side.json (provenance) and side.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "llmcompressor_side"
VENV_PYTHON = "/work/venvs/llmc/bin/python"

#: row -> the prunekit config (method, options) and the llm-compressor recipe description;
#: both leave lm_head (tied to the embeddings) alone, both calibrate block by block
ROWS = {
    "gptq-w4g64": {"prunekit": ("GPTQ", {"bits": 4, "group_size": 64, "sym": True}),
                   "llmc": {"kind": "gptq", "bits": 4, "group_size": 64}},
    "gptq-w4": {"prunekit": ("GPTQ", {"bits": 4, "sym": True}),
                "llmc": {"kind": "gptq", "bits": 4, "group_size": None}},
    "sparsegpt-50": {"prunekit": ("SparseGPT", {"sparsity": 0.5}),
                     "llmc": {"kind": "sparsegpt", "sparsity": 0.5, "mask": "0:0"}},
    "wanda-50": {"prunekit": ("Wanda", {"sparsity": 0.5}),
                 "llmc": {"kind": "wanda", "sparsity": 0.5, "mask": "0:0"}},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _without_benchmarks_on_path() -> None:
    """Drop this file's folder from sys.path (a script's folder comes first there). It holds
    benchmarks/kernels.py, which shadows the `kernels` package that transformers imports to
    probe for it (is_kernels_available) when anything imports transformers.PreTrainedModel:
    in the venv that import of prunekit's kernels.py fails (no prunekit there), and
    transformers then reports "Could not import module 'PreTrainedModel'"."""
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != HERE.parent]


# -- the llm-compressor worker (runs in the venv: torch, transformers, llmcompressor only) --

def llmc_worker(args) -> int:
    _without_benchmarks_on_path()
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    spec = json.loads(args.spec)
    tokens = load_file(args.calib)["input_ids"]
    ds = Dataset.from_dict({"input_ids": tokens.tolist(),
                            "attention_mask": torch.ones_like(tokens).tolist()})
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load_s = time.perf_counter() - t0
    # llm-compressor 0.14.0.1's SparseGPT and Wanda modifiers name a module matched by
    # targets=["Linear"] "lm_head." (its own name plus "." plus ""), so ignore=["lm_head"]
    # never matches it and the tied head is pruned (its "auto-ignored ... add re:.*lm_head"
    # warning does not fire either); the regex its warning suggests does match.
    sparse_ignore = ["re:.*lm_head"]
    if spec["kind"] == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        weights = {"num_bits": spec["bits"], "type": "int", "symmetric": True,
                   "strategy": "group" if spec["group_size"] else "channel",
                   "group_size": spec["group_size"], "observer": "minmax"}
        recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"],
                                                         "weights": weights}},
                              ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                              actorder=None)
    elif spec["kind"] == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        recipe = SparseGPTModifier(sparsity=spec["sparsity"], mask_structure=spec["mask"],
                                   targets=["Linear"], ignore=sparse_ignore, block_size=128,
                                   dampening_frac=0.01)
    else:
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        recipe = WandaPruningModifier(sparsity=spec["sparsity"], mask_structure=spec["mask"],
                                      targets=["Linear"], ignore=sparse_ignore)
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe,
            max_seq_length=tokens.shape[1], num_calibration_samples=tokens.shape[0],
            pipeline="sequential")
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.out, save_compressed=spec["kind"] == "gptq")
    tokenizer.save_pretrained(args.out)
    print(json.dumps({"seconds": seconds, "load_s": load_s, "peak_rss_mb": peak_rss_mb(),
                      "llmcompressor": llmcompressor.__version__,
                      "torch": torch.__version__}))
    return 0


# -- prunekit's side (prunekit's environment) ---------------------------------------------

def prunekit_worker(args) -> int:
    _without_benchmarks_on_path()
    import torch
    from safetensors.torch import load_file

    import prunekit
    from prunekit.models.llm import from_pretrained

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = from_pretrained(args.model)
    load_s = time.perf_counter() - t0
    tokens = load_file(args.calib)["input_ids"]
    calib = [tokens[i:i + 8] for i in range(0, len(tokens), 8)]
    method, options = ROWS[args.spec]["prunekit"]
    cfg = getattr(prunekit, method)(**options, sequential=True, exclude=("lm_head",))
    t0 = time.perf_counter()
    if cfg.family == "quantize":
        prunekit.quantize(model, cfg, calib, progress=False)
    else:
        prunekit.prune(model, cfg, calib, progress=False)
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.out)
    model.tokenizer.save_pretrained(args.out)
    print(json.dumps({"seconds": seconds, "load_s": load_s, "peak_rss_mb": peak_rss_mb(),
                      "prunekit_commit": os.environ.get("GIT_COMMIT", ""),
                      "torch": torch.__version__}))
    return 0


def prepare(work: Path) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    from prunekit.models import calibration_batches, create

    folder, calib = work / "smollm2-135m", work / "calib.safetensors"
    model = create("smollm2-135m", pretrained=True)
    if not (folder / "config.json").exists():
        model.save_pretrained(folder)
        model.tokenizer.save_pretrained(folder)
    if not calib.exists():
        batches = calibration_batches("smollm2-135m", n=32, seq_len=512, seed=0,
                                      tokenizer=model.tokenizer)
        ids = torch.cat([b if isinstance(b, torch.Tensor) else b["input_ids"]
                         for b in batches])
        save_file({"input_ids": ids.contiguous()}, str(calib))
    return folder, calib


def run_worker(cmd: list[str], log: Path) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        tail = "\n".join(p.stderr.strip().splitlines()[-15:])
        return {"error": tail, "returncode": p.returncode,
                "wall_s": time.perf_counter() - t0}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def eval_label(args) -> str:
    return "steering8" if args.eval == "steering8" else f"wikitext2/{args.windows}"


def score(folder: Path, args) -> float:
    import torch

    from prunekit.evaluate import evaluate, lm_perplexity
    from prunekit.models.llm import from_pretrained

    torch.set_num_threads(args.threads)
    model = from_pretrained(folder)
    if args.eval == "steering8":
        sys.path.insert(0, str(HERE.parent))
        from llm_oneshot import eval_ids  # a sibling script: the steering windows

        ids, windows = eval_ids("steering8", model.tokenizer)
        return lm_perplexity(model, ids, 1024, windows=windows)
    return evaluate(model, dataset="wikitext2", windows=args.windows)["perplexity"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="gptq-w4g64", help=f"comma-separated: {', '.join(ROWS)}")
    ap.add_argument("--windows", type=int, default=16,
                    help="WikiText-2 test windows of 1024 tokens for perplexity (spread evenly)")
    ap.add_argument("--eval", choices=("wikitext2", "steering8"), default="wikitext2",
                    help="steering8: the issue's 8 steering windows (--windows is ignored)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/prunekit_llmc_side")
    ap.add_argument("--llmc-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prunekit-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model"), ap.add_argument("--calib"), ap.add_argument("--out")
    ap.add_argument("--spec")
    args = ap.parse_args(argv)
    if args.llmc_worker:
        return llmc_worker(args)
    if args.prunekit_worker:
        return prunekit_worker(args)

    from prunekit.bench.provenance import provenance, write_result
    from prunekit.io import atomic_write_text

    prov = provenance(argv if argv is not None else sys.argv[1:], threads=args.threads)
    prov["loadavg_at_start"] = os.getloadavg()
    os.environ["GIT_COMMIT"] = str(prov.get("git_commit", ""))  # the prunekit worker records it
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder, calib = prepare(work)
    path = RESULTS / "side.json"
    payload = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    label = eval_label(args)
    payload["eval"] = label
    dense = payload["rows"].setdefault("dense", {"ppl": {}})
    if label not in dense["ppl"]:
        dense["ppl"][label] = score(folder, args)
    for row in args.rows.split(","):
        spec = ROWS[row]
        out = {}
        for side, cmd in (
                ("prunekit", [sys.executable, str(HERE), "--prunekit-worker"]),
                ("llm-compressor", [VENV_PYTHON, str(HERE), "--llmc-worker"])):
            dest = work / f"{row}-{side}"
            text = row if side == "prunekit" else json.dumps(spec["llmc"])
            res = run_worker(cmd + ["--model", str(folder), "--calib", str(calib), "--out",
                                    str(dest), "--spec", text, "--threads",
                                    str(args.threads)], work / f"{row}-{side}.log")
            res["config"] = spec["prunekit"] if side == "prunekit" else spec["llmc"]
            res["eval"] = label
            if "error" not in res:
                res["ppl"] = score(dest, args)
            out[side] = res
            print(f"{row} {side}: {json.dumps({k: v for k, v in res.items() if k != 'config'})}",
                  flush=True)
        payload["rows"][row] = out
        prov["loadavg_at_end"] = os.getloadavg()
        write_result(path, payload, prov)
    lines = ["# prunekit and llm-compressor on SmolLM2-135M (same folder, calibration, "
             "evaluator)", "",
             f"WikiText-2 test perplexity ({label}: windows of 1024 tokens); "
             f"{args.threads} threads; time = the method alone (model loaded); peak RSS of "
             f"the whole process; dense {dense['ppl'][label]:.3f}", "",
             "| row | side | perplexity | seconds | peak RSS MB |", "|---|---|---|---|---|"]
    for row, sides in payload["rows"].items():
        if row == "dense":
            continue
        for side, r in sides.items():
            if r.get("eval", label) != label:
                continue  # measured on other windows
            if "error" in r:
                lines.append(f"| {row} | {side} | error: {r['error'].splitlines()[-1][:80]} "
                             f"| | |")
            else:
                lines.append(f"| {row} | {side} | {r['ppl']:.3f} | {r['seconds']:.1f} | "
                             f"{r['peak_rss_mb']:.0f} |")
    atomic_write_text(RESULTS / "side.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
