"""Sparse kernels, conversion by measurement, latency helper, and export round trips."""

import importlib
import platform

import pytest
import torch
from torch import nn

from prunekit import Magnitude, PruneError, prune
from prunekit.patterns import Block1xN
from prunekit.runtime import (
    BlockWeight,
    CSRWeight,
    convert,
    export_onnx,
    load_compressed,
    measure_latency,
    save_compressed,
    sparse_module,
)
from prunekit.runtime.kernels import block_size_of, make_kernel, semi_structured_unavailable

pytestmark = pytest.mark.usefixtures("one_thread")


def _sparse(out, inp, s, pattern=None):
    w = torch.randn(out, inp)
    if pattern is None:
        return w * (torch.rand(out, inp) > s)
    return w * pattern.select(torch.rand(out, inp), s)


@pytest.mark.parametrize("shape", [(16, 24), (64, 40), (8, 3)])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.95])
def test_csr_matches_dense(shape, s):
    w = _sparse(*shape, s)
    x = torch.randn(shape[1], 5)
    torch.testing.assert_close(CSRWeight(w).matmul(x), w @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
@pytest.mark.parametrize("s", [0.3, 0.9, 0.99])
def test_block_kernel_matches_dense(n, s):
    w = _sparse(32, 48, s, Block1xN(n))
    assert block_size_of(w != 0) >= n
    k = BlockWeight(w, n)
    for cols in (1, 7):
        x = torch.randn(48, cols)
        torch.testing.assert_close(k.matmul(x), w @ x, rtol=1e-5, atol=1e-5)
    for rows in (5, 300):  # gathered in place; 128-row chunks and a partial last one
        x = torch.randn(rows, 48)
        torch.testing.assert_close(k.linear(x), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_block_kernel_with_empty_block_row():
    w = _sparse(8, 10, 0.5, Block1xN(4))
    w[:4] = 0  # a block row with nothing kept
    x = torch.randn(10, 3)
    torch.testing.assert_close(BlockWeight(w, 4).matmul(x), w @ x)


def test_block_kernel_groups_uneven_block_rows():
    """Block rows keeping 1, 3, 9, 40 and 0 columns: each group pads to at most twice its
    smallest count, and every product matches the dense one."""
    w = torch.zeros(20, 48)
    for row, kept in enumerate((1, 3, 9, 40, 0)):
        cols = torch.randperm(48)[:kept]
        w[4 * row:4 * row + 4, cols] = torch.randn(4, kept)
    k = BlockWeight(w, 4)
    assert len(k.groups) == 4 and not k.covers_all
    for g in k.groups:
        kept = (w.view(5, 4, 48) != 0).any(1).sum(1)[g.rows[::4] // 4]
        assert g.k == int(kept.max()) <= 2 * int(kept.min())
    for rows in (3, 200):
        x = torch.randn(rows, 48)
        torch.testing.assert_close(k.linear(x), x @ w.t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k.matmul(x.t()), w @ x.t(), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 48, 5)
    torch.testing.assert_close(k.matmul_batched(x), w @ x, rtol=1e-5, atol=1e-5)


def test_block_detection_and_refusal():
    w = _sparse(16, 16, 0.5)  # unstructured: no 1xN structure
    assert block_size_of(w != 0) == 1
    with pytest.raises(PruneError, match="1xN"):
        make_kernel("block", w)
    with pytest.raises(PruneError, match="unknown kernel"):
        make_kernel("bsr", w)


def test_semi_structured_guard_on_cpu():
    w = torch.randn(64, 64)
    if not torch.cuda.is_available():
        assert "CUDA" in semi_structured_unavailable(w)
        with pytest.raises(PruneError, match="CUDA"):
            make_kernel("2:4", w)


def test_sparse_conv_matches_conv():
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) > 0.7)
    x = torch.randn(3, 6, 9, 11)
    for kind in ("csr",):
        torch.testing.assert_close(sparse_module(conv, kind)(x), conv(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, (1, 2), 1), (1, 2, 2)])
def test_sparse_conv_gathers_only_the_taps_it_reads(stride, padding, dilation):
    """Whole weight columns pruned (1xN with N = the output channels): the layer builds only
    the kept (channel, offset) rows of im2col, and still equals the convolution."""
    conv = nn.Conv2d(6, 16, 3, stride=stride, padding=padding, dilation=dilation, bias=True)
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(6 * 9, generator=g) < 0.2
    with torch.no_grad():
        conv.weight.mul_(keep.view(1, 6, 3, 3))
    x = torch.randn(3, 6, 11, 9)
    for kind in ("csr", "block"):
        layer = sparse_module(conv, kind)
        assert torch.equal(layer.taps, torch.nonzero(keep).flatten())
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer(x[:1, :, :7]), conv(x[:1, :, :7]), rtol=1e-4,
                                   atol=1e-5)  # another input size: another gather index
    assert sparse_module(conv, "block").kernel.full is not None  # no column left to skip


