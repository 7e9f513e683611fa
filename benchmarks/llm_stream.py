"""Out-of-core pruning of SmolLM2-135M: `prunekit.oneshot.prune_folder` streams a float32
transformers folder one decoder block at a time; its peak memory above the process's
baseline against half the model's float32 size, its pruned weights against the in-memory
`prunekit.prune` on the same calibration, and a memory and time extrapolation to a
70B Llama from the measured per-block costs.

The dense model is saved as a transformers folder in a temporary folder; a fresh process
(`--child`) imports everything, reads its resident set (the baseline), resets the kernel's
high-water mark (writing 5 to /proc/self/clear_refs) and runs `prune_folder` with SparseGPT
50% (sequential, the head left dense as in llm_oneshot.py) on 32 x 512 WikiText-2
validation tokens (calibration_batches, seed 0), passed as a file of token ids; the peak is
VmHWM from /proc/self/status, and a sampler thread reads VmRSS every 10 ms for each block's
peak. It runs twice: under glibc's default allocator, and with MALLOC_MMAP_THRESHOLD_ fixed
at 1 MiB (the default threshold grows to 32 MiB as large pieces are freed, so a block's
working memory then stays in the heap, fragmented). Calibration batches are of
`--batch-size` segments (default 1): the same tokens as the default batching, but a batch's
pass through a block is what the peak holds beside the block, so a 32-segment batch would
add about 0.7 GB. Then this process prunes the same model in memory on the same batches and
compares: every tensor equal, max abs difference, differing mask entries, and perplexity on
the 8 steering windows (llm_oneshot.py's eval_ids("steering8")). The machine is shared: the
load average is recorded with the times.

    python benchmarks/llm_stream.py                      # SparseGPT 50%, 32 x 512 tokens
    python benchmarks/llm_stream.py --method wanda --out /tmp/wanda.json
"""

from __future__ import annotations

import argparse
import array
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "llm_stream"
HEAD = ("lm_head",)
MB = 1e6
#: Llama 2/3 70B: 80 blocks, hidden 8192, MLP 28672, 64 query and 8 key/value heads of 128
LLAMA_70B = dict(blocks=80, hidden=8192, mlp=28672, kv=1024, vocab=128256)
#: the streamed run under glibc's defaults, and with a fixed 1 MiB mmap threshold (pieces
#: over it are unmapped when freed instead of fragmenting the heap)
ALLOCATORS = {"system": {}, "mmap_threshold_1mib": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}


def config(method: str):
    import prunekit

    if method == "wanda":
        return prunekit.Wanda(sparsity=0.5, pattern="unstructured:row", sequential=True,
                              exclude=HEAD)
    return prunekit.SparseGPT(sparsity=0.5, sequential=True, exclude=HEAD)


def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise SystemExit(f"/proc/self/status has no {key}: this benchmark needs Linux")


class Sampler(threading.Thread):
    """VmRSS every `every` seconds: seconds since start and MB, in two arrays of doubles
    (16 bytes a sample: a list of tuples would add 11 MB per 100,000 samples to the very
    resident set it measures)."""

    def __init__(self, every: float = 0.01):
        super().__init__(daemon=True)
        self.every, self.stop = every, threading.Event()
        self.times, self.mb = array.array("d"), array.array("d")
        self.start_time = time.perf_counter()

    def run(self):
        while not self.stop.is_set():
            self.times.append(time.perf_counter() - self.start_time)
            self.mb.append(_status_kib("VmRSS") * 1024 / MB)
            self.stop.wait(self.every)

    def peak(self, a: float, b: float) -> float | None:
        inside = [mb for t, mb in zip(self.times, self.mb) if a <= t <= b]
        return max(inside) if inside else None


def child(args) -> int:
    """The streamed run, alone in its process: baseline, peak, time, per-block costs."""
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401  (imports first)
    from transformers.models.llama import modeling_llama  # noqa: F401

    from prunekit.oneshot import prune_folder

    calib = [{"input_ids": t} for _, t in sorted(load_file(args.calib).items(),
                                                  key=lambda kv: int(kv[0]))]
    base = _status_kib("VmRSS") * 1024 / MB
    Path("/proc/self/clear_refs").write_text("5")
    sampler = Sampler()
    load_start = list(os.getloadavg())
    sampler.start()
    start = time.perf_counter() - sampler.start_time
    report = prune_folder(args.src, args.dest, config(args.method), calib)
    seconds = time.perf_counter() - sampler.start_time - start
    peak = _status_kib("VmHWM") * 1024 / MB
    sampler.stop.set()
    sampler.join()
    blocks = []
    for b in report.blocks:
        end = start + b["end_s"]
        transform = sum(lr.seconds for lr in report.layers
                        if lr.name.startswith(b["block"] + "."))
        blocks.append({**b, "transform_s": transform, "stats_s": b["prune_s"] - transform,
                       "peak_rss_mb": sampler.peak(end - b["seconds"], end)})
    first = start + report.blocks[0]["end_s"] - report.blocks[0]["seconds"]
    out = {"baseline_rss_mb": base, "peak_rss_mb": peak, "peak_above_baseline_mb": peak - base,
           "seconds": seconds, "load_average": [load_start, list(os.getloadavg())],
           "sparsity": report.sparsity, "layers": len(report.layers), "blocks": blocks,
           "phase_peak_rss_mb": {"first block inputs": sampler.peak(start, first),
                                 "head and files": sampler.peak(start + report.blocks[-1]
                                                                ["end_s"], start + seconds)},
           "samples": len(sampler.mb)}
    Path(args.child_out).write_text(json.dumps(out))
    return 0


