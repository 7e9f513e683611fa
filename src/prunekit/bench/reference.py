"""The authors' own code, for side-by-side benchmarks: found, imported, never copied.

A benchmark that compares prunekit with a published implementation (IST-DASLab/sparsegpt's
`SparseGPT` class, locuslab/wanda's `prune_wanda`) imports that code from a local copy of its
repository. The copy is looked for in $PRUNEKIT_REFERENCE/<name> (default
~/.cache/prunekit/reference/<name>): a plain clone or a folder of its files. When it is not
there but a git mirror of the repository is ($PRUNEKIT_MIRRORS/<owner>+<repo>/repo, a bare
clone), the files the benchmark needs are exported from the mirror's HEAD into that folder,
with the commit written beside them. Nothing here is part of prunekit's methods: when no copy
exists the benchmark skips its reference side and prints how to get one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Reference:
    name: str
    repo: str  # owner/name on GitHub
    files: tuple[str, ...]  # what the benchmarks import, relative to the repository root


REFERENCES = {
    "sparsegpt": Reference("sparsegpt", "IST-DASLab/sparsegpt", ("sparsegpt.py", "quant.py")),
    "wanda": Reference("wanda", "locuslab/wanda", (
        "lib/prune.py", "lib/sparsegpt.py", "lib/layerwrapper.py",
        "lib/data.py", "lib/ablate.py")),
}
COMMIT_FILE = "REFERENCE_COMMIT"


def cache_root() -> Path:
    return Path(os.environ.get("PRUNEKIT_REFERENCE")
                or Path.home() / ".cache" / "prunekit" / "reference")


def _mirror(ref: Reference) -> Path:
    owner, name = ref.repo.split("/")
    return Path(os.environ.get("PRUNEKIT_MIRRORS", "/work/.mirror")) / f"{owner}+{name}" / "repo"


def _git(git_dir: Path, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", str(git_dir), *args], capture_output=True,
                          text=True, check=True).stdout


def locate(name: str, folder: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """(folder holding the reference's files, where it came from), or (None, why not)."""
    ref = REFERENCES[name]
    target = Path(folder) if folder else cache_root() / name
    if all((target / f).exists() for f in ref.files):
        return target, f"{ref.repo} at {target} (commit {commit_of(target) or 'unknown'})"
    mirror = _mirror(ref)
    if folder is None and mirror.exists():
        try:
            head = _git(mirror, "rev-parse", "HEAD").strip()
            for f in ref.files:
                text = _git(mirror, "show", f"HEAD:{f}")
                (target / f).parent.mkdir(parents=True, exist_ok=True)
                (target / f).write_text(text)
            (target / COMMIT_FILE).write_text(head + "\n")
        except (OSError, subprocess.CalledProcessError) as e:
            return None, f"could not export {ref.repo} from {mirror}: {e}"
        return target, f"{ref.repo} at {target} (exported from {mirror}, commit {head})"
    return None, (f"no copy of {ref.repo} at {target}: git clone https://github.com/{ref.repo} "
                  f"{target} (or set PRUNEKIT_REFERENCE)")


def commit_of(folder: Path) -> str | None:
    if (folder / COMMIT_FILE).exists():
        return (folder / COMMIT_FILE).read_text().strip()
    if (folder / ".git").exists():
        try:
            return _git(folder / ".git", "rev-parse", "HEAD").strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    return None


def import_file(folder: Path, relpath: str, as_name: str, stubs: dict | None = None):
    """Import folder/relpath as module `as_name`, with the folder first on sys.path while it
    runs (its own absolute imports, e.g. sparsegpt.py's `from quant import *`, resolve there)
    and any module it imports under a name prunekit's process already uses put back after.
    `stubs` names modules to stand in while importing (an optional dependency the benchmark
    never calls, such as `datasets` for wanda's data loaders)."""
    before = dict(sys.modules)
    sys.path.insert(0, str(folder))
    for k, v in (stubs or {}).items():
        sys.modules.setdefault(k, v)
    try:
        path = folder / relpath
        package = relpath.count("/") > 0
        if package:  # a module inside a package (relative imports): import the package path
            dotted = relpath[:-3].replace("/", ".")
            module = importlib.import_module(dotted)
        else:
            spec = importlib.util.spec_from_file_location(as_name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
        for k in list(sys.modules):  # the reference's own top-level names go; its module stays
            if k not in before:
                del sys.modules[k]
        sys.modules.update({k: v for k, v in before.items() if sys.modules.get(k) is not v})
    sys.modules[as_name] = module
    return module


def stub_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


@contextlib.contextmanager
def cpu_run():
    """The reference code calls torch.cuda.synchronize() to time itself; on a CPU there is
    nothing to wait for (and the call would raise), so it is a no-op while this is open."""
    sync = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        yield
    finally:
        torch.cuda.synchronize = sync


def sparsegpt_layer(module, w: torch.Tensor, h: torch.Tensor, sparsity: float, n: int = 0,
                    m: int = 0, dampening: float = 0.01, blocksize: int = 128):
    """A callable that prunes (out, in) w with the reference's own SparseGPT class given
    H = X^T X (its add_batch would give 2/rows X^T X: a scale the result does not depend on)
    and returns the pruned weight; what it builds first is not part of the timed call."""
    import io

    from torch import nn

    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = w.detach().float().clone()
    pruner = module.SparseGPT(layer)
    pruner.H = h.detach().float().clone()

    def run() -> torch.Tensor:
        with cpu_run(), contextlib.redirect_stdout(io.StringIO()):
            pruner.fasterprune(sparsity, prunen=n, prunem=m, blocksize=blocksize,
                               percdamp=dampening)
        return layer.weight.data

    return run
