"""`prunekit latency` and `prunekit export` as the `prunekit` command parses them."""

import json
import platform

import pytest
import torch

from prunekit import Magnitude, PruneError, prune
from prunekit.cli import build_parser
from prunekit.commands.common import allocator_conflict
from prunekit.io import save_weights
from prunekit.models import create
from prunekit.runtime import load_compressed

pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv):
    """The command as `prunekit` parses it (errors raised, not turned into exit codes)."""
    args = build_parser().parse_args(argv)
    return args.func(args)


@pytest.fixture
def pruned_digits(tmp_path):
    model = create("digits-cnn", pretrained=True)
    prune(model, Magnitude(sparsity=0.9), progress=False)
    path = tmp_path / "pruned.safetensors"
    save_weights(model, path)
    return model, path


def test_latency_json_with_sparse(pruned_digits, capsys):
    _, path = pruned_digits
    assert run(["latency", "digits-cnn", "--weights", str(path), "--batch-sizes", "1,4",
                "--repeats", "2", "--warmup", "1", "--threads", "1", "--sparse", "--json",
                "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["batch"] for r in out["rows"]] == [1, 4]
    for r in out["rows"]:
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["machine"]["threads"] == 1
        assert r["machine"]["malloc"] == "system"  # conftest leaves the allocator alone
        assert set(r["kernels"]) == {"conv1", "conv2", "fc1", "fc2"}


def test_latency_text_and_bad_sizes(capsys):
    assert run(["latency", "digits-cnn", "--batch-sizes", "2", "--repeats", "2"]) == 0
    assert "batch    2: dense" in capsys.readouterr().out
    with pytest.raises(PruneError, match="batch-sizes"):
        run(["latency", "digits-cnn", "--batch-sizes", "a,b"])
    with pytest.raises(PruneError, match="positive"):
        run(["latency", "digits-cnn", "--batch-sizes", "0"])


@pytest.mark.parametrize("flag,mode", [([], "kept"), (["--system-malloc"], "system")])
def test_latency_keeps_freed_memory_unless_asked(flag, mode):
    import subprocess
    import sys

    if mode == "kept" and platform.libc_ver()[0] != "glibc":
        pytest.skip("freed memory is kept only under glibc")
    out = subprocess.run([sys.executable, "-m", "prunekit.cli", "latency", "digits-cnn",
                          "--batch-sizes", "1", "--repeats", "1", "--warmup", "1",
                          "--threads", "1", "--json", "--quiet", *flag],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["rows"][0]["machine"]["malloc"] == mode


def test_allocator_conflict_names_the_file_and_both_modes():
    # this process keeps the system allocator (conftest)
    assert allocator_conflict({"malloc": "system"}, "r.json") is None
    assert allocator_conflict({}, "r.json") is None  # files from before the mode
    why = allocator_conflict({"malloc": "kept"}, "r.json")
    assert "r.json" in why and "kept allocator" in why and "system one" in why


def test_export_compressed_and_dense(pruned_digits, tmp_path, capsys):
    model, path = pruned_digits
    out = tmp_path / "c.safetensors"
    assert run(["export", "digits-cnn", "--weights", str(path), "--format", "compressed",
                "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ratio"] > 2.0
    back = load_compressed(out)
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v)
    dense = tmp_path / "d.safetensors"
    assert run(["export", "digits-cnn", "--weights", str(path), "--format", "dense",
                "--out", str(dense)]) == 0
    assert info["bytes"] < dense.stat().st_size


def test_export_onnx_verified(pruned_digits, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    _, path = pruned_digits
    out = tmp_path / "m.onnx"
    assert run(["export", "digits-cnn", "--weights", str(path), "--format", "onnx",
                "--out", str(out)]) == 0
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    assert out.exists()