def test_sparse_linear_keeps_leading_dims():
    lin = nn.Linear(12, 8)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) > 0.5)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(sparse_module(lin, "csr")(x), lin(x), rtol=1e-5, atol=1e-5)
    blocked = nn.Linear(12, 8)
    with torch.no_grad():
        blocked.weight.mul_(Block1xN(4).select(torch.rand(8, 12), 0.5))
    layer = sparse_module(blocked, "block")
    assert layer.kernel.full is None
    torch.testing.assert_close(layer(x), blocked(x), rtol=1e-5, atol=1e-5)


def test_unsupported_layers_fall_back_to_dense_with_note():
    conv = nn.Conv2d(4, 4, 3, groups=2, padding=1)
    lin = nn.Linear(16, 16)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * 5 * 5, 16), nn.ReLU(), lin)
    prune(model, Magnitude(sparsity=0.9), progress=False)
    x = torch.randn(2, 4, 5, 5)
    new, report = convert(model, x, repeats=2, progress=False)
    by_name = {lc.name: lc for lc in report.layers}
    assert by_name["0"].kernel == "dense"
    assert any("grouped" in n for n in by_name["0"].notes)
    assert any("1xN" in n for n in by_name["4"].notes)  # unstructured: block kernel refused
    assert any("2:4" in n for n in by_name["4"].notes)
    assert isinstance(new[0], nn.Conv2d)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("pattern,s", [("unstructured", 0.9), ("1x4", 0.8)])
def test_converted_model_matches_masked_model(pattern, s):
    model = _Net().eval()
    prune(model, Magnitude(sparsity=s, pattern=pattern), progress=False)
    x = torch.randn(4, 3, 8, 8)
    # force each sparse kernel in turn, then let measurement choose
    for kernels in (("csr",), ("block",), ("dense", "csr", "block")):
        new, report = convert(model, x, kernels=kernels, repeats=2, progress=False)
        assert len(report.layers) == 3
        if kernels == ("csr",):
            assert all(lc.kernel in ("dense", "csr") for lc in report.layers)
        with torch.inference_mode():
            torch.testing.assert_close(new(x), model(x), rtol=1e-4, atol=1e-5)
        y2 = torch.randn(7, 3, 8, 8)  # another batch size than the one measured
        with torch.inference_mode():
            torch.testing.assert_close(new(y2), model(y2), rtol=1e-4, atol=1e-5)
    if pattern == "1x4":
        new, report = convert(model, x, kernels=("block",), repeats=2, progress=False)
        assert all("block" in lc.times_ms for lc in report.layers)  # it served every layer


