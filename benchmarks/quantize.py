"""Post-training quantization: layer error and time (RTN, GPTQ, OBQ, and IST-DASLab/gptq's own
GPTQ class side by side), then model quality (MiniLM STS-B, ResNet-20 CIFAR-10 top-1) at
8, 4 and 3 bits, mixed precision at equal size, and joint sparse + quantized MiniLM.

Layer level (--part layers): the core shapes of benchmarks/layer_prune.py, with the same
layers (real MiniLM weights and WikiText-2 inputs for 384x384, 1536x384 and 384x1536;
synthetic weights and correlated inputs with outlier features for the others, which the rows
say). Each layer is quantized from 2048 calibration rows given H; the error is
||WX - W'X||^2 / ||WX||^2 on those rows and on 2048 held-out rows; a call is timed as the
median of three after the first (timed_steady). Settings: 4 bits per output channel, 4 bits in
groups of 128 (also with act_order), 3 bits in groups of 128, symmetric min-max grids.

The reference is the GPTQ class of IST-DASLab/gptq (the paper's code), imported from a local
copy of the repository: --gptq-ref DIR, or $GPTQ_REF, or the `fetch` mirror, which is
exported to a cache directory on first use. Its code is imported, never copied into prunekit;
without it the rows say so and the rest runs. It runs on the CPU with the H prunekit
computed (float32), its own dampening (1%) and block size (128); only its
torch.cuda.synchronize() call is made a no-op, and its prints are captured.

Exact OBQ costs O(in^3) a row: it runs (at W4 and W3 g128) on the 384x384 layer whole and on a
--obq-rows slice of the other layers of up to 1536 inputs (RTN, GPTQ and the reference run on
that slice too).

Model level (--part models): MiniLM (STS-B test Spearman; calibration: 128 STS-B dev
sentences) and ResNet-20 (CIFAR-10 test top-1; 128 CIFAR-10 train images), RTN against GPTQ
(sequential, block by block) at W8, W4, W3, per output channel and, for MiniLM, in groups
of 128 (ResNet-20's input sizes 27, 144, 288, 576 and 64 take no groups of 128). Mixed
precision: bits per layer from {2, 3, 4, 8, 16} by the DP on GPTQ's error database, against
uniform bits and the HAWQ-style trace sensitivity, at the size of uniform 3 bits. Joint:
MiniLM with SparseGPT 50% and 2:4, each alone and with int4:g128 in the same pass.

SmolLM2-135M (--part smollm2; the loader and perplexity of benchmarks/llm_oneshot.py):
perplexity at W8, W4 per channel, W4 g64 and W3 g64 for RTN and GPTQ (block by block, 32 x 512
calibration tokens from WikiText-2 validation), W4 g64 also with asymmetric grids, with
GPTQ's activation order and with scales from the MSE search over shrink factors, and
SparseGPT 50% and 2:4 alone and with int4:g64 in the same pass; lm_head (tied to the
embeddings) and the embeddings stay float.
Groups of 64, not 128: the hidden size 576 is no multiple of 128. --mixed adds mixed
precision at the size of uniform W3 g64 (bits per layer from {2, 3, 4, 8, 16} by the DP on
GPTQ's error database, against uniform W3 g64, the trace ordering and SPDY's search scored
by the loss on 4 calibration segments, each applied by GPTQ block by block). SmolLM2's
weights were stored as Q4_1 (asymmetric 4 bits in groups of 32); none of these grids is that
grid (the asymmetric rows use groups of 64), so none lands back
on it. Evaluation:
--lm-eval steering8 (8 windows of 1024 tokens spread over WikiText-2 test, the default) or
wikitext2 (the whole test set; hours on 2 cores).

    python benchmarks/quantize.py                       # everything, 2 threads
    python benchmarks/quantize.py --part layers --shapes 384x384
    python benchmarks/quantize.py --part models --quick # fewer evaluation examples
    python benchmarks/quantize.py --part smollm2 --lm-eval steering8
    python benchmarks/quantize.py --part smollm2 --mixed         # + mixed precision rows
    python benchmarks/quantize.py --part models --models resnet20-cifar10   # resumable
    python benchmarks/quantize.py --part minilm-w3 --threads 1   # why GPTQ W3 loses there

--part minilm-w3 (not in "all") looks into MiniLM at 3 bits per channel, where GPTQ scores
below RTN: every layer's error for RTN, GPTQ and the reference's GPTQ, the sentence
embeddings' error, and STS-B for GPTQ variants (run_minilm_w3 says what).

Results: benchmarks/results/quantize/{layers,models,smollm2,minilm_w3}.json (with provenance)
and .md tables. The SmolLM2 rows are resumable: finished rows are kept and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.bench.provenance import load_result, provenance, write_result
from prunekit.io import atomic_write_text
from prunekit.quant import quantize_layer

sys.path.insert(0, str(Path(__file__).parent))
from layer_prune import SHAPES, minilm_layers, rel_error, synthetic_layer, timed_steady  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "quantize"
MIRROR = Path("/work/.mirror/IST-DASLab+gptq/repo")
SETTINGS = [("W4", dict(bits=4)), ("W4 g128", dict(bits=4, group_size=128)),
            ("W4 g128 act", dict(bits=4, group_size=128, act_order=True)),
            ("W3 g128", dict(bits=3, group_size=128))]
#: exact OBQ runs on whole layers costing at most a 384x384 one (rows * in^3), and on a
#: --obq-rows slice of the others with up to 1536 inputs
OBQ_FULL_IN, OBQ_SLICE_IN = 384, 1536
OBQ_SETTINGS = ("W4", "W3 g128")


# -- the reference -----------------------------------------------------------------------

def reference_module(path: str | None):
    """IST-DASLab/gptq's gptq.py as a module and where it came from, or None and why."""
    folder = Path(path or os.environ.get("GPTQ_REF") or
                  Path.home() / ".cache" / "prunekit" / "gptq-reference")
    if not (folder / "gptq.py").exists() and MIRROR.exists() and not path:
        folder.mkdir(parents=True, exist_ok=True)  # export the fetched mirror to the cache
        for name in ("gptq.py", "quant.py"):
            text = subprocess.run(["git", "--git-dir", str(MIRROR), "show", f"HEAD:{name}"],
                                  capture_output=True, text=True, check=True).stdout
            (folder / name).write_text(text)
    if not (folder / "gptq.py").exists():
        return None, f"no copy of IST-DASLab/gptq at {folder} (pass --gptq-ref DIR)"
    sys.path.insert(0, str(folder))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            module = importlib.import_module("gptq")
    except Exception as e:  # noqa: BLE001 (whatever fails, the reference is skipped)
        return None, f"IST-DASLab/gptq did not import: {e}"
    finally:
        sys.path.remove(str(folder))
    return module, str(folder)


