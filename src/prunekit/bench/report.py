"""Reports from a results store: terminal tables, PNG plots and one self-contained HTML file.

Runs that differ only by seed are grouped; each group shows the mean and standard deviation
over its seeds. Plots per model: quality vs compression, quality vs theoretical and measured
speedup, per-layer sparsity and error, and pruning time.
"""

from __future__ import annotations

import base64
import html
import io
import re
import statistics
from collections import defaultdict
from pathlib import Path

from prunekit.bench.store import ResultStore
from prunekit.errors import PruneError
from prunekit.io import atomic_write, atomic_write_text, check_output


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _amount(config: dict) -> str:
    if config["sparsity"] is not None:
        return f"{config['sparsity']:g}"
    if config["flops_target"] is not None:
        return f"{config['flops_target']:g}x FLOPs"
    return "pattern"


_NUM = (int, float, type(None))
#: The shape of a row as a report reads it: a type (or tuple of types); {key: shape}, where
#: the key `str` stands for every other key; [shape] for a list of that shape.
CONFIG_SHAPE = {"model": str, "method": str, "pattern": str, "options": dict, "sparsity": _NUM,
                "flops_target": _NUM, "seed": int, "latency_batch_sizes": [int],
                "eval_limit": (int, type(None)), "dataset": (str, type(None)),
                "eval_split": str, "calibration_samples": int}
RESULT_SHAPE = {"metric": str, "quality_before": {str: _NUM}, "quality_after": {str: _NUM},
                **{k: _NUM for k in ("sparsity", "compression", "compression_prunable",
                                     "theoretical_speedup", "prune_seconds", "peak_rss_mb",
                                     "peak_rss_growth_mb")},
                "latency": {"threads": int}, "env": {str: (str, int, float, bool, type(None))},
                "layers": [{"name": str, "sparsity": _NUM, "rel_error": _NUM}]}


def _misfit(value, shape, where: str) -> str | None:
    """The first place where `value` does not have `shape`, or None."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return where
        for k, v in value.items() if str in shape else ():
            if k not in shape and (bad := _misfit(v, shape[str], f"{where}.{k}")):
                return bad
        for k, sub in shape.items():
            if k is not str and (k not in value or (bad := _misfit(value[k], sub,
                                                                   f"{where}.{k}"))):
                return f"{where}.{k}" if k not in value else bad
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return where
        return next((bad for i, v in enumerate(value)
                     if (bad := _misfit(v, shape[0], f"{where}[{i}]"))), None)
    return None if isinstance(value, shape) else where


def check_rows(rows: list[dict], db) -> None:
    """Refuse, naming the database and the run, a row the report cannot read: one written by
    another version of prunekit, or edited by hand."""
    for row in rows:
        c, r = row["config"], row["result"]
        bad = _misfit(c, CONFIG_SHAPE, "config") or _misfit(r, RESULT_SHAPE, "result")
        if bad is None:  # what the row's own config and metric name
            speedups = {f"measured_speedup_b{b}": _NUM for b in c["latency_batch_sizes"]}
            bad = next((f"result.{k}[{r['metric']!r}]" for k in ("quality_before",
                                                                  "quality_after")
                        if not isinstance(r[k].get(r["metric"]), (int, float))), None) \
                or _misfit(r, speedups, "result")
        if bad is not None:
            raise PruneError(f"{db}: run {row['key']} has no readable {bad}; it was not "
                             f"written by this version of prunekit. Delete the row or report "
                             f"from another --db")


def group_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """Per model, one summary dict per (method, options, pattern, amount), mean/sd over seeds."""
    groups = defaultdict(list)
    for row in rows:
        c = dict(row["config"])
        seed = c.pop("seed")
        key = tuple(sorted((k, repr(v)) for k, v in c.items()))
        groups[key].append((seed, row))
    per_model = defaultdict(list)
    for members in groups.values():
        c = members[0][1]["config"]
        results = [r["result"] for _, r in members]
        metric = results[0]["metric"]
        bs = c["latency_batch_sizes"]
        summary = {"model": c["model"], "method": c["method"], "pattern": c["pattern"],
                   "options": c["options"], "amount": _amount(c), "metric": metric,
                   "seeds": sorted(s for s, _ in members), "config": c,
                   "layers": [r["layers"] for r in results]}
        fields = {"before": lambda r, m=metric: r["quality_before"][m],
                  "after": lambda r, m=metric: r["quality_after"][m],
                  "sparsity": lambda r: r["sparsity"],
                  "compression": lambda r: r["compression"],
                  "compression_prunable": lambda r: r["compression_prunable"],
                  "theoretical_speedup": lambda r: r["theoretical_speedup"],
                  "prune_seconds": lambda r: r["prune_seconds"],
                  "peak_rss_mb": lambda r: r["peak_rss_mb"],
                  "peak_rss_growth_mb": lambda r: r["peak_rss_growth_mb"]}
        for b in bs:
            fields[f"measured_speedup_b{b}"] = lambda r, b=b: r[f"measured_speedup_b{b}"]
        for name, get in fields.items():
            summary[name] = _mean_sd([get(r) for r in results])
        summary["latency_batches"] = bs
        summary["threads"] = results[0]["latency"]["threads"]
        extra = [k for k in results[0]["quality_after"] if k != metric]
        for k in extra:
            summary[f"after_{k}"] = _mean_sd([r["quality_after"][k] for r in results])
        per_model[c["model"]].append(summary)
    for items in per_model.values():
        items.sort(key=lambda s: (s["method"], s["pattern"] != "unstructured", s["pattern"],
                                  s["sparsity"][0]))
    return dict(per_model)


def _fmt(ms: tuple[float, float], digits: int = 2) -> str:
    m, s = ms
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table_rows(items: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of one model's table."""
    bs = items[0]["latency_batches"]
    metric = items[0]["metric"]
    head = ["method", "pattern", "target", "sparsity", f"{metric} dense", f"{metric} pruned",
            "compression", "compr. pruned layers", "theor. speedup"]
    head += [f"meas. speedup b{b}" for b in bs] + ["prune s", "prune +MiB", "seeds"]
    rows = []
    for s in items:
        rows.append([s["method"], s["pattern"], s["amount"], f"{s['sparsity'][0]:.3f}",
                     f"{s['before'][0]:.2f}", _fmt(s["after"]),
                     f"{s['compression'][0]:.2f}", f"{s['compression_prunable'][0]:.2f}",
                     f"{s['theoretical_speedup'][0]:.2f}"]
                    + [_fmt(s[f"measured_speedup_b{b}"]) for b in bs]
                    + [_fmt(s["prune_seconds"], 1), f"{s['peak_rss_growth_mb'][0]:.0f}",
                       str(len(s["seeds"]))])
    return head, rows


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def _log_scale(set_scale, values) -> None:
    """A log axis where every value can be drawn on one (matplotlib refuses data <= 0)."""
    set_scale("log" if all(v is not None and v > 0 for v in values) else "linear")


