"""Fuzzing the command line: one option at a time gets a generated value (numbers of every
sign and size, NaN, Inf, text, empty) while the others stay valid; output paths of every kind
(fresh, existing, a folder, under a file, unwritable); input weights that are corrupt;
experiment files with values of the wrong type.

The property, for every generated case: the command succeeds with a correct result, or it
exits non-zero with one line `prunekit ...: error: ...` that names the option (or the file)
at fault. Never a raw traceback, never a changed input file, never a partial output: an
existing --out keeps its old bytes and nothing else is left in its folder.
"""

import json
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunekit.cli import main
from prunekit.io import load_weights, read_weights, save_weights

FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

#: Values an adversarial user types: every sign and size, special floats, words, nothing.
TEXT = st.one_of(
    st.integers(-3, 9).map(str),
    st.sampled_from(["0", "-0", "-1", "0.0", "-0.0", "1.0", "0.5", "0.999", "1e-300", "nan",
                     "inf", "-inf", "2:4", "1:3", "4x1", "1x4", "", " ", "abc", "1,2", "0,0",
                     "1,,2", "-1,4", "unstructured", "unstructured:row", "None", "true",
                     "0x10", "1_0", "３"]),
    st.floats(-2, 2, allow_nan=False).map(repr),
)


def run_cli(argv, capsys):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_named_error(rc, err, *names):
    """One error line (argparse adds its usage line above) naming one of `names`."""
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1]
    assert re.match(r"prunekit( \w+)?: error: ", last), err
    if not last.startswith("prunekit: error:"):
        assert lines[0].startswith("usage:"), err  # argparse
    else:
        assert len(lines) == 1, err
    spellings = {n for name in names for n in (name, name.lstrip("-"),
                                               name.lstrip("-").replace("-", "_"))}
    assert any(s in last for s in spellings), f"{last!r} names none of {names}"


def files_in(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def _out_path(tmp_path, kind):
    """An --out of the given kind, and the bytes it holds before the command."""
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"a file")
    if kind == "fresh":
        return tmp_path / "new" / "deeper" / "out.safetensors", None
    if kind == "existing":
        p = tmp_path / "old.safetensors"
        p.write_bytes(b"old bytes")
        return p, b"old bytes"
    if kind == "folder":
        (tmp_path / "adir").mkdir(exist_ok=True)
        return tmp_path / "adir", None
    if kind == "under-a-file":
        return blocker / "out.safetensors", None
    return "/sys/prunekit-fuzz.safetensors", None  # root cannot write there either


OUT_KINDS = ["fresh", "existing", "folder", "under-a-file", "unwritable"]


@pytest.fixture(scope="module")
def gpt2_weights(tmp_path_factory):
    from prunekit.models import create

    path = tmp_path_factory.mktemp("fuzz_cli") / "gpt2.safetensors"
    save_weights(create("tiny-gpt2"), path)
    return path


PRUNE_OPTIONS = ["--sparsity", "--pattern", "--calib-samples", "--seed", "--threads",
                 "--steps", "--speedup-batch", "--method"]


@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_prune_options(tmp_path_factory, gpt2_weights, capsys, data):
    tmp_path = tmp_path_factory.mktemp("prune")
    method = data.draw(st.sampled_from(["magnitude", "wanda", "sparsegpt"]))
    option = data.draw(st.sampled_from(PRUNE_OPTIONS + ["-o", "--weights", "--out"]))
    values = {"--method": method, "--sparsity": "0.5", "--calib-samples": "4",
              "--weights": str(gpt2_weights)}
    out_kind = "fresh"
    extra = []
    if option == "--out":
        out_kind = data.draw(st.sampled_from(OUT_KINDS))
    elif option == "-o":
        key = data.draw(st.sampled_from(["blocksize", "percdamp", "keep_first", "keep_last",
                                         "include", "exclude", "sequential", "bogus"]))
        extra = ["-o", f"{key}={data.draw(TEXT)}"]
        option = key
    elif option == "--weights":
        blob = bytearray(gpt2_weights.read_bytes())
        cut = data.draw(st.integers(0, len(blob) - 1))
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(bytes(blob[:cut] if data.draw(st.booleans()) else
                              blob[:cut] + bytes([blob[cut] ^ 0x41]) + blob[cut + 1:]))
        values["--weights"] = str(bad)
        option = str(bad)
    else:
        values[option] = data.draw(TEXT)
    out, old = _out_path(tmp_path, out_kind)
    before_in = gpt2_weights.read_bytes()
    before_files = files_in(tmp_path)
    argv = ["prune", "tiny-gpt2", "--quiet", "--json", "--out", out, *extra]
    for k, v in values.items():
        argv += [f"{k}={v}"]  # = keeps "-1" from reading as an option
    rc, stdout, err = run_cli(argv, capsys)
    assert gpt2_weights.read_bytes() == before_in  # the input is never changed
    if rc != 0:
        assert_named_error(rc, err, option if option != "--out" else "--out")
        if old is not None:
            assert out.read_bytes() == old
        assert files_in(tmp_path) == before_files
        return
    report = json.loads(stdout)
    saved = read_weights(out)
    for layer in report["layers"]:
        w = saved.get(layer["name"] + ".weight")
        if w is not None:  # (a tied head is stored once, under the embedding's name)
            assert math.isclose(float((w == 0).float().mean()), layer["sparsity"],
                                abs_tol=1e-6), layer["name"]
    assert all(bool(torch.isfinite(t).all()) for t in saved.values() if t.is_floating_point())
    from prunekit.models import create
    load_weights(create("tiny-gpt2"), out)  # a complete, loadable result