def reference_gptq(ref, w, h, bits, group_size=None, act_order=False):
    """The reference's GPTQ class on one layer given H; returns the quantized weight."""
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = w.clone()
    g = ref.GPTQ(layer)
    g.H = h.float().clone()
    g.quantizer = ref.Quantizer()
    g.quantizer.configure(bits, perchannel=True, sym=True, mse=False)
    sync = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: None  # a CPU run: nothing to wait for
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            g.fasterquant(blocksize=128, percdamp=0.01, groupsize=group_size or -1,
                          actorder=act_order, static_groups=act_order)
    finally:
        torch.cuda.synchronize = sync
    return layer.weight.data.clone()


# -- layer level -------------------------------------------------------------------------

def run_layers(args, prov) -> dict:
    ref, where = reference_module(args.gptq_ref)
    print(f"reference: {where if ref else 'skipped: ' + where}")
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    try:
        real = minilm_layers(args.rows)
    except (prunekit.PruneError, ImportError) as e:
        print(f"MiniLM or WikiText-2 unavailable ({e}); MiniLM shapes use synthetic data")
        real = {}
    rows_out = []
    payload = dict(reference=where if ref else None, rows=args.rows, results=rows_out)
    head = (f"{'shape':>10} {'source':<34} {'setting':<12} {'method':<10} {'time s':>8} "
            f"{'err calib':>10} {'err held':>10}")
    print(head)
    for i, shape in enumerate(shapes):
        source, w, x, held = real.get(shape) or synthetic_layer(shape, args.rows, seed=i)
        h = x.double().T @ x.double()
        full = shape[0] * shape[1] ** 3 <= OBQ_FULL_IN ** 4  # no dearer than 384x384
        layers = [(source, w, full)]
        if not full and shape[1] <= OBQ_SLICE_IN:
            g = torch.Generator().manual_seed(i)
            pick = torch.randperm(shape[0], generator=g)[:args.obq_rows].sort().values
            layers.append((f"{source}, {len(pick)}-row slice", w[pick], True))
        for (name, wl, with_obq), (label, opts) in ((a, b) for a in layers for b in SETTINGS):
            methods = ["rtn", "gptq"] + (["ist-gptq"] if ref is not None else [])
            if with_obq and label in OBQ_SETTINGS:
                methods.append("obq")
            for method in methods:
                new, secs, first = timed_steady(
                    lambda m=method, wl=wl, h=h, o=opts: quantize_one(m, wl, h, o, ref))
                row = dict(shape=f"{shape[0]}x{shape[1]}", source=name, setting=label,
                           method=method, rows=int(wl.shape[0]), seconds=secs,
                           first_call_seconds=first, err_calib=rel_error(wl, new, x),
                           err_heldout=rel_error(wl, new, held))
                rows_out.append(row)
                print(f"{row['shape']:>10} {name[:34]:<34} {label:<12} {method:<10} "
                      f"{secs:>8.3f} {row['err_calib']:>10.6f} {row['err_heldout']:>10.6f}",
                      flush=True)
            write_result(RESULTS / "layers.json", payload, prov)
    payload["versus_reference"] = versus_reference(rows_out)
    write_result(RESULTS / "layers.json", payload, prov)
    write_layer_table(payload, prov)
    return payload