def _series(items):
    """Plot series: one per method and pattern kind (unstructured sweeps vs fixed patterns)."""
    series = defaultdict(list)
    for s in items:
        kind = "" if s["config"]["sparsity"] is not None or s["config"]["flops_target"] \
            else f" ({s['pattern']})"
        series[s["method"] + kind].append(s)
    return series


def _plots(model: str, items: list[dict]) -> dict[str, bytes]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = items[0]["metric"]
    dense = items[0]["before"][0]
    bs = items[0]["latency_batches"]
    series = _series(items)
    colors = {m: f"C{i}" for i, m in enumerate(sorted({s["method"] for s in items}))}
    pngs = {}

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        pngs[name] = buf.getvalue()

    def quality_axes(ax, xkey, xlabel, joined=True):
        for label, ss in sorted(series.items()):
            ss = sorted(ss, key=lambda s: s[xkey][0])
            fixed = "(" in label
            ax.errorbar([s[xkey][0] for s in ss], [s["after"][0] for s in ss],
                        yerr=[s["after"][1] for s in ss], xerr=[s[xkey][1] for s in ss],
                        label=label, color=colors[ss[0]["method"]], capsize=3,
                        marker="*" if fixed else "o", markersize=10 if fixed else 5,
                        linestyle="-" if joined and not fixed else "none")
        ax.axhline(dense, color="gray", linestyle="--", label="dense")
        _log_scale(ax.set_xscale, [s[xkey][0] for s in items])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (mean ± sd over seeds)")
        ax.grid(alpha=0.3)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    quality_axes(ax, "compression", "compression (all params / nonzero params)")
    ax.set_title(f"{model}: quality vs compression")
    ax.legend(fontsize=8)
    save(fig, "quality_vs_compression")

    fig, axes = plt.subplots(1, 1 + len(bs), figsize=(5.5 * (1 + len(bs)), 4.5))
    quality_axes(axes[0], "theoretical_speedup", "theoretical speedup (FLOPs)")
    for ax, b in zip(axes[1:], bs):
        quality_axes(ax, f"measured_speedup_b{b}", f"measured speedup, batch {b}", False)
        ax.set_xscale("linear")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model}: quality vs speedup (dense PyTorch kernels: zeros do not run "
                 f"faster)")
    save(fig, "quality_vs_speedup")

    top = {}
    for s in items:
        if s["config"]["sparsity"] is not None:
            cur = top.get(s["method"])
            if cur is None or s["sparsity"][0] > cur["sparsity"][0]:
                top[s["method"]] = s
    fixed = [s for s in items if s["config"]["sparsity"] is None
             and s["config"]["flops_target"] is None]
    if top or fixed:
        chosen = list(top.values()) + fixed
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(7, 0.35 * len(chosen[0]["layers"][0])
                                                       + 3), 7), sharex=True)
        for s in chosen:
            layers = s["layers"][0]
            x = range(len(layers))
            label = f"{s['method']} {s['pattern']} {s['amount']}"
            mark = "*" if s in fixed else "o"
            a1.plot(x, [lr["sparsity"] for lr in layers], marker=mark, label=label,
                    color=colors[s["method"]])
            errs = [statistics.fmean(run[i]["rel_error"] or 0.0 for run in s["layers"])
                    for i in range(len(layers))]
            a2.plot(x, [max(e, 1e-8) for e in errs], marker=mark, color=colors[s["method"]])
        names = [lr["name"] for lr in chosen[0]["layers"][0]]
        a2.set_xticks(range(len(names)), names, rotation=75, fontsize=7)
        a1.set_ylabel("layer sparsity")
        a2.set_ylabel("relative output error")
        a2.set_yscale("log")
        a1.legend(fontsize=7)
        a1.grid(alpha=0.3)
        a2.grid(alpha=0.3)
        a1.set_title(f"{model}: per-layer sparsity and error (highest target per method, "
                     f"and fixed patterns)")
        save(fig, "layer_sparsity")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, ss in sorted(series.items()):
        ss = sorted(ss, key=lambda s: s["sparsity"][0])
        ax.errorbar([s["sparsity"][0] for s in ss], [s["prune_seconds"][0] for s in ss],
                    yerr=[s["prune_seconds"][1] for s in ss], label=label, capsize=3,
                    color=colors[ss[0]["method"]], marker="*" if "(" in label else "o",
                    linestyle="none" if "(" in label else "-")
    _log_scale(ax.set_yscale, [s["prune_seconds"][0] for s in items])
    ax.set_xlabel("sparsity")
    ax.set_ylabel("pruning wall time, s")
    ax.set_title(f"{model}: pruning time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "prune_time")
    return pngs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;font-size:13px;margin-bottom:1.5em}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#eee}td:first-child,td:nth-child(2){text-align:left}
