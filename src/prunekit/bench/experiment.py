"""Experiment files (TOML) and their expansion into a grid of runs.

A file names models, methods with their options, sparsities (or theoretical-speedup targets),
patterns and seeds; every combination is one run. Example::

    [experiment]
    name = "resnet20"
    models = ["resnet20-cifar10"]
    sparsities = [0.5, 0.9]
    patterns = ["unstructured", "2:4"]      # N:M patterns fix their own sparsity
    seeds = [0, 1, 2]
    calibration_samples = 128
    eval_limit = 2000                       # optional: first N test examples

    [[methods]]
    name = "sparsegpt"
    options = { blocksize = 64 }

Every mistake is reported with the file, the line and the valid names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from prunekit.errors import PruneError
from prunekit.oneshot import METHODS
from prunekit.patterns import get_pattern

#: Datasets a model can be benchmarked on (each registry model names its own).
DATASETS = ("cifar10", "digits", "stsb", "wikitext2")

#: [experiment] keys with their defaults; the grid axes are lists.
EXPERIMENT_KEYS = {
    "name": "experiment",
    "models": None,
    "sparsities": [],
    "flops_targets": [],
    "patterns": ["unstructured"],
    "seeds": [0],
    "calibration_samples": 128,
    "calibration_batch_size": 32,
    "eval_split": "test",
    "eval_limit": None,
    "reestimate_bn": False,
    "finetune_steps": 0,
    "finetune_lr": 0.01,
    "finetune_batch_size": 64,
    "latency_batch_sizes": [1, 32],
    "latency_warmup": 3,
    "latency_repeats": 10,
    "threads": 1,
}
METHOD_KEYS = ("name", "options", "models")


@dataclass(frozen=True)
class RunSpec:
    """One run's full configuration; its key identifies the run in the results store."""

    model: str
    dataset: str | None
    method: str
    options: dict
    pattern: str
    sparsity: float | None  # None: the pattern fixes it, or flops_target chooses it
    flops_target: float | None
    seed: int
    calibration_samples: int = 128
    calibration_batch_size: int = 32
    eval_split: str = "test"
    eval_limit: int | None = None
    reestimate_bn: bool = False
    finetune_steps: int = 0
    finetune_lr: float = 0.01
    finetune_batch_size: int = 64
    latency_batch_sizes: tuple[int, ...] = (1, 32)
    latency_warmup: int = 3
    latency_repeats: int = 10
    threads: int = 1
    experiment: str = field(default="experiment", compare=False)

    def config(self) -> dict:
        """Everything that defines the run (the experiment's name does not)."""
        d = dataclasses.asdict(self)
        d.pop("experiment")
        d["latency_batch_sizes"] = list(self.latency_batch_sizes)
        return d

    @property
    def key(self) -> str:
        text = json.dumps(self.config(), sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    @classmethod
    def from_config(cls, config: dict, experiment: str = "experiment") -> RunSpec:
        d = dict(config)
        d["latency_batch_sizes"] = tuple(d["latency_batch_sizes"])
        return cls(**d, experiment=experiment)

    def label(self) -> str:
        amount = (f"{self.sparsity:g}" if self.sparsity is not None else
                  f"{self.flops_target:g}x" if self.flops_target is not None else "-")
        return f"{self.model} {self.method} {self.pattern} {amount} seed={self.seed}"


class _Lines:
    """Finds the line of a key or value in the file's text, for error messages."""

    def __init__(self, path: Path, text: str):
        self.path, self.lines = path, text.splitlines()

    def of(self, *needles: str) -> int | None:
        for needle in needles:
            pat = re.compile(rf"(^|[\s{{,\[])[\"']?{re.escape(needle)}[\"']?\s*[=,\]}}]|"
                             rf"[\"']{re.escape(needle)}[\"']")
            for i, line in enumerate(self.lines, 1):
                if pat.search(line.split("#", 1)[0]):
                    return i
        return None

    def error(self, message: str, *needles: str) -> PruneError:
        line = self.of(*needles)
        where = f"{self.path}, line {line}" if line else str(self.path)
        return PruneError(f"{where}: {message}")


def load_experiment(path: str | Path) -> list[RunSpec]:
    """Read an experiment file and expand its grid; bad input raises PruneError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PruneError(f"cannot read experiment file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise PruneError(f"experiment file {path} is not UTF-8 text (byte {e.start}); give a "
                         f"TOML file") from e
    return parse_experiment(text, path)


def parse_experiment(text: str, path: str | Path = "<experiment>") -> list[RunSpec]:
    path = Path(path)
    lines = _Lines(path, text)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PruneError(f"{path}: not valid TOML: {e}") from e
    for key in doc:
        if key not in ("experiment", "methods"):
            raise lines.error(f"unknown section {key!r}; valid: [experiment], [[methods]]", key)
    exp = doc.get("experiment")
    if not isinstance(exp, dict):
        raise PruneError(f"{path}: missing the [experiment] table")
    for key in exp:
        if key not in EXPERIMENT_KEYS:
            raise lines.error(f"unknown option {key!r} in [experiment]; valid: "
                              f"{', '.join(EXPERIMENT_KEYS)}", key)
    opts = {k: exp.get(k, v) for k, v in EXPERIMENT_KEYS.items()}
    models = _models(opts["models"], lines)
    methods = doc.get("methods")
    if not isinstance(methods, list) or not methods:
        raise PruneError(f"{path}: no [[methods]] given; valid methods: "
                         f"{', '.join(sorted(METHODS))}")
    amounts = _amounts(opts, lines)
    patterns = _list(opts, "patterns", str, lines)
    for p in patterns:
        try:
            get_pattern(p)
        except PruneError as e:
            raise lines.error(f"{e} (valid: unstructured, unstructured:row, N:M, 1xN)", p) from e
    seeds = _list(opts, "seeds", int, lines)
    _check_scalars(opts, lines)
    runs = []
    for entry in methods:
        method, options, only = _method(entry, lines, models)
        for model, dataset in models:
            if only is not None and model not in only:
                continue
            for pattern in patterns:
                pat = get_pattern(pattern)
                if not isinstance(pat, METHODS[method].patterns):
                    raise lines.error(f"method {method} does not support pattern {pattern!r}; "
                                      f"it supports "
                                      f"{', '.join(c.__name__ for c in METHODS[method].patterns)}",
                                      pattern)
                grid = [(None, None)] if pat.implied_sparsity is not None else amounts
                for sparsity, target in grid:
                    for seed in seeds:
                        runs.append(RunSpec(
                            model, dataset, method, options, pattern, sparsity, target, seed,
                            opts["calibration_samples"], opts["calibration_batch_size"],
                            opts["eval_split"], opts["eval_limit"], opts["reestimate_bn"],
                            opts["finetune_steps"], opts["finetune_lr"],
                            opts["finetune_batch_size"],
                            tuple(_list(opts, "latency_batch_sizes", int, lines)),
                            opts["latency_warmup"], opts["latency_repeats"], opts["threads"],
                            experiment=str(opts["name"])))
    keys = {}
    for r in runs:
        if r.key in keys:
            raise lines.error(f"the grid holds the run {r.label()} twice; remove the duplicate "
                              f"sparsity, seed or method entry", r.method)
        keys[r.key] = r
    return runs


def _list(opts, key, kind, lines):
    value = opts[key]
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool)
                                              for v in value):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise lines.error(f"{key} must be a list of {names}, got {value!r}", key)
    return value


def _models(value, lines) -> list[tuple[str, str | None]]:
    from prunekit.models import get_info, list_models

    if value is None:
        raise lines.error("[experiment] needs models = [...]; known: "
                          + ", ".join(m.name for m in list_models()), "experiment")
    if not isinstance(value, list) or not value:
        raise lines.error("models must be a non-empty list of names or "
                          "{ name = ..., dataset = ... } tables", "models")
    out = []
    for item in value:
        name, dataset = (item, None) if isinstance(item, str) else (
            (item.get("name"), item.get("dataset")) if isinstance(item, dict) else (None, None))
        if not isinstance(name, str):
            raise lines.error(f"models: bad entry {item!r}: give a name or "
                              f"{{ name = ..., dataset = ... }}", "models")
        try:
            info = get_info(name)
        except PruneError as e:
            raise lines.error(f"models: {e}", name) from e
        if dataset is not None and dataset not in DATASETS:
            raise lines.error(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}",
                              dataset)
        if dataset is not None and dataset != info.dataset:
            raise lines.error(f"model {name} is evaluated on {info.dataset or 'no dataset'}, "
                              f"not {dataset!r}", dataset)
        out.append((name, info.dataset))
    return out


def _amounts(opts, lines) -> list[tuple[float | None, float | None]]:
    sparsities = _list(opts, "sparsities", (int, float), lines) if opts["sparsities"] else []
    targets = _list(opts, "flops_targets", (int, float), lines) if opts["flops_targets"] else []
    for s in sparsities:
        if not 0 <= s < 1:
            raise lines.error(f"sparsities: {s!r} is outside [0, 1)", str(s))
    for t in targets:
        if not 1 <= t < float("inf"):
            raise lines.error(f"flops_targets: {t!r} must be a speedup >= 1 (dense FLOPs / "
                              f"sparse FLOPs)", str(t))
    return [(float(s), None) for s in sparsities] + [(None, float(t)) for t in targets]


def _check_scalars(opts, lines) -> None:
    ints = ("calibration_samples", "calibration_batch_size", "finetune_steps",
            "finetune_batch_size", "latency_warmup", "latency_repeats", "threads")
    for key in ints:
        v = opts[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key in (
                "finetune_steps", "latency_warmup") else 1):
            raise lines.error(f"{key} must be a positive integer, got {v!r}", key)
    if not isinstance(opts["name"], str):
        raise lines.error(f"name must be a string, got {opts['name']!r}", "name")
    if opts["eval_limit"] is not None and (not isinstance(opts["eval_limit"], int)
                                           or isinstance(opts["eval_limit"], bool)
                                           or opts["eval_limit"] < 1):
        raise lines.error(f"eval_limit must be a positive integer, got {opts['eval_limit']!r}",
                          "eval_limit")
    if opts["eval_split"] not in ("test", "dev", "valid"):
        raise lines.error(f"eval_split must be test, dev or valid, got {opts['eval_split']!r}",
                          "eval_split")
    if not isinstance(opts["reestimate_bn"], bool):
        raise lines.error("reestimate_bn must be true or false", "reestimate_bn")
    lr = opts["finetune_lr"]
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < float("inf"):
        raise lines.error(f"finetune_lr must be a positive number, got {lr!r}", "finetune_lr")


def _method(entry, lines, models) -> tuple[str, dict, set | None]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise lines.error("each [[methods]] entry needs name = \"...\"; valid: "
                          + ", ".join(sorted(METHODS)), "methods")
    for key in entry:
        if key not in METHOD_KEYS:
            raise lines.error(f"unknown key {key!r} in [[methods]]; valid: "
                              f"{', '.join(METHOD_KEYS)}", key)
    name = entry["name"].lower()
    if name not in METHODS:
        raise lines.error(f"unknown method {entry['name']!r}; valid: "
                          f"{', '.join(sorted(METHODS))}", entry["name"])
    cls = METHODS[name]
    valid = [f.name for f in dataclasses.fields(cls)
             if f.init and f.name not in ("sparsity", "pattern")]
    options = entry.get("options", {})
    if not isinstance(options, dict):
        raise lines.error(f"options of {name} must be a table", "options")
    for key, value in options.items():
        if key not in valid:
            raise lines.error(f"unknown option {key!r} for method {name}; valid: "
                              f"{', '.join(valid)}", key)
        if isinstance(value, list):
            options[key] = tuple(value)
    try:
        cls(**options)
    except (PruneError, TypeError) as e:
        raise lines.error(f"bad options for {name}: {e}", *options) from e
    only = entry.get("models")
    if only is not None:
        known = {m for m, _ in models}
        if not isinstance(only, list) or any(m not in known for m in only):
            raise lines.error(f"models of method {name} must be a list drawn from the "
                              f"experiment's models: {', '.join(sorted(known))}", "models")
        only = set(only)
    return name, {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}, only