def quantize_one(method: str, w, h, opts: dict, ref):
    """The quantized weight of one layer by one method (given H)."""
    if method == "ist-gptq":
        return reference_gptq(ref, w, h, **opts)
    if method == "rtn":
        return quantize_layer(w, None, prunekit.RTN(bits=opts["bits"],
                                                    group_size=opts.get("group_size")))[0]
    cls = {"gptq": prunekit.GPTQ, "obq": prunekit.OBQ}[method]
    return quantize_layer(w, h, cls(**opts))[0]


def versus_reference(rows) -> list[dict]:
    """prunekit's GPTQ against the reference on each layer and setting: error ratio and
    speedup (reference time / prunekit time)."""
    out = []
    index = {(r["shape"], r["source"], r["setting"], r["method"]): r for r in rows}
    for (shape, source, setting, method), r in index.items():
        if method != "gptq" or (shape, source, setting, "ist-gptq") not in index:
            continue
        b = index[(shape, source, setting, "ist-gptq")]
        out.append(dict(shape=shape, source=source, setting=setting,
                        err_ratio=r["err_calib"] / b["err_calib"],
                        speedup=b["seconds"] / r["seconds"]))
    return out


def write_layer_table(payload, prov) -> None:
    lines = [f"Layer-level quantization, {prov['threads']} threads, {prov['cpu']}, "
             f"torch {prov['torch']}, commit {prov['git_commit']}",
             f"`{prov['command']}`", "",
             "| shape | source | setting | RTN err | GPTQ err | IST-GPTQ err | OBQ err | "
             "GPTQ s | IST-GPTQ s | OBQ s | err GPTQ/IST | speedup vs IST |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in payload["results"]:
        groups.setdefault((r["shape"], r["source"], r["setting"]), {})[r["method"]] = r
    for (shape, source, setting), m in groups.items():
        e = {k: f"{r['err_calib']:.5f}" for k, r in m.items()}
        t = {k: f"{r['seconds']:.3f}" for k, r in m.items()}
        ratio = (f"{m['gptq']['err_calib'] / m['ist-gptq']['err_calib']:.4f}"
                 if "ist-gptq" in m else "-")
        speed = (f"{m['ist-gptq']['seconds'] / m['gptq']['seconds']:.2f}x"
                 if "ist-gptq" in m else "-")
        cells = [e.get("rtn"), e.get("gptq"), e.get("ist-gptq"), e.get("obq"), t.get("gptq"),
                 t.get("ist-gptq"), t.get("obq"), ratio, speed]
        lines.append(f"| {shape} | {source} | {setting} | "
                     + " | ".join(c or "-" for c in cells) + " |")
    atomic_write_text(RESULTS / "layers.md", "\n".join(lines) + "\n")


# -- model level -------------------------------------------------------------------------

def _models(quick: bool, wanted=("minilm", "resnet20-cifar10")):
    from prunekit.models import calibration_batches, create

    limit = 500 if quick else None
    out = {}
    try:
        if "minilm" not in wanted:
            raise ImportError("not chosen (--models)")
        model = create("minilm", pretrained=True)
        out["minilm"] = (model, calibration_batches("minilm", n=128, seed=0), "stsb", limit)
    except (prunekit.PruneError, ImportError) as e:
        print(f"MiniLM skipped: {e}")
    try:
        if "resnet20-cifar10" not in wanted:
            raise ImportError("not chosen (--models)")
        model = create("resnet20-cifar10", pretrained=True)
        out["resnet20-cifar10"] = (model, calibration_batches("resnet20-cifar10", n=128,
                                                              seed=0), "cifar10",
                                   2000 if quick else None)
    except (prunekit.PruneError, ImportError) as e:
        print(f"ResNet-20 skipped: {e}")
    return out


def _score(model, dataset, limit) -> float:
    from prunekit.evaluate import evaluate

    metrics = evaluate(model, dataset=dataset, limit=limit)
    return float(metrics.get("stsb_spearman", metrics.get("top1")))


def run_models(args, prov) -> dict:
    """Resumable: a (model, setting, method) row already in models.json is kept and not run
    again; --models chooses the models."""
    from prunekit.quant import mixed

    path = RESULTS / "models.json"
    payload = load_result(path)
    rows = payload.setdefault("results", [])
    have = {(r["model"], r["setting"], r["method"]): r for r in rows}
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]

    def record(model_name, what, method, score, dense, seconds, extra=None):
        row = dict(model=model_name, setting=what, method=method, score=score,
                   dense=dense, delta=score - dense, seconds=seconds,
                   load_average=list(os.getloadavg()), commit=prov["git_commit"],
                   **(extra or {}))
        rows.append(row)
        have[(model_name, what, method)] = row
        print(f"{model_name:<18} {what:<24} {method:<12} {score:8.4f}  (dense {dense:.4f}, "
              f"{score - dense:+.4f}) {seconds:7.1f} s", flush=True)
        write_result(path, payload, prov)

    for name, (model, calib, dataset, limit) in _models(args.quick, wanted).items():
        if (name, "dense", "-") in have:
            dense = have[(name, "dense", "-")]["score"]
        else:
            dense = _score(model, dataset, limit)
            record(name, "dense", "-", dense, dense, 0.0)
        groups = [None, 128] if name == "minilm" else [None]
        # block by block: MiniLM's encoder layers; ResNet-20's residual blocks (no ModuleList)
        blocks = None if name == "minilm" else ("layer*.*",)
        for bits in (8, 4, 3):
            for group in groups:
                label = f"W{bits}" + (f" g{group}" if group else "")
                for cfg in (prunekit.RTN(bits=bits, group_size=group),
                            prunekit.GPTQ(bits=bits, group_size=group, sequential=True,
                                          blocks=blocks)):
                    if (name, label, cfg.method) in have:
                        continue
                    m = copy.deepcopy(model)
                    start = time.perf_counter()
                    prunekit.quantize(m, cfg, calib, progress=False)
                    seconds = time.perf_counter() - start
                    record(name, label, cfg.method, _score(m, dataset, limit), dense, seconds)
        # mixed precision at the size of uniform 3 bits (g128 for MiniLM, per channel else)
        group = 128 if name == "minilm" else None
        what = f"mixed @ size(W3{' g128' if group else ''})"
        kinds = ("uniform", "measured", "trace")
        if not all((name, what, f"gptq {k}") in have for k in kinds):
            base = prunekit.GPTQ(group_size=group)
            start = time.perf_counter()
            db = mixed.database(model, base, calib, progress=False)
            db_time = time.perf_counter() - start
            budget = db.size(3)
            for alloc in (db.uniform(3), db.allocate(budget), db.allocate(budget, "trace")):
                if (name, what, f"gptq {alloc.sensitivity}") in have:
                    continue
                m = copy.deepcopy(model)
                start = time.perf_counter()
                prunekit.quantize(m, base, calib, budget=alloc.bits, progress=False)
                seconds = time.perf_counter() - start
                hist = {b: sum(1 for v in alloc.bits.values() if v == b) for b in db.levels}
                record(name, what, f"gptq {alloc.sensitivity}", _score(m, dataset, limit),
                       dense, seconds,
                       dict(mean_bits=alloc.mean_bits, size_bits=alloc.size_bits,
                            budget_bits=budget, db_error=alloc.error, layers_at_bits=hist,
                            database_seconds=db_time))
        if name == "minilm":
            for label, kw in (("50%", dict(sparsity=0.5)), ("2:4", dict(pattern="2:4"))):
                for quant in (None, "int4:g128"):
                    what = f"{label}" + (f" + {quant}" if quant else "")
                    if (name, what, "sparsegpt") in have:
                        continue
                    m = copy.deepcopy(model)
                    cfg = prunekit.SparseGPT(**kw, quant=quant, sequential=True)
                    start = time.perf_counter()
                    prunekit.prune(m, cfg, calib, progress=False)
                    seconds = time.perf_counter() - start
                    record(name, what, "sparsegpt", _score(m, dataset, limit), dense, seconds)
    write_result(path, payload, prov)
    write_model_table(payload, prov)
    return payload


