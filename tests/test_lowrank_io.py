"""A factorized model is a plain model that saves and loads in save_shrunk's format, alone
or after structured shrinking."""

import copy

import pytest
import torch
from torch import nn

from prunekit.lowrank import ALDS, SVD, Factorized, lowrank
from prunekit.structured import ChannelPrune, load_shrunk, read_description, save_shrunk, shrink

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))
        return self.fc(x.mean((2, 3)))


def _same(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)
    assert a.state_dict().keys() == b.state_dict().keys()


@pytest.mark.parametrize("config", [SVD(rank=4), ALDS(params_ratio=0.4, groups=(1, 2, 4))])
def test_factorized_model_saves_and_loads(tmp_path, config):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(4, 3, 16, 16)
    lowrank(model, config, progress=False)
    path = tmp_path / "m.safetensors"
    save_shrunk(model, path)
    assert read_description(path)["factorized"]  # the structure is recorded
    loaded = load_shrunk(Net(), path)
    assert isinstance(loaded.c2, Factorized) and loaded.c2.groups == model.c2.groups
    _same(model, loaded, x)


def test_shrunk_then_factorized_model_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    base, x = Net().eval(), torch.randn(4, 3, 16, 16)
    small, _ = shrink(base, ChannelPrune(channel_ratio=0.5), x, report_latency=False)
    lowrank(small, SVD(rank=3, include=("c2", "fc")), progress=False)
    path = tmp_path / "m.safetensors"
    save_shrunk(small, path)
    loaded = load_shrunk(Net(), path)
    assert loaded.c2[0].in_channels == 8 and loaded.c2.rank == 3
    _same(small, loaded, x)
    copy.deepcopy(loaded)(x).sum().backward()  # and it trains