def block_shapes(hidden: int, mlp: int, kv: int) -> dict[str, tuple[int, int]]:
    """(out, in) of a Llama block's seven linear layers."""
    return {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
            "o_proj": (hidden, hidden), "gate_proj": (mlp, hidden), "up_proj": (mlp, hidden),
            "down_proj": (hidden, mlp)}


def memory_model(hidden: int, mlp: int, kv: int, tokens: int, batch_tokens: int) -> dict:
    """What one streamed SparseGPT block holds at its peak, in MB (float32 weights, float64
    Hessians): the block's weights and the engine's copy of them (restored on an error), the
    carried hidden states, every layer's input Hessian (the engine gathers the block's seven
    at once), SparseGPT's float32 working matrices for the widest input (damped H, its flip,
    Cholesky factor, inverse and flip back: 5 d x d) and one batch's pass through the block
    (about 3 MLP-wide and 8 hidden-wide float32 tensors per token)."""
    shapes = block_shapes(hidden, mlp, kv)
    weights = sum(o * i for o, i in shapes.values()) * 4 / MB
    widest = max(i for _, i in shapes.values())
    terms = {"block_weights": weights, "engine_copy": weights,
             "hidden_states": tokens * hidden * 4 / MB,
             "hessians": sum(i * i for _, i in shapes.values()) * 8 / MB,
             "sparsegpt_work": 5 * widest * widest * 4 / MB,
             "batch_pass": batch_tokens * (3 * mlp + 8 * hidden) * 4 / MB}
    terms["largest_hessian"] = widest * widest * 8 / MB
    terms["brief_sum"] = weights + terms["hidden_states"] + terms["largest_hessian"]
    terms["total"] = sum(terms[k] for k in ("block_weights", "engine_copy", "hidden_states",
                                            "hessians", "sparsegpt_work", "batch_pass"))
    return terms


def work_model(hidden: int, mlp: int, kv: int) -> dict:
    """Per block: multiply-adds of SparseGPT's transform (d_in^3 / 3 for the factorisations
    plus d_out d_in^2 for the sweep, per layer), of gathering the Hessians per token (d_in^2
    per layer) and of a forward pass per token (one per parameter)."""
    shapes = block_shapes(hidden, mlp, kv)
    return {"transform": sum(i ** 3 / 3 + o * i * i for o, i in shapes.values()),
            "stats": sum(i * i + o * i for o, i in shapes.values()),
            "params": sum(o * i for o, i in shapes.values())}


def extrapolate(blocks: list[dict], smol: dict, tokens: int, batch_tokens: int) -> dict:
    """70B per block and in all from SmolLM2's measured mean per-block seconds, each part
    scaled by its work (transform, statistics and forward, reading and writing) on the same
    machine: a CPU figure for these 2 shared cores, not a GPU estimate."""
    big = LLAMA_70B
    small_w = work_model(smol["hidden"], smol["mlp"], smol["kv"])
    big_w = work_model(big["hidden"], big["mlp"], big["kv"])
    ratio = {k: big_w[k] / small_w[k] for k in small_w}
    mean = {k: sum(b[k] for b in blocks) / len(blocks)
            for k in ("transform_s", "stats_s", "forward_s", "io_s")}
    per_block = (mean["transform_s"] * ratio["transform"] + mean["stats_s"] * ratio["stats"]
                 + (mean["forward_s"] + mean["io_s"]) * ratio["params"])
    mem = memory_model(big["hidden"], big["mlp"], big["kv"], tokens, batch_tokens)
    model_gb = (big["blocks"] * big_w["params"] + 2 * big["vocab"] * big["hidden"]) * 4 / 1e9
    return {"shape": big, "model_float32_gb": model_gb, "memory_mb": mem,
            "embedding_mb": big["vocab"] * big["hidden"] * 4 / MB, "work_ratio": ratio,
            "smollm2_mean_block_s": mean, "block_s": per_block,
            "total_h": per_block * big["blocks"] / 3600}


