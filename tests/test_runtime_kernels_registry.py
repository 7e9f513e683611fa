"""Tests generated from prunekit.runtime.KERNELS: every registered kernel, on weights masked
with the pattern its entry names, gives the dense masked layer's output (nn.Linear, GPT-2's
Conv1D and nn.Conv2d), alone and inside a converted model. A kernel this machine cannot run
(a CUDA-only one without a GPU) is skipped with its own reason. A new kernel file with its
decorator appears here with no other edit."""

import pytest
import torch
from torch import nn

from prunekit.layers import set_weight_matrix, weight_matrix
from prunekit.patterns import get_pattern
from prunekit.runtime import KERNELS, convert, sparse_module
from prunekit.runtime.kernels import make_kernel, rtol

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def hf_conv1d(nx, nf):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)


# layer, input; sizes fit every pattern and the 2:4 kernel's (rows % 32, columns % 64)
LAYERS = {
    "linear": (lambda: nn.Linear(128, 64), lambda: torch.randn(5, 3, 128)),
    "gpt2_conv1d": (lambda: hf_conv1d(128, 64), lambda: torch.randn(2, 7, 128)),
    "conv2d": (lambda: nn.Conv2d(64, 32, 3, stride=2, padding=1),
               lambda: torch.randn(2, 64, 9, 9)),
}


def masked(layer, kernel):
    """The layer with its weight pruned under the kernel's pattern (half the weights)."""
    pattern = get_pattern(KERNELS.entry(kernel).meta["pattern"])
    w = weight_matrix(layer).detach()
    sparsity = pattern.implied_sparsity or 0.5
    set_weight_matrix(layer, w * pattern.select(torch.rand(w.shape), sparsity))
    return layer


def skip_if_unavailable(kernel, w):
    """Skip, with the kernel's reason, when its device is absent; fail otherwise."""
    entry = KERNELS.entry(kernel)
    why = entry.obj.unavailable(w)
    if why and entry.meta.get("device") == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{kernel}: {why}")
    assert why is None, f"{kernel} refuses weights masked with its own pattern: {why}"


@pytest.mark.parametrize("layer_kind", sorted(LAYERS))
@pytest.mark.parametrize("kernel", KERNELS.names())
def test_every_kernel_equals_the_dense_masked_layer(kernel, layer_kind):
    make_layer, make_input = LAYERS[layer_kind]
    layer = masked(make_layer().eval(), kernel)
    skip_if_unavailable(kernel, weight_matrix(layer).detach().float())
    x = make_input()
    sparse = sparse_module(layer, kernel)
    with torch.inference_mode():
        ref, got = layer(x), sparse(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    err = float((got - ref).abs().max())
    assert err <= rtol(kernel) * float(ref.abs().max()), err
    kobj = make_kernel(kernel, weight_matrix(layer).detach().float())
    assert isinstance(kobj.nbytes(), int) and kobj.nbytes() > 0
    assert kobj.shape == tuple(weight_matrix(layer).shape)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(64, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, 64)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("kernel", KERNELS.names())
def test_convert_takes_every_kernel_where_it_serves(kernel):
    """convert reads the registry: asked for one kernel first, every layer it serves takes
    it, and the converted model equals the masked one."""
    model = _Net().eval()
    for layer in (model.conv, model.fc):
        masked(layer, kernel)
    skip_if_unavailable(kernel, weight_matrix(model.fc).detach().float())
    x = torch.randn(3, 64, 4, 4)
    new, report = convert(model, x, kernels=(kernel,), choose="first", progress=False)
    chosen = {lc.name: lc.kernel for lc in report.layers}
    assert chosen["fc"] == kernel, report.layers[-1].notes
    with torch.inference_mode():
        ref, got = model(x), new(x)
    assert float((got - ref).abs().max()) <= rtol(kernel) * float(ref.abs().max())


def test_the_registry_lists_each_kernel_with_what_it_serves():
    for e in KERNELS.entries():
        assert e.meta.get("device") in ("any", "cuda", "cpu"), e.name
        assert e.summary and e.meta.get("serves"), e.name
        get_pattern(e.meta["pattern"])
        assert e.obj.name == e.name and callable(e.obj.unavailable)