def test_convert_first_takes_the_given_kernel_without_timing(monkeypatch):
    """choose="first": every layer a kernel serves takes the first such kernel in the given
    order, nothing is timed, and the outputs still match; a dense layer stays dense."""
    convert_mod = importlib.import_module("prunekit.runtime.convert")  # the module, not the verb
    model = _Net().eval()
    prune(model, Magnitude(sparsity=0.8, pattern="1x4", exclude=["conv"]), progress=False)
    x = torch.randn(4, 3, 8, 8)

    def no_timing(*a, **k):
        raise AssertionError("choose='first' must not time anything")

    monkeypatch.setattr(convert_mod, "time_calls", no_timing)
    for kernels in (("block", "csr"), ("csr", "block")):
        new, report = convert(model, x, kernels=kernels, progress=False, choose="first")
        chosen = {lc.name: lc.kernel for lc in report.layers}
        assert chosen == {"conv": "dense", "fc1": kernels[0], "fc2": kernels[0]}
        assert isinstance(new.fc1, type(sparse_module(model.fc1, kernels[0])))
        assert all(lc.times_ms == {} for lc in report.layers)
        assert "nan" in str(report)  # nothing measured, nothing claimed
        with torch.inference_mode():
            torch.testing.assert_close(new(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(PruneError, match="choose must be"):
        convert(model, x, choose="best")


def test_convert_bad_kernel_and_untouched_original():
    model = _Net().eval()
    with pytest.raises(PruneError, match="unknown kernel"):
        convert(model, torch.randn(1, 3, 8, 8), kernels=("fast",))
    prune(model, Magnitude(sparsity=0.95), progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert(model, torch.randn(1, 3, 8, 8), repeats=1, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.fc1, nn.Linear)


def test_measure_latency_reports_medians_and_threads():
    model = _Net().eval()
    r = measure_latency({"a": model, "b": model}, torch.randn(2, 3, 8, 8), warmup=1, repeats=3,
                        threads=1)
    assert r["machine"]["threads"] == 1
    for k in ("a", "b"):
        assert 0 < r[k]["p10_ms"] <= r[k]["median_ms"] <= r[k]["p90_ms"]
    with pytest.raises(PruneError, match="threads"):
        measure_latency(model, torch.randn(1, 3, 8, 8), threads=0)


def test_time_calls_runs_before_ahead_of_every_single_timed_call():
    from prunekit.runtime.latency import CacheFlush, last_level_cache_bytes, time_calls

    log = []
    r = time_calls({"a": lambda: log.append("a"), "b": lambda: log.append("b")}, warmup=1,
                   repeats=4, before=lambda: log.append("flush"))
    assert r["a"]["samples"] == r["b"]["samples"] == 4
    timed = log[2:]  # after one warm-up call each: flush, call, flush, call, ...
    assert timed == ["flush", "a", "flush", "b"] * 4
    log.clear()
    time_calls({"a": lambda: log.append("a")}, warmup=1, repeats=2)
    assert len(log) > 3  # without `before`, a fast call repeats within a sample
    flush = CacheFlush()
    assert flush.buffer.numel() * 4 == 2 * last_level_cache_bytes() > 0
    flush()
    assert float(flush.buffer[0]) == 1.0  # every element written


_FAULTS = """
import resource, sys, torch
from prunekit.runtime import keep_freed_memory, machine_info
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(64 << 18)  # 64 MiB, over any glibc mmap threshold
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, machine_info()["malloc"], min(faults[1:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt behaviour is glibc's")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    import subprocess
    import sys

    def run(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0], out[1], int(out[2])

    pages = (64 << 20) // 4096
    kept, mode, faults = run("keep")
    assert (kept, mode) == ("True", "kept")
    assert faults < pages // 100  # the freed 64 MiB is reused, not mapped and zeroed again
    kept, mode, faults = run("system")
    assert (kept, mode) == ("False", "system")
    assert faults > pages // 2  # glibc's default maps it afresh: one fault per page


def test_compressed_export_round_trips_bit_exactly(tmp_path):
    model = _Net()
    prune(model, Magnitude(sparsity=0.8), progress=False)
    state = model.state_dict()
    # awkward values: negative zero, NaN, Inf, a half tensor and an int tensor
    state["fc2.weight"][0, :4] = torch.tensor([-0.0, float("nan"), float("inf"), 0.0])
    state["extra.half"] = (torch.randn(10, 10) * (torch.rand(10, 10) > 0.5)).half()
    state["extra.int"] = torch.tensor([0, 3, 0, 0, -2], dtype=torch.int64)
    info = save_compressed(state, tmp_path / "m.safetensors")
    assert "fc1.weight" in info["compressed"] and "extra.int" in info["compressed"]
    assert info["bytes"] < info["dense_bytes"] / 2.5
    back = load_compressed(tmp_path / "m.safetensors")
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].reshape(-1).view(torch.uint8),
                           v.contiguous().reshape(-1).view(torch.uint8)), k


def test_compressed_load_errors(tmp_path):
    from prunekit.io import save_weights
    with pytest.raises(PruneError, match="does not exist"):
        load_compressed(tmp_path / "missing.safetensors")
    save_weights({"a": torch.ones(3)}, tmp_path / "plain.safetensors")
    with pytest.raises(PruneError, match="not a prunekit compressed"):
        load_compressed(tmp_path / "plain.safetensors")


def test_onnx_export_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _Net().eval()
    prune(model, Magnitude(sparsity=0.7), progress=False)
    x = torch.randn(3, 3, 8, 8)
    r = export_onnx(model, x, tmp_path / "m.onnx")
    assert r["max_abs_diff"] < 1e-4
    import onnxruntime as ort
    sess = ort.InferenceSession(r["path"], providers=["CPUExecutionProvider"])
    x2 = torch.randn(5, 3, 8, 8)  # dynamic batch
    got = sess.run(None, {"input_0": x2.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x2), rtol=1e-4, atol=1e-5)


def test_onnx_dict_inputs_tiny_bert(tmp_path):
    pytest.importorskip("onnxruntime")
    from prunekit.models import create
    model = create("tiny-bert")
    model.config.return_dict = False
    prune(model, Magnitude(sparsity=0.5), progress=False)
    batch = {"input_ids": torch.randint(0, 128, (2, 12)),
             "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    r = export_onnx(model, batch, tmp_path / "bert.onnx", atol=1e-4)
    assert r["max_abs_diff"] < 1e-4
