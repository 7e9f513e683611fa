"""The quantized kernels (int8, int4 in runtime/kernels/) on the layers' quantized forms: each
serves the grids its docstring names and no other, reproduces the dequantized layer's output
within bfloat16 rounding (exactly, weight by weight, where the scales stay float32), and
runtime.convert offers them next to the sparse kernels, joint sparse + quantized layers
included."""

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import PruneError
from prunekit.quant import QuantizedWeight, get_grid
from prunekit.quant.model import attach
from prunekit.runtime import convert
from prunekit.runtime.convert import candidate_kernels
from prunekit.runtime.kernels import make_kernel, rtol, sparse_module

pytestmark = pytest.mark.usefixtures("one_thread")


def quantized_linear(spec, out=96, cols=576, keep=None, seed=0):
    """A Linear whose weight lies on grid `spec` (RTN), with its quantized form attached."""
    torch.manual_seed(seed)
    lin = nn.Linear(cols, out)
    w = lin.weight.detach() * (keep if keep is not None else 1)
    q = get_grid(spec).quantize(w)
    if keep is not None:
        q = QuantizedWeight(q.grid, q.codes, q.scales, q.zeros, keep.bool())
        q.check()
    with torch.no_grad():
        lin.weight.copy_(q.dequantize())
    attach(lin, q)
    return lin, q


SERVED = {
    "int8": ["int8", "int8:asym", "int6:asym", "int4", "int3:asym", "int2"],
    "int4": ["int4", "int4:asym", "int4:g32", "int4:g32:asym", "int4:g64:asym", "int4:g192",
             "int4:g32:fp16", "int3:g64", "int3:g64:asym", "int2:g32:asym", "int4:g288"],
}


@pytest.mark.parametrize("kernel,spec", [(k, s) for k, specs in SERVED.items() for s in specs])
def test_kernel_reproduces_the_dequantized_layer(kernel, spec):
    lin, q = quantized_linear(spec)
    x = torch.randn(3, 5, 576)
    fast = sparse_module(lin, kernel)
    with torch.inference_mode():
        ref, got = lin(x), fast(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    err = float((got - ref).abs().max())
    assert err <= rtol(kernel) * float(ref.abs().max()), (spec, err)
    # weight by weight: the identity's rows come back as W^T. Per output channel the scales
    # stay float32 and the codes' integers are exact in bfloat16: equal to the last bit.
    # In groups the scales go in as bfloat16: within its rounding (and the output's).
    k = make_kernel(kernel, lin.weight.detach(), q)
    with torch.inference_mode():
        wt = k.linear(torch.eye(576))
    deq = q.dequantize().t()
    if q.grid.group_size is None:
        assert torch.equal(wt, deq), spec
    else:
        tol = 2 ** -7 * q.scales.max() * 2 ** (q.grid.bits - 1)
        assert float((wt - deq).abs().max()) <= tol, spec


def test_kernels_refuse_what_they_cannot_run():
    lin, q = quantized_linear("int4:g32")
    w = lin.weight.detach()
    with pytest.raises(PruneError, match="int8 kernel: serves per-channel grids only"):
        make_kernel("int8", w, q)
    lin8, q8 = quantized_linear("int8:g64")
    with pytest.raises(PruneError, match="int4 kernel: serves grids of at most 4 bits"):
        make_kernel("int4", lin8.weight.detach(), q8)
    lin16, q16 = quantized_linear("int4:g16")
    with pytest.raises(PruneError, match="multiple of 32 inputs, got 16"):
        make_kernel("int4", lin16.weight.detach(), q16)
    odd, qodd = quantized_linear("int4", cols=80)  # per channel on 80 inputs: no 32k group
    with pytest.raises(PruneError, match="per-channel groups of a multiple of 32"):
        make_kernel("int4", odd.weight.detach(), qodd)
    with pytest.raises(PruneError, match="not quantized"):
        sparse_module(nn.Linear(64, 32), "int4")


def test_a_weight_changed_after_quantization_is_refused():
    lin, _ = quantized_linear("int4:g32")
    with torch.no_grad():
        lin.weight[0, 0] += 1.0
    with pytest.raises(PruneError, match="no longer equals its quantized form"):
        sparse_module(lin, "int4")


def test_a_joint_sparse_quantized_layer_is_offered_sparse_and_quantized_kernels():
    keep = prunekit.patterns.get_pattern("2:4").select(torch.rand(96, 576), 0.5)
    lin, q = quantized_linear("int4:g32", keep=keep)
    assert bool((lin.weight[~keep.bool()] == 0).all())
    x = torch.randn(4, 576)
    cands, notes = candidate_kernels(lin, x, ("dense", "csr", "int8", "int4"))
    assert set(cands) == {"dense", "csr", "int4"}, notes  # int8: not per channel
    with torch.inference_mode():
        fast, ref = cands["int4"](x), lin(x)
    # pruned weights are exactly 0 through the kernel on a symmetric grid
    k = make_kernel("int4", lin.weight.detach(), q)
    with torch.inference_mode():
        wt = k.linear(torch.eye(576)).t()
    assert bool((wt[~keep.bool()] == 0).all())
    assert float((fast - ref).abs().max()) <= 1e-2 * float(ref.abs().max())


def test_a_float_layer_gets_no_quantized_kernel():
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight[:, ::2] = 0
    cands, _ = candidate_kernels(lin, torch.randn(2, 64), ("dense", "csr", "int8", "int4"))
    assert set(cands) == {"dense", "csr"}


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 128)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_convert_measures_quantized_kernels_on_a_quantized_model():
    """prunekit.quantize then convert: every layer is timed on dense and its quantized
    kernels, the fastest is kept, and the converted model equals the dequantized one."""
    model = _Mlp().eval()
    calib = torch.randn(64, 128)
    prunekit.quantize(model, prunekit.RTN(bits=4, group_size=32), calib, progress=False)
    x = torch.randn(1, 128)
    new, report = convert(model, x, kernels=("dense", "csr", "int8", "int4"), repeats=3,
                          progress=False)
    for lc in report.layers:
        # a weight rounded to 0 makes csr a candidate too; groups rule out int8
        assert {"dense", "int4"} <= set(lc.times_ms) and "int8" not in lc.times_ms, lc
        assert lc.kernel == min(lc.times_ms, key=lc.times_ms.get)
    with torch.inference_mode():
        ref, got = model(x), new(x)
    assert float((got - ref).abs().max()) <= 2e-2 * float(ref.abs().max())
    first, _ = convert(model, x, kernels=("int4",), choose="first", progress=False)
    assert isinstance(first.up.kernel, type(make_kernel("int4", model.up.weight.detach(),
                                                        model.up.quantized_weight)))


@pytest.mark.parametrize("kernel,spec", [("int8", "int8:asym"), ("int8", "int3"),
                                         ("int4", "int4:g64:asym"), ("int4", "int2")])
def test_many_rows_run_the_exact_dequantized_weight(kernel, spec):
    """From DENSE_FROM_ROWS rows on (prefill) a kernel multiplies by its dequantized weight,
    which is the layer's own to the last bit."""
    import importlib

    lin, q = quantized_linear(spec, cols=192)
    k = make_kernel(kernel, lin.weight.detach(), q)
    assert torch.equal(k.dequantized(), q.dequantize())
    rows = importlib.import_module(f"prunekit.runtime.kernels.{kernel}").DENSE_FROM_ROWS
    x = torch.randn(rows, 192)
    with torch.inference_mode():
        ref = torch.nn.functional.linear(x, lin.weight)
        torch.testing.assert_close(k.linear(x), ref, rtol=1e-5, atol=1e-5)
