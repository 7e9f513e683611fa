"""Regression tests for issue 24 in io, the CLI and the bench commands: loaded tensors are
checked before use, output paths before the work, outputs honour the umask, a killed write's
temporary file goes away with the next write, bad numbers are refused by option name, and the
CLI never prints a raw traceback. Each test failed before its fix (aada5e1)."""

import os
import signal
import tempfile

import pytest
import torch
from torch import nn

from prunekit import PruneError
from prunekit.cli import main
from prunekit.io import atomic_write, atomic_write_text, load_weights, save_weights


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `prunekit argv`; argparse's exit is a code too."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "Traceback" not in err, err
    assert lines[-1].startswith("prunekit") and "error" in lines[-1], err
    return lines[-1]


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    """Equal state dicts, bit for bit (NaN included)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a)


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot create files in: a read-only one, or, for root (who
    ignores modes), /sys."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        tempfile.mkstemp(dir=d)
    except OSError:
        yield d
        d.chmod(0o755)
        return
    d.chmod(0o755)
    try:
        os.close(tempfile.mkstemp(dir="/sys")[0])
    except OSError:
        yield __import__("pathlib").Path("/sys")
        return
    pytest.skip("no folder here that this user cannot write to")


# -- loaded tensors ----------------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [
    (lambda s: s["fc1.weight"].view(-1).__setitem__(7, float("nan")), "fc1.weight.*NaN"),
    (lambda s: s["fc2.bias"].__setitem__(0, float("inf")), "fc2.bias.*Inf"),
    (lambda s: s.update({k: v.long() for k, v in s.items()}), "dtype"),
    (lambda s: s.update({"conv1.weight": s["conv1.weight"].bool()}), "conv1.weight.*dtype"),
    (lambda s: s.update({"fc2.weight": s["fc2.weight"].to(torch.complex64)}), "fc2.weight"),
])
def test_eval_refuses_weights_that_would_load_silently_wrong(tmp_path, capsys, bad, match):
    """The issue's example: `prunekit eval` printed top-1 10.0 with exit code 0 for weights
    overwritten with NaN, or for int64 tensors."""
    from prunekit.models import create

    state = state_of(create("digits-cnn"))
    bad(state)
    path = tmp_path / "bad.safetensors"
    save_weights(state, path)
    rc, out, err = run_cli(["eval", "digits-cnn", "--weights", path], capsys)
    assert rc == 2 and out == ""
    line = one_line_error(err)
    assert str(path) in line and __import__("re").search(match, line), line


def test_load_weights_checks_every_tensor_before_changing_the_model(tmp_path):
    model = net()
    before = state_of(model)
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        for value in (float("nan"), float("inf"), float("-inf")):
            state = state_of(net())
            state[name].view(-1)[-1] = value
            path = save_weights(state, tmp_path / "w.safetensors")
            with pytest.raises(PruneError, match=f"{path}: tensor {name} holds"):
                load_weights(model, path)
            assert same(state_of(model), before)


def test_a_buffer_the_model_itself_fills_with_inf_loads(tmp_path):
    """Non-finite values are refused, except where the model holds the very same ones (a
    causal mask stored as -inf, say): loading such a file must still work."""
    model = net()
    model.register_buffer("mask", torch.triu(torch.full((3, 3), float("-inf")), 1))
    src = net()
    src.register_buffer("mask", model.mask.clone())
    with torch.no_grad():
        src[0].weight.mul_(2)
    path = save_weights(src, tmp_path / "m.safetensors")
    load_weights(model, path)
    assert same(state_of(model), state_of(src))
    other = state_of(src)
    other["mask"] = torch.triu(torch.full((3, 3), float("-inf")), 0)  # another pattern
    save_weights(other, path)
    with pytest.raises(PruneError, match="tensor mask holds"):
        load_weights(model, path)


def test_a_flipped_byte_in_tensor_data_is_found(tmp_path):
    """A file prunekit wrote carries the sha256 of its tensors: a flipped bit in the data,
    which safetensors cannot see, makes the load fail instead of giving other weights."""
    model = net()
    path = save_weights(net(), tmp_path / "w.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    before = state_of(model)
    with pytest.raises(PruneError, match=f"{path}.*corrupt"):
        load_weights(model, path)
    assert same(state_of(model), before)


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", b"PK\x03\x04" + bytes(60),
                                     b"\x80\x04]\x94."])  # the last: a pickled empty list
def test_a_bad_pickle_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "ck.pt"
    path.write_bytes(content)
    with pytest.raises(PruneError, match=str(path)):
        load_weights(net(), path, allow_pickle=True)


# -- outputs -----------------------------------------------------------------------------

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        a = atomic_write_text(tmp_path / "a.txt", "x")
        b = save_weights(net(), tmp_path / "sub" / "b.safetensors")
    finally:
        os.umask(old)
    assert a.stat().st_mode & 0o777 == mode
    assert b.stat().st_mode & 0o777 == mode


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old")
    path.chmod(0o640)
    save_weights(net(), path)
    assert path.stat().st_mode & 0o777 == 0o640


def _fork_writer(path, content: bytes, own_temp: bool = False):
    """A child process inside atomic_write(path): it has written `content` to its temporary
    file and waits for a byte on the returned pipe before it renames it into place.
    `own_temp`: the writer, like safetensors' save_file, first writes a temporary file of its
    own beside the file it was given (`.tmpXXXXXX`)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            def write(tmp):
                if own_temp:
                    with open(os.path.join(os.path.dirname(tmp), ".tmpAbCdEf"), "wb") as f:
                        f.write(content)
                with open(tmp, "wb") as f:
                    f.write(content)
                os.write(ready_w, b"1")
                os.read(go_r, 1)
            atomic_write(path, write)
            code = 0
        finally:
            os._exit(code)
    assert os.read(ready_r, 1) == b"1"
    for fd in (ready_r, ready_w, go_r):
        os.close(fd)
    return pid, go_w


