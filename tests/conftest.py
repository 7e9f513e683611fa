import ast
import inspect
import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("PRUNEKIT_PROGRESS", "0")

# The fuzz suites draw the same examples on every run unless asked otherwise, so a CI run
# is reproducible; `HYPOTHESIS_PROFILE=explore pytest tests/test_fuzz_*.py` draws new ones
# (each run a different seed), which is how the fuzzers found most of what they found.
from hypothesis import settings as _hsettings  # noqa: E402

_hsettings.register_profile("ci", derandomize=True)
_hsettings.register_profile("explore", derandomize=False)
_hsettings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One thread: on a shared 2-core machine, two OpenMP threads per process oversubscribe
    the cores and small batched LAPACK calls slow down a hundredfold."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _allocator_left_alone(monkeypatch):
    """Commands under test leave the C allocator as it is: keep_freed_memory() lasts for the
    whole process, so the first test to run a timing command would change how every later
    test allocates. The real call is tested in subprocesses (test_runtime, test_runtime_cli)."""
    import prunekit.runtime

    monkeypatch.setattr(prunekit.runtime, "keep_freed_memory", lambda: False)


# -- the `data` tier --------------------------------------------------------------------
# A test that reads the shared data folder ($PRUNEKIT_DATA: CIFAR-10, the CIFAR ResNets'
# weights, STS-B, WikiText-2, TinyShakespeare) carries the `data` marker, so that
# `-m "not slow and not data"` runs without it. The marker is applied here, not by hand:
# a test is marked when its own code, the fixtures it uses or the module-level helpers they
# call (followed transitively) use one of prunekit's data entry points. The guard below
# holds the rule: a test that reads a file of the real data folder without the marker
# fails and says so.

_DATA_HINTS = re.compile(
    r"pretrained=True|--pretrained|load_stsb|load_wikitext2|load_tinyshakespeare|"
    r"cifar10_tensors|calibration_images|calibration_text|calibration_sentences|"
    r"calibration_batches\((?!\s*[\"']tiny-)(?!\s*[\"']digits)|minilm_layers|load_cifar10|"
    r"\[\"eval\", \"(?!digits)")


def _module_sources(module) -> dict[str, str]:
    cache = getattr(module, "_prunekit_sources", None)
    if cache is None:
        try:
            tree = ast.parse(inspect.getsource(module))
            text = inspect.getsource(module).splitlines()
        except (OSError, TypeError):
            tree, text = ast.Module(body=[], type_ignores=[]), []
        cache = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                cache[node.name] = "\n".join(text[node.lineno - 1:node.end_lineno])
            elif isinstance(node, ast.Assign):
                seg = "\n".join(text[node.lineno - 1:node.end_lineno])
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        cache[t.id] = seg
        module._prunekit_sources = cache
    return cache


def _reads_data(item) -> bool:
    seen: set[tuple[int, str]] = set()
    todo: list[tuple[object, str]] = [(item.module, item.originalname)]
    for fname, defs in item._fixtureinfo.name2fixturedefs.items():
        if fname == "_data_guard":
            continue
        for fd in defs:
            mod = inspect.getmodule(fd.func)
            if mod is not None:
                todo.append((mod, fd.func.__name__))
    for deco in item.iter_markers("parametrize"):
        if _DATA_HINTS.search(repr(deco.args)):
            return True
    while todo:
        mod, name = todo.pop()
        key = (id(mod), name)
        if key in seen:
            continue
        seen.add(key)
        src = _module_sources(mod).get(name)
        if src is None:
            continue
        if _DATA_HINTS.search(src):
            return True
        names = _module_sources(mod)
        for ref in set(re.findall(r"\b([A-Za-z_]\w*)\b", src)):
            if ref in names and ref != name:
                todo.append((mod, ref))
    return False


def _shared_data() -> Path:
    from prunekit.data import files

    return files.data_dir(must_exist=False)


def pytest_report_header(config):
    where = _shared_data()
    state = "found" if where.is_dir() else (
        "NOT found: the `data` tests are skipped (set PRUNEKIT_DATA to the folder, see the "
        "README; PRUNEKIT_REQUIRE_DATA=1 makes them fail instead, as CI does)")
    return f"prunekit shared data: {where} ({state})"


def pytest_collection_modifyitems(config, items):
    missing = not _shared_data().is_dir() and os.environ.get("PRUNEKIT_REQUIRE_DATA") != "1"
    skip = pytest.mark.skip(reason=f"the shared data folder {_shared_data()} does not exist; "
                                   f"set PRUNEKIT_DATA to it (README: Models and data)")
    for item in items:
        if isinstance(item, pytest.Function) and _reads_data(item):
            item.add_marker(pytest.mark.data)
        if missing and item.get_closest_marker("data") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _data_guard(request, monkeypatch):
    """Fail an unmarked test that reads a file of the real data folder."""
    if request.node.get_closest_marker("data") is not None:
        return
    from prunekit.data import files

    real = files.data_dir(must_exist=False).resolve()
    verify = files.verify

    def guarded(path, entry):
        if Path(path).resolve().is_relative_to(real):
            pytest.fail(f"{request.node.nodeid} reads {path} from the shared data folder but "
                        f"has no `data` marker: mark it @pytest.mark.data (and tell "
                        f"conftest's _DATA_HINTS what it calls)")
        return verify(path, entry)

    monkeypatch.setattr(files, "verify", guarded)
