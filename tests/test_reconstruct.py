"""One-shot reconstruction after a channel cut: least squares on calibration inputs, the
bias absorbing the removed channels' mean."""


import pytest
import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.structured import ChannelPrune, build_graph, shrink
from prunekit.structured.reconstruct import reconstruct

pytestmark = pytest.mark.usefixtures("one_thread")


class Chain(nn.Module):
    def __init__(self, act=True):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 5)
        self.act = act

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.relu(h) if self.act else h)


def test_refit_is_exact_when_the_removed_channels_are_affine_in_the_kept():
    torch.manual_seed(0)
    net = Chain(act=False).eval()
    with torch.no_grad():  # channels 4..7 = a mix of channels 0..3 plus a constant
        mix = torch.randn(4, 4)
        net.a.weight[4:] = mix @ net.a.weight[:4]
        net.a.bias[4:] = mix @ net.a.bias[:4] + torch.randn(4)
        net.a.weight[4:] *= 1e-3  # the lowest L1: the cut takes them
        net.a.bias[4:] *= 1e-3
    x = torch.randn(64, 6)
    small, _ = shrink(net, ChannelPrune(per_layer={"a": 0.5}, reconstruct=True), x,
                      calib=[x], report_latency=False)
    assert small.b.in_features == 4
    torch.testing.assert_close(small(x), net(x), atol=1e-4, rtol=1e-4)
    plain, _ = shrink(net, ChannelPrune(per_layer={"a": 0.5}), x, report_latency=False)
    assert (plain(x) - net(x)).abs().max() > 1e-3  # without the refit it is not exact


def test_refit_is_the_least_squares_solution_with_the_bias():
    torch.manual_seed(1)
    net = Chain().eval()
    x = torch.randn(200, 6)
    graph = build_graph(net, x)
    group = graph.groups[0]
    classes = group.classes[:3]  # remove three hidden channels
    from prunekit.structured import remove_slices
    small = remove_slices(net, classes)
    reconstruct(net, small, classes, [x], dampening=0.0)
    kept = sorted(set(range(8)) - {i for c in classes for p, d, i in c.slices
                                   if p == "a.weight" and d == 0})
    h = torch.relu(net.a(x)).detach().double()
    rows = torch.cat([h[:, kept], torch.ones(200, 1, dtype=torch.float64)], dim=1)
    target = net.b(torch.relu(net.a(x))).detach().double()
    sol = torch.linalg.lstsq(rows, target).solution.T  # (5, kept + 1)
    torch.testing.assert_close(small.b.weight.double(), sol[:, :-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(small.b.bias.double(), sol[:, -1], atol=1e-4, rtol=1e-4)
    err = lambda m: float((m(x) - net(x)).detach().square().mean())  # noqa: E731
    assert err(small) < err(remove_slices(net, classes))


def test_refit_helps_a_real_cnn_without_fine_tuning():
    from prunekit.models import create
    torch.manual_seed(0)
    net = create("resnet20-cifar10").eval()  # random weights: no data needed
    x = torch.randn(32, 3, 32, 32)
    cfg = {"per_layer": {"layer*.conv1": 0.5}}
    a, _ = shrink(net, ChannelPrune(**cfg), x[:1], report_latency=False)
    b, _ = shrink(net, ChannelPrune(**cfg, reconstruct=True), x[:1], calib=[x],
                  report_latency=False)
    with torch.no_grad():
        ref = net(x)
        assert float((b(x) - ref).square().mean()) < float((a(x) - ref).square().mean())


def test_reconstruct_needs_calibration_inputs():
    net = Chain().eval()
    with pytest.raises(PruneError, match="reconstruct=True.*pass calib="):
        shrink(net, ChannelPrune(per_layer={"a": 0.5}, reconstruct=True), torch.randn(2, 6),
               report_latency=False)