EXPORT_OPTIONS = ["--format", "--batch-size", "--out", "--weights"]


@FUZZ
@given(data=st.data())
def test_export_options(tmp_path_factory, capsys, data):
    tmp_path = tmp_path_factory.mktemp("export")
    option = data.draw(st.sampled_from(EXPORT_OPTIONS))
    fmt = data.draw(st.sampled_from(["dense", "compressed"]))
    argv = ["export", "digits-cnn"]
    out_kind = data.draw(st.sampled_from(OUT_KINDS)) if option == "--out" else "fresh"
    out, old = _out_path(tmp_path, out_kind)
    named = option
    if option == "--format":
        fmt = data.draw(TEXT)
    elif option == "--batch-size":
        argv += [f"--batch-size={data.draw(TEXT)}"]
    elif option == "--weights":
        bad = tmp_path / "w.safetensors"
        bad.write_bytes(data.draw(st.binary(max_size=200)))
        argv += ["--weights", bad]
        named = str(bad)
    argv += [f"--format={fmt}", "--out", out]
    before = files_in(tmp_path)
    rc, _, err = run_cli(argv, capsys)
    if rc != 0:
        assert_named_error(rc, err, named)
        if old is not None:
            assert out.read_bytes() == old
        assert files_in(tmp_path) == before
        return
    from prunekit.models import create
    from prunekit.runtime.export import load_compressed

    state = load_compressed(out) if fmt == "compressed" else read_weights(out)
    model = create("digits-cnn")
    model.load_state_dict(state)


LATENCY_OPTIONS = ["--batch-sizes", "--threads", "--warmup", "--repeats", "--kernels"]


@settings(FUZZ, max_examples=15)
@given(option=st.sampled_from(LATENCY_OPTIONS), value=TEXT)
def test_latency_options(capsys, option, value):
    values = {"--batch-sizes": "1", "--warmup": "0", "--repeats": "1"}
    values[option] = value
    argv = ["latency", "digits-cnn", "--json"] + [f"{k}={v}" for k, v in values.items()]
    if option == "--kernels":
        argv.append("--sparse")
    rc, out, err = run_cli(argv, capsys)
    if rc != 0:
        assert_named_error(rc, err, option, option.rstrip("s"))
        return
    rows = json.loads(out)["rows"]
    assert [r["batch"] for r in rows] == [int(t) for t in values["--batch-sizes"].split(",")
                                          if t.strip()]
    assert all(r["dense_ms"] > 0 for r in rows)


# -- experiment files ---------------------------------------------------------------------

def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) \
            else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"


SCALARS = st.one_of(st.integers(-2, 70), st.floats(-2, 2), st.sampled_from(
    [float("nan"), float("inf"), True, False, "", "64", "no", "test", "unstructured", "2:4",
     "digits-cnn", "magnitude", 0, 1, 0.5]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.sampled_from(["name", "dataset", "x"]), SCALARS,
                                   max_size=2))
EXPERIMENT = {"name": '"fuzz"', "models": '["digits-cnn"]', "sparsities": "[0.5]",
              "seeds": "[0]", "calibration_samples": "16"}
KEYS = ["name", "models", "sparsities", "flops_targets", "patterns", "seeds",
        "calibration_samples", "calibration_batch_size", "eval_split", "eval_limit",
        "reestimate_bn", "finetune_steps", "finetune_lr", "finetune_batch_size",
        "latency_batch_sizes", "latency_warmup", "latency_repeats", "threads"]
OPTIONS = ["blocksize", "percdamp", "keep_first", "keep_last", "include", "exclude",
           "sequential", "blocks", "unknown"]


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_experiment_files(tmp_path_factory, capsys, data):
    """An accepted file gives runs whose every config builds and whose values have their
    declared types: a wrong type is refused when the file is read, never at run time."""
    from prunekit.bench import load_experiment
    from prunekit.bench.runner import make_config

    exp = dict(EXPERIMENT)
    method = {"name": '"sparsegpt"'}
    where = data.draw(st.sampled_from(["experiment", "method"]))
    key = data.draw(st.sampled_from(KEYS if where == "experiment" else OPTIONS))
    value = toml_value(data.draw(VALUES))
    if where == "experiment":
        exp[key] = value
    else:
        method["options"] = f"{{ {key} = {value} }}"
    text = "[experiment]\n" + "".join(f"{k} = {v}\n" for k, v in exp.items())
    text += "\n[[methods]]\n" + "".join(f"{k} = {v}\n" for k, v in method.items())
    path = tmp_path_factory.mktemp("exp") / "e.toml"
    path.write_text(text)
    rc, out, err = run_cli(["bench", path, "--dry-run"], capsys)
    if rc != 0:
        assert_named_error(rc, err, str(path))
        assert key in err or "TOML" in err, err
        return
    runs = load_experiment(path)
    assert out.strip().endswith(f"{len(runs)} runs")
    for r in runs:
        for f, v in r.config().items():
            if f in ("calibration_samples", "calibration_batch_size", "finetune_steps",
                     "finetune_batch_size", "latency_warmup", "latency_repeats", "threads",
                     "seed"):
                assert type(v) is int and v >= 0, (f, v)
            if f in ("sparsity", "flops_target", "finetune_lr") and v is not None:
                assert isinstance(v, (int, float)) and math.isfinite(v), (f, v)
            if f in ("model", "method", "pattern", "eval_split"):
                assert isinstance(v, str), (f, v)
        make_config(r, r.sparsity)