def write_model_table(payload, prov) -> None:
    lines = [f"Model-level quantization, {prov['threads']} threads, {prov['cpu']}, "
             f"commit {prov['git_commit']}", f"`{prov['command']}`", "",
             "| model | setting | method | score | dense | delta | mean bits |",
             "|---|---|---|---|---|---|---|"]
    for r in payload["results"]:
        bits = f"{r['mean_bits']:.3f}" if "mean_bits" in r else ""
        lines.append(f"| {r['model']} | {r['setting']} | {r['method']} | {r['score']:.4f} | "
                     f"{r['dense']:.4f} | {r['delta']:+.4f} | {bits} |")
    atomic_write_text(RESULTS / "models.md", "\n".join(lines) + "\n")


def smollm2_rows() -> list[tuple[str, object]]:
    """(row name, config or None for dense), cheapest first."""
    head = ("lm_head",)
    out: list[tuple[str, object]] = [("dense", None)]
    for label, kw in (("W8", dict(bits=8)), ("W4", dict(bits=4)),
                      ("W4 g64", dict(bits=4, group_size=64)),
                      ("W3 g64", dict(bits=3, group_size=64))):
        out.append((f"rtn {label}", prunekit.RTN(**kw, exclude=head)))
        out.append((f"gptq {label}", prunekit.GPTQ(**kw, exclude=head, sequential=True)))
    # W4 g64 beside the symmetric min-max rows: activation order, asymmetric grids, both
    for label, kw in (("W4 g64 asym", dict(bits=4, group_size=64, sym=False)),):
        out.append((f"rtn {label}", prunekit.RTN(**kw, exclude=head)))
    for label, kw in (("W4 g64 act_order", dict(bits=4, group_size=64, act_order=True)),
                      ("W4 g64 asym", dict(bits=4, group_size=64, sym=False)),
                      ("W4 g64 asym act_order", dict(bits=4, group_size=64, sym=False,
                                                     act_order=True))):
        out.append((f"gptq {label}", prunekit.GPTQ(**kw, exclude=head, sequential=True)))
    # scales and zero points by the MSE search over shrink factors instead of min-max
    mse = dict(bits=4, group_size=64, sym=False, search="mse")
    out.append(("rtn W4 g64 asym mse", prunekit.RTN(**mse, exclude=head)))
    out.append(("gptq W4 g64 asym act_order mse",
                prunekit.GPTQ(**mse, act_order=True, exclude=head, sequential=True)))
    for label, kw in (("50%", dict(sparsity=0.5)), ("2:4", dict(pattern="2:4"))):
        for quant in (None, "int4:g64"):
            name = f"sparsegpt {label}" + (f" + {quant}" if quant else "")
            out.append((name, prunekit.SparseGPT(**kw, quant=quant, exclude=head,
                                                 sequential=True)))
    return out