@pytest.mark.parametrize("own_temp", [False, True], ids=["plain", "writer-own-temp"])
def test_a_killed_writes_temporary_file_is_removed_by_the_next_write(tmp_path, own_temp):
    """Also when the writing library made its own temporary file (safetensors 0.8 writes
    `.tmpXXXXXX` beside its target and renames it): once found left beside `--out` by a
    SIGKILL loop, now made inside prunekit's own temporary folder."""
    path = tmp_path / "out.safetensors"
    path.write_text("old")
    pid, go = _fork_writer(path, b"half", own_temp)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(go)
    assert path.read_text() == "old"  # old or complete, never partial
    left = [p for p in tmp_path.iterdir() if p != path]
    assert len(left) == 1 and left[0].name.startswith(".out.safetensors.")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(tmp_path.iterdir()) == [path]


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    path = tmp_path / "out.txt"
    pid, go = _fork_writer(path, b"theirs")
    try:
        atomic_write_text(path, "mine")
        assert path.read_text() == "mine"
        assert len(list(tmp_path.iterdir())) == 2  # theirs is still being written
    finally:
        os.write(go, b"1")
        os.close(go)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert path.read_text() == "theirs" and sorted(tmp_path.iterdir()) == [path]


class WorkStarted(Exception):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """Building a model (the first step of every command's work) fails the test."""
    import prunekit.models

    def refuse(*a, **k):
        raise WorkStarted("the command started its work before checking its options")
    monkeypatch.setattr(prunekit.models, "load_model", refuse)
    monkeypatch.setattr(prunekit.models, "create", refuse)


def _out_cases(tmp_path, unwritable_dir):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    (tmp_path / "adir").mkdir()
    return [(tmp_path / "adir", "folder"), (blocker / "x.safetensors", "blocker"),
            (unwritable_dir / "x.safetensors", "not writable")]


@pytest.mark.parametrize("cmd", [
    ["prune", "digits-cnn", "--method", "magnitude", "--sparsity", "0.5"],
    ["shrink", "digits-cnn", "--channel-ratio", "0.5"],
    ["export", "digits-cnn", "--format", "dense"],
])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(
        tmp_path, unwritable_dir, capsys, no_work, cmd):
    """Found after the work with a raw traceback, the result lost (read-only folder, a
    folder at the path, a file in the way)."""
    for out, words in _out_cases(tmp_path, unwritable_dir):
        quiet = ["--quiet"] if cmd[0] != "export" else []
        rc, _, err = run_cli(cmd + ["--out", out] + quiet, capsys)
        assert rc == 2, err
        line = one_line_error(err)
        assert "--out" in line and str(out) in line and words in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "blocker", "ro"]