# -- results databases --------------------------------------------------------------------

@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_results_databases(tmp_path_factory, capsys, data):
    """A damaged or foreign --db is refused by name and left as it was; a sound one lists."""
    from prunekit.bench import ResultStore, parse_experiment

    tmp_path = tmp_path_factory.mktemp("db")
    db = tmp_path / "r.sqlite"
    runs = parse_experiment('[experiment]\nmodels = ["digits-cnn"]\nsparsities = [0.1, 0.2]\n'
                            '[[methods]]\nname = "magnitude"\n')
    with ResultStore(db) as store:
        store.put(runs[0], {"metric": "top1", "x": 1.0})
    blob = bytearray(db.read_bytes())
    kind = data.draw(st.sampled_from(["truncate", "burst", "random", "empty", "ok"]))
    if kind == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "burst":
        start = data.draw(st.integers(0, len(blob) - 2))
        for i in range(start, min(len(blob), start + data.draw(st.integers(1, 16)))):
            blob[i] ^= data.draw(st.integers(1, 255))
    elif kind == "random":
        blob = bytearray(data.draw(st.binary(min_size=1, max_size=300)))
    elif kind == "empty":
        blob = bytearray()
    db.write_bytes(bytes(blob))
    for p in tmp_path.iterdir():
        if p != db:
            p.unlink()  # the -wal/-shm files of the store above
    exp = tmp_path / "e.toml"
    exp.write_text('[experiment]\nmodels = ["digits-cnn"]\nsparsities = [0.1, 0.2]\n'
                   '[[methods]]\nname = "magnitude"\n')
    rc, out, err = run_cli(["bench", exp, "--dry-run", "--db", db], capsys)
    if rc != 0:
        assert_named_error(rc, err, str(db))
        assert db.read_bytes() == bytes(blob)  # left unchanged
        return
    states = re.findall(r"\[(done|todo)\]", out)
    assert len(states) == 2 and states[1] == "todo", out
    assert states[0] == ("done" if kind == "ok" else states[0])


@pytest.fixture(scope="module")
def real_result():
    """One real run's result (digits CNN, a few images): what a report must read."""
    from prunekit.bench import execute_run, parse_experiment

    (spec,) = parse_experiment('[experiment]\nmodels = ["digits-cnn"]\nsparsities = [0.5]\n'
                               'calibration_samples = 16\neval_limit = 40\n'
                               'latency_batch_sizes = [1]\nlatency_repeats = 1\n'
                               'latency_warmup = 0\n[[methods]]\nname = "magnitude"\n')
    return Frozen((spec, execute_run(spec.config())))


class Frozen(tuple):
    def __repr__(self):
        return "<a real run's spec and result>"


def _paths(obj, prefix=()):
    """Every key path in a JSON tree."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) \
        if isinstance(obj, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out += _paths(v, prefix + (k,))
    return out


@settings(FUZZ, max_examples=8)
@given(data=st.data())
def test_reports_of_rows_from_other_versions(tmp_path_factory, capsys, real_result, data):
    """A row another prunekit wrote (a field gone, or of another type) is refused naming the
    database and the run; the report folder is left without a partial report."""
    import copy

    from prunekit.bench import ResultStore

    spec, result = real_result
    result = copy.deepcopy(result)
    path = data.draw(st.sampled_from(sorted(_paths(result), key=repr)))
    parent = result
    for k in path[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(st.sampled_from(["x", None, [], {}, -1, 0.0]))
    tmp_path = tmp_path_factory.mktemp("report")
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        store.put(spec, result)
    rc, out, err = run_cli(["report", db, "--out", tmp_path / "rep"], capsys)
    if rc != 0:
        assert_named_error(rc, err, str(db))
        assert not (tmp_path / "rep" / "report.html").exists()
        return
    assert (tmp_path / "rep" / "report.html").stat().st_size > 0


def test_an_unknown_model_in_an_experiment_file_names_the_models_key(tmp_path, capsys):
    """Found by a random draw of test_experiment_files; kept as a fixed case."""
    path = tmp_path / "e.toml"
    path.write_text('[experiment]\nmodels = ["64"]\n\n[[methods]]\nname = "magnitude"\n')
    rc, out, err = run_cli(["bench", path, "--dry-run"], capsys)
    assert rc != 0 and "models" in err and "'64'" in err, err