def compare(streamed, pruned) -> dict:
    from prunekit.layers import find_layers

    a, b = streamed.state_dict(), pruned.state_dict()
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    diff, mism = 0.0, 0
    for name in find_layers(pruned, exclude=HEAD):
        x, y = a[f"{name}.weight"], b[f"{name}.weight"]
        diff = max(diff, float((x - y).abs().max()))
        mism += int(((x == 0) != (y == 0)).sum())
    return {"all_tensors_equal": equal, "max_abs_diff": diff, "mask_mismatches": mism}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--method", choices=("sparsegpt", "wanda"), default="sparsegpt")
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "results.json"))
    for name in ("--child", "--src", "--dest", "--calib", "--child-out"):
        ap.add_argument(name, help=argparse.SUPPRESS,
                        **({"action": "store_true"} if name == "--child" else {}))
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    from safetensors.torch import save_file

    import prunekit
    from prunekit.bench.provenance import provenance, write_result
    from prunekit.evaluate import lm_perplexity
    from prunekit.models import calibration_batches, create, from_pretrained
    from prunekit.models.llm import save_pretrained

    sys.path.insert(0, str(HERE.parent))
    from llm_oneshot import _peak_mb, _peak_reset, _rss_mb, eval_ids  # a sibling script

    torch.set_num_threads(args.threads)
    prov = provenance(argv, script=__file__, threads=args.threads)
    dense = create("smollm2-135m", pretrained=True)
    calib = calibration_batches("smollm2-135m", n=args.calib_n, seq_len=args.seq_len, seed=0,
                                tokenizer=dense.tokenizer, batch_size=args.batch_size)
    model_mb = sum(p.numel() for p in dense.parameters()) * 4 / MB
    result = {"model": "smollm2-135m", "method": args.method, "config": repr(config(args.method)),
              "calibration": {"segments": args.calib_n, "seq_len": args.seq_len,
                              "batch_size": args.batch_size, "seed": 0,
                              "source": "wikitext2 validation"},
              "model_float32_mb": model_mb, "target_peak_above_baseline_mb": model_mb / 2}
    with tempfile.TemporaryDirectory(prefix="prunekit-llm-stream-") as tmp:
        tmp = Path(tmp)
        save_pretrained(dense, tmp / "src")
        save_file({str(i): b["input_ids"] for i, b in enumerate(calib)},
                  str(tmp / "calib.safetensors"))
        streamed = {}
        for alloc, env in ALLOCATORS.items():
            cmd = [sys.executable, str(HERE), "--child", "--method", args.method,
                   "--threads", str(args.threads), "--src", str(tmp / "src"),
                   "--dest", str(tmp / alloc), "--calib", str(tmp / "calib.safetensors"),
                   "--child-out", str(tmp / f"{alloc}.json")]
            run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
            if run.returncode:
                raise SystemExit(f"the streamed run ({alloc}) failed:\n{run.stderr[-3000:]}")
            got = json.loads((tmp / f"{alloc}.json").read_text())
            got["environment"] = env
            got["within_target"] = got["peak_above_baseline_mb"] <= model_mb / 2
            streamed[alloc] = got
            print(f"streamed ({alloc}): {got['seconds']:.0f} s, peak {got['peak_rss_mb']:.0f} "
                  f"MB, {got['peak_above_baseline_mb']:.0f} MB above the baseline "
                  f"{got['baseline_rss_mb']:.0f} MB (target {model_mb / 2:.0f})", flush=True)
        result["streamed"] = streamed

        model = copy.deepcopy(dense)
        base = _rss_mb() * 2**20 / MB
        reset = _peak_reset()
        start = time.perf_counter()
        prunekit.prune(model, config(args.method), calib, progress=False)
        result["in_memory"] = {
            "seconds": time.perf_counter() - start, "load_average": list(os.getloadavg()),
            "peak_above_start_mb": (_peak_mb() * 2**20 / MB - base) if reset else None,
            "note": "in the benchmark's own process, which holds the dense model as well"}
        out = from_pretrained(tmp / "mmap_threshold_1mib")
        result["equality"] = compare(from_pretrained(tmp / "system"), model)
        result["equality_mmap_threshold_1mib"] = compare(out, model)
        print(f"in memory: {result['in_memory']['seconds']:.0f} s; {result['equality']}",
              flush=True)
        ids, windows = eval_ids("steering8", dense.tokenizer)
        result["ppl_steering8"] = {name: lm_perplexity(m, ids, 1024, windows=windows)
                                   for name, m in (("dense", dense), ("in_memory", model),
                                                   ("streamed", out))}
        print(result["ppl_steering8"], flush=True)
    cfg = dense.config
    smol = dict(hidden=cfg.hidden_size, mlp=cfg.intermediate_size,
                kv=cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads)
    tokens, batch_tokens = args.calib_n * args.seq_len, args.batch_size * args.seq_len
    result["memory_model_smollm2_mb"] = memory_model(smol["hidden"], smol["mlp"], smol["kv"],
                                                     tokens, batch_tokens)
    result["extrapolation_70b"] = extrapolate(streamed["system"]["blocks"], smol, tokens,
                                              batch_tokens)
    out_path = Path(args.out)
    write_result(out_path, result, prov)
    ex = result["extrapolation_70b"]
    print(f"70B: about {ex['memory_mb']['total'] / 1e3:.1f} GB per block at the peak "
          f"(model {ex['model_float32_gb']:.0f} GB), {ex['block_s'] / 3600:.1f} h a block, "
          f"{ex['total_h']:.0f} h in all on this machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