img{max-width:100%;display:block;margin:1em 0}code{background:#f4f4f4}"""


def write_report(db: str | Path, out: str | Path, prefix: str = "") -> dict:
    """Read `db` (read-only), write PNGs and report.html under `out`; returns
    {'text': terminal tables, 'html': path, 'pngs': [paths]}. `out` is checked first."""
    check_output(out, "report folder", folder=True)
    with ResultStore(db, readonly=True) as store:
        rows = store.rows()
        failed = store.rows(status="failed")
    if not rows:
        raise PruneError(f"{db} holds no finished runs; run `prunekit bench FILE --db {db}`")
    check_rows(rows, db)
    out = Path(out)
    per_model = group_rows(rows)
    text, body, pngs = [], [], []
    env = rows[-1]["result"]["env"]
    body.append(f"<h1>prunekit benchmark: {html.escape(Path(db).name)}</h1>")
    body.append(f"<p>{len(rows)} runs; environment of the last run: "
                f"{html.escape(', '.join(f'{k}={v}' for k, v in env.items()))}</p>")
    if failed:
        body.append(f"<p>{len(failed)} runs failed (see the database's error column).</p>")
    for model, items in sorted(per_model.items()):
        head, cells = table_rows(items)
        cfg = items[0]["config"]
        limit = "" if cfg["eval_limit"] is None else f" (first {cfg['eval_limit']})"
        note = (f"{model}: dataset {cfg['dataset']}, eval split {cfg['eval_split']}{limit}, "
                f"calibration {cfg['calibration_samples']} samples, latency threads "
                f"{items[0]['threads']}")
        text.append(note + "\n" + text_table(head, cells))
        body.append(f"<h2>{html.escape(model)}</h2><p>{html.escape(note)}</p><table><tr>"
                    + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
                    + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r)
                              + "</tr>" for r in cells) + "</table>")
        for name, png in _plots(model, items).items():
            path = out / f"{prefix}{_slug(model)}_{name}.png"
            atomic_write(path, lambda tmp, b=png: Path(tmp).write_bytes(b))
            pngs.append(path)
            b64 = base64.b64encode(png).decode()
            body.append(f'<img alt="{html.escape(model)} {name}" '
                        f'src="data:image/png;base64,{b64}">')
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>prunekit benchmark</title><style>{_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
    html_path = atomic_write_text(out / f"{prefix}report.html", page)
    return {"text": "\n\n".join(text), "html": html_path, "pngs": pngs}
