"""The promises of docs/guarantees.md that no other test file holds: outputs stay old or
complete through SIGKILLs in a loop (and leave no temporary file behind for long), no code
runs from a weights file without --allow-pickle, and pruning is deterministic."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from prunekit.cli import main
from prunekit.io import atomic_write_text, load_weights, read_weights
from prunekit.oneshot import METHODS, prune

WRITER = textwrap.dedent("""
    import itertools, sys
    from prunekit.cli import main
    out = sys.argv[1]
    for i in itertools.count():
        fmt = "dense" if i % 2 else "compressed"
        main(["export", "tv:resnet18", "--format", fmt, "--out", out])
        sys.stdout.flush()
""")


def _complete(path):
    """Load `path` whole, as a dense or a compressed export of tv:resnet18."""
    from prunekit.models import load_model
    from prunekit.runtime.export import load_compressed

    model = load_model("tv:resnet18")
    try:
        state = load_compressed(path)
    except Exception as e:
        if "not a prunekit compressed file" not in str(e):
            raise
        load_weights(model, path)
        return "dense"
    model.load_state_dict(state)
    return "compressed"


@pytest.mark.slow
def test_sigkill_during_out_writes_in_a_loop(tmp_path):
    """`prunekit export --out` writing 45 MB files over and over, killed at random moments:
    after every kill the file is a complete old or new one; a killed write's temporary file
    is gone after the next write."""
    out = tmp_path / "model.safetensors"
    rng = random.Random(0)
    kinds = []
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()  # "wrote ..." once the first file is in place
            assert first.startswith("wrote"), first + proc.stderr.read()
            time.sleep(rng.uniform(0.0, 1.5))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        kinds.append(_complete(out))
        left = [p.name for p in tmp_path.iterdir() if p != out]
        assert len(left) <= 1 and all(n.startswith(".model.safetensors.") for n in left), left
    atomic_write_text(tmp_path / "model.safetensors", "the next write cleans up")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert set(kinds) <= {"dense", "compressed"}


# -- no code from files ------------------------------------------------------------------

class Payload:
    """Unpickling this runs os.system: the marker file appears if it ever does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["evil.pt", "evil.bin", "evil.safetensors"])
def test_a_malicious_checkpoint_never_runs(tmp_path, capsys, name):
    marker = tmp_path / "ran"
    path = tmp_path / name
    torch.save({"fc1.weight": Payload(marker)}, path)
    for cmd in (["eval", "digits-cnn", "--weights", path],
                ["prune", "digits-cnn", "--method", "magnitude", "--weights", path, "--quiet"],
                ["export", "digits-cnn", "--weights", path, "--out", tmp_path / "o.st"]):
        assert main([str(c) for c in cmd]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and ("allow-pickle" in err or "safetensors" in err), err
        assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


# -- determinism ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(n for n in METHODS.names()
                                          if METHODS.entry(n).meta.get("family") == "prune"
                                          and METHODS.entry(n).meta.get("needs")
                                          != "gradients"))
def test_pruning_twice_gives_the_same_bits(method, one_thread):
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(144, 10))
        calib = [torch.randn(16, 1, 8, 8) for _ in range(2)]
        config = METHODS.get(method)(sparsity=0.6)
        prune(model, config, calib if config.needs != "none" else None, progress=False)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    a, b = results
    assert all(torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(
        torch.uint8)) for k in a)


def test_the_cli_writes_the_same_tensors_twice(tmp_path, capsys, one_thread):
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for out in outs:
        assert main(["prune", "tiny-gpt2", "--method", "sparsegpt", "--sparsity", "0.5",
                     "--calib-samples", "8", "--quiet", "--out", str(out)]) == 0
    a, b = (read_weights(o) for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