def run_smollm2(args, prov) -> dict:
    from llm_oneshot import eval_ids
    from prunekit.evaluate import lm_perplexity
    from prunekit.models import calibration_batches, create

    path = RESULTS / "smollm2.json"
    payload = load_result(path)
    rows = {r["row"]: r for r in payload.get("results", []) if r.get("eval") == args.lm_eval}
    others = [r for r in payload.get("results", []) if r.get("eval") != args.lm_eval]
    dense = create("smollm2-135m", pretrained=True)
    ids, windows = eval_ids(args.lm_eval, dense.tokenizer)
    calib = calibration_batches("smollm2-135m", n=32, seq_len=512, seed=0,
                                tokenizer=dense.tokenizer)
    for name, cfg in smollm2_rows():
        if name in rows:
            continue
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        if isinstance(cfg, prunekit.quant.QuantConfig):
            prunekit.quantize(model, cfg, calib if cfg.needs != "none" else None,
                              progress=False)
        elif cfg is not None:
            prunekit.prune(model, cfg, calib, progress=False)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        ppl = lm_perplexity(model, ids, 1024, windows=windows)
        rows[name] = dict(row=name, eval=args.lm_eval, perplexity=ppl, seconds=seconds,
                          eval_seconds=time.perf_counter() - start, commit=prov["git_commit"])
        print(f"smollm2 {name:<28} ppl {ppl:8.3f}  ({seconds:.1f} s)", flush=True)
        payload["results"] = others + list(rows.values())
        write_result(path, payload, prov)
        del model
    if args.mixed:
        _smollm2_mixed(args, prov, dense, calib, ids, windows, rows, others, payload, path)
    dense_ppl = rows["dense"]["perplexity"]
    lines = [f"SmolLM2-135M perplexity ({args.lm_eval}), commit {prov['git_commit']}, "
             f"{prov['threads']} threads", f"`{prov['command']}`", "",
             "| row | perplexity | vs dense | seconds |", "|---|---|---|---|"]
    for name in [n for n, _ in smollm2_rows()] + [n for n in rows if n.startswith("mixed")]:
        if name in rows:
            r = rows[name]
            lines.append(f"| {name} | {r['perplexity']:.3f} | "
                         f"{r['perplexity'] / dense_ppl - 1:+.2%} | {r['seconds']:.1f} |")
    atomic_write_text(RESULTS / "smollm2.md", "\n".join(lines) + "\n")
    return payload