def test_report_and_bench_check_their_folder_and_database_first(tmp_path, unwritable_dir,
                                                                capsys):
    from prunekit.bench import ResultStore

    db = tmp_path / "r.sqlite"
    ResultStore(db).close()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    for out, words in ((blocker, "not a folder"), (blocker / "sub", "blocker"),
                       (unwritable_dir / "rep", "not writable")):
        rc, _, err = run_cli(["report", db, "--out", out], capsys)
        assert rc == 2 and "--out" in one_line_error(err) and words in err, err
    exp = tmp_path / "e.toml"
    exp.write_text('[experiment]\nmodels = ["digits-cnn"]\nsparsities = [0.5]\n'
                   '[[methods]]\nname = "magnitude"\n')
    for bad, words in ((tmp_path, "folder"), (blocker / "x.sqlite", "blocker"),
                       (unwritable_dir / "x.sqlite", "not writable")):
        rc, _, err = run_cli(["bench", exp, "--db", bad, "--quiet"], capsys)
        assert rc == 2 and "--db" in one_line_error(err) and words in err, err


# -- option values -----------------------------------------------------------------------

@pytest.mark.parametrize("argv,option", [
    (["prune", "tiny-gpt2", "--method", "wanda", "--calib-samples", "-3"], "--calib-samples"),
    (["prune", "tiny-gpt2", "--method", "wanda", "--calib-samples", "0"], "--calib-samples"),
    (["prune", "digits-cnn", "--speedup", "1.5", "--speedup-batch", "0"], "--speedup-batch"),
    (["prune", "digits-cnn", "--speedup", "1.5", "--steps", "0"], "--steps"),
    (["prune", "digits-cnn", "--speedup", "1.5", "--steps", "-1"], "--steps"),
    (["demo", "--limit", "0"], "--limit"),
    (["demo", "--calib", "-2"], "--calib"),
    (["bench", "x.toml", "--workers", "0", "--backend", "pool"], "--workers"),
])
def test_zero_and_negative_counts_are_refused_by_option_name(tmp_path, monkeypatch, capsys,
                                                             no_work, argv, option):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(argv + ["--quiet"], capsys)
    assert rc == 2, err
    assert option in one_line_error(err)
    assert list(tmp_path.iterdir()) == []  # bench --workers 0 used to create the database


def test_eval_limit_must_be_positive(capsys, no_work):
    rc, _, err = run_cli(["eval", "digits-cnn", "--limit", "-5"], capsys)
    assert rc == 2 and "--limit" in one_line_error(err)


def test_eval_batch_size_must_be_positive(capsys, no_work):
    rc, _, err = run_cli(["eval", "digits-cnn", "--batch-size", "0"], capsys)
    assert rc == 2 and "--batch-size" in one_line_error(err)


def test_eval_bn_reestimate_must_not_be_negative(tmp_path, monkeypatch, capsys, no_work):
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path))
    rc, _, err = run_cli(["eval", "digits-cnn", "--bn-reestimate", "-1"], capsys)
    assert rc == 2 and "--bn-reestimate" in one_line_error(err)


def test_shrink_calib_samples_must_be_positive(capsys):
    rc, _, err = run_cli(["shrink", "tiny-gpt2", "--channel-ratio", "0.5", "--importance",
                          "taylor", "--calib-samples", "-3", "--quiet"], capsys)
    assert rc == 2 and "--calib-samples" in one_line_error(err)


def test_calibration_batches_refuse_a_negative_count():
    from prunekit.models import calibration_batches

    with pytest.raises(PruneError, match="n must be a positive integer"):
        calibration_batches("tiny-gpt2", n=-3)


def test_an_experiment_file_that_is_not_text_is_named(tmp_path, capsys):
    path = tmp_path / "e.toml"
    path.write_bytes(b"\xc0\xff binary")
    rc, _, err = run_cli(["bench", path, "--dry-run"], capsys)
    assert rc == 2 and str(path) in one_line_error(err)


# -- the last resort ----------------------------------------------------------------------

def test_an_unexpected_error_is_one_line_and_the_traceback_is_on_request(tmp_path, monkeypatch,
                                                                         capsys):
    import prunekit.models

    def broken(*a, **k):
        raise RuntimeError("something prunekit did not foresee")
    monkeypatch.setattr(prunekit.models, "load_model", broken)
    argv = ["export", "digits-cnn", "--out", tmp_path / "x.safetensors"]
    rc, out, err = run_cli(argv, capsys)
    assert rc == 1 and out == ""
    line = one_line_error(err)
    assert len(err.strip().splitlines()) == 1
    assert "RuntimeError" in line and "did not foresee" in line and "PRUNEKIT_DEBUG=1" in line
    monkeypatch.setenv("PRUNEKIT_DEBUG", "1")
    rc, _, err = run_cli(argv, capsys)
    assert rc == 1 and "Traceback" in err and "did not foresee" in err
    assert list(tmp_path.iterdir()) == []