#: SPDY's search for the mixed-precision rows: candidate allocations scored by the language
#: model loss on the first SEARCH_SEGMENTS calibration segments
SEARCH_STEPS, SEARCH_SEGMENTS = 60, 4


def _smollm2_mixed(args, prov, dense, calib, ids, windows, rows, others, payload, path):
    """Bits per layer from {2, 3, 4, 8, 16} at the size of uniform W3 g64: the DP on GPTQ's
    error database (one calibration of the dense model), against uniform W3 g64, the
    HAWQ-style trace ordering and SPDY's search (per-layer coefficients on the database
    errors, each candidate scored by the loss on SEARCH_SEGMENTS calibration segments with
    the database's weights written in) at the same size; each allocation then applied by
    GPTQ block by block, as the uniform rows are."""
    from prunekit.batches import first_rows
    from prunekit.evaluate import lm_perplexity
    from prunekit.quant import mixed

    kinds = ("uniform", "measured", "trace", "searched")
    names = {k: f"mixed @ size(W3 g64) gptq {k}" for k in kinds}
    if all(n in rows for n in names.values()):
        return
    head = ("lm_head",)
    start = time.perf_counter()
    db = mixed.database(dense, prunekit.GPTQ(group_size=64, exclude=head), calib,
                        progress=False, keep_weights=names["searched"] not in rows)
    db_seconds = time.perf_counter() - start
    budget = db.size(3)
    apply_cfg = prunekit.GPTQ(group_size=64, exclude=head, sequential=True)
    allocs = [db.uniform(3), db.allocate(budget), db.allocate(budget, "trace")]
    search = {}
    if names["searched"] not in rows:
        segs = first_rows(calib[0], SEARCH_SEGMENTS)["input_ids"]

        def lm_loss(model):
            with torch.inference_mode():
                return float(model(input_ids=segs, labels=segs).loss)

        start = time.perf_counter()
        found = db.search(dense, budget, loss=lm_loss, steps=SEARCH_STEPS, seed=0,
                          progress=False)
        search = dict(search_seconds=time.perf_counter() - start, search_steps=SEARCH_STEPS,
                      search_segments=SEARCH_SEGMENTS, search_loss=found.loss,
                      search_loss_plain_dp=found.history[0],
                      search_loss_uniform=db.loss_at(dense, db.uniform(3).bits, lm_loss))
        allocs.append(found)
        db.quantized = None
    for alloc in allocs:
        name = names[alloc.sensitivity]
        if name in rows:
            continue
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        prunekit.quantize(model, apply_cfg, calib, budget=alloc.bits, progress=False)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        ppl = lm_perplexity(model, ids, 1024, windows=windows)
        hist = {b: sum(1 for v in alloc.bits.values() if v == b) for b in db.levels}
        rows[name] = dict(row=name, eval=args.lm_eval, perplexity=ppl, seconds=seconds,
                          eval_seconds=time.perf_counter() - start, commit=prov["git_commit"],
                          mean_bits=alloc.mean_bits, size_bits=alloc.size_bits,
                          budget_bits=budget, db_error=alloc.error, layers_at_bits=hist,
                          database_seconds=db_seconds, load_average=list(os.getloadavg()),
                          **(search if alloc.sensitivity == "searched" else {}))
        print(f"smollm2 {name:<28} ppl {ppl:8.3f} mean bits {alloc.mean_bits:.3f} "
              f"({seconds:.1f} s)", flush=True)
        payload["results"] = others + list(rows.values())
        write_result(path, payload, prov)
        del model


def run_minilm_w3(args, prov) -> dict:
    """Why GPTQ loses to RTN on MiniLM at 3 bits per output channel (STS-B), on the facts:
    each encoder layer's output error for RTN, prunekit's GPTQ (with and without act_order)
    and IST-DASLab/gptq's GPTQ class given the same H, on the 128 calibration sentences and
    256 held-out STS-B dev sentences (inputs of the dense model; relative squared error, and
    the median over tokens of each token's relative error); the sentence embeddings' error
    against dense; and STS-B for GPTQ variants: calibration size, act_order, dampening, not
    block by block."""
    from prunekit.batches import run_batch
    from prunekit.evaluate import evaluate
    from prunekit.models import calibration_batches, create

    ref, where = reference_module(args.gptq_ref)
    model = create("minilm", pretrained=True).eval()
    calib = calibration_batches("minilm", n=128, seed=0)
    held = calibration_batches("minilm", n=256, seed=1)
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def inputs(batches):
        xs = {n: [] for n in linear}
        hooks = [m.register_forward_pre_hook(
            lambda mod, a, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
            for n, m in linear.items()]
        with torch.no_grad():
            for b in batches:
                run_batch(model, b)
        for h in hooks:
            h.remove()
        return {n: torch.cat(v) for n, v in xs.items()}

    def errors(w, q, x):
        num, den = ((x @ (w - q).T) ** 2).sum(1), ((x @ w.T) ** 2).sum(1)
        return float(num.sum() / den.sum()), float((num / den).median())

    x_cal, x_held = inputs(calib), inputs(held)
    layers = []
    for name, m in linear.items():
        w, x = m.weight.detach().clone(), x_cal[name]
        qs = {"rtn": quantize_layer(w, None, prunekit.RTN(bits=3))[0],
              "gptq": quantize_layer(w, x, prunekit.GPTQ(bits=3))[0],
              "gptq act_order": quantize_layer(w, x, prunekit.GPTQ(bits=3, act_order=True))[0]}
        if ref is not None:
            qs["ist-gptq"] = reference_gptq(ref, w, x.double().T @ x.double(), 3)
        row = {"layer": name}
        for k, q in qs.items():
            row[k] = dict(zip(("calib", "calib_token_median"), errors(w, q, x)))
            row[k].update(zip(("held", "held_token_median"), errors(w, q, x_held[name])))
        layers.append(row)
        print(f"{name:<46} " + " ".join(f"{k} {v['calib']:.4f}/{v['held']:.4f}"
                                          for k, v in row.items() if k != "layer"), flush=True)

    def embeddings(m):
        out = []
        with torch.no_grad():
            for b in held:
                out.append(run_batch(m, b))  # prunekit's MiniLM gives sentence embeddings
        return torch.cat(out)

    e_dense = embeddings(model)
    variants = {"rtn": (prunekit.RTN(bits=3), 128),
                "gptq": (prunekit.GPTQ(bits=3, sequential=True), 128),
                "gptq, 512 calibration sentences": (prunekit.GPTQ(bits=3, sequential=True),
                                                    512),
                "gptq act_order": (prunekit.GPTQ(bits=3, act_order=True, sequential=True), 128),
                "gptq dampening 0.1": (prunekit.GPTQ(bits=3, dampening=0.1, sequential=True),
                                       128),
                "gptq dampening_rule input": (prunekit.GPTQ(bits=3, dampening_rule="input",
                                                            sequential=True), 128),
                "gptq not block by block": (prunekit.GPTQ(bits=3), 128)}
    models = []
    for name, (cfg, n) in variants.items():
        m = copy.deepcopy(model)
        prunekit.quantize(m, cfg, calibration_batches("minilm", n=n, seed=0), progress=False)
        d = embeddings(m) - e_dense
        row = dict(variant=name, calib_sentences=n,
                   stsb=float(evaluate(m, dataset="stsb")["stsb_spearman"]),
                   embedding_rel_error=float(d.norm() / e_dense.norm()),
                   embedding_cosine=float(torch.nn.functional.cosine_similarity(
                       e_dense + d, e_dense).mean()))
        models.append(row)
        print(f"{name:<34} STS-B {row['stsb']:.2f}  embedding error "
              f"{row['embedding_rel_error']:.3f}  cosine {row['embedding_cosine']:.3f}",
              flush=True)
    payload = dict(reference=where if ref else None, dense_stsb=float(
        evaluate(model, dataset="stsb")["stsb_spearman"]), layers=layers, models=models)
    write_result(RESULTS / "minilm_w3.json", payload, prov)
    return payload


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--part", default="all",
                    choices=("layers", "models", "smollm2", "minilm-w3", "all"))
    ap.add_argument("--lm-eval", default="steering8", choices=("steering8", "wikitext2"),
                    help="SmolLM2's evaluation set (see the docstring)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2048, help="calibration / held-out rows")
    ap.add_argument("--shapes", help="comma-separated OUTxIN shapes (default: all)")
    ap.add_argument("--obq-rows", type=int, default=16,
                    help="rows of the slice OBQ runs on for layers of 385 to 1536 inputs")
    ap.add_argument("--gptq-ref", help="directory holding IST-DASLab/gptq's gptq.py, quant.py")
    ap.add_argument("--quick", action="store_true", help="model level: fewer test examples")
    ap.add_argument("--models", default="minilm,resnet20-cifar10",
                    help="model level: comma-separated models (minilm, resnet20-cifar10)")
    ap.add_argument("--mixed", action="store_true",
                    help="SmolLM2: also mixed precision at the size of uniform W3 g64 (DP on "
                         "GPTQ's error database against uniform bits and the trace ordering)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prov = provenance(argv)
    if args.part in ("layers", "all"):
        run_layers(args, prov)
    if args.part in ("models", "all"):
        run_models(args, prov)
    if args.part in ("smollm2", "all"):
        run_smollm2(args, prov)
    if args.part == "minilm-w3":
        run_minilm_w3(args, prov)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
