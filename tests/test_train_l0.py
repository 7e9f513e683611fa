"""L0 hard-concrete gates with a Lagrange multiplier: the asked sparsity is reached on real
data (scikit-learn digits) while the network keeps working."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import prunekit.train as T
from prunekit.train.l0 import HardConcreteGate


def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


@pytest.mark.slow
def test_l0_reaches_its_target_within_one_point():
    density = 0.1
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    l0 = T.L0(model, opt, density=density, t_end=600)
    g = torch.Generator().manual_seed(1)
    multipliers = []
    for _ in range(620):
        idx = torch.randint(0, len(ytr), (128,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
        l0.step()
        multipliers.append(l0.multiplier)
    assert l0.finalized and l0.next_event() is None
    assert max(multipliers) > 0  # the constraint was active and enforced by lambda
    assert abs(l0.sparsity() - (1 - density)) <= 0.01
    zeros = sum(int((m.weight == 0).sum()) for m in (model[0], model[2]))
    assert zeros / (64 * 128 + 128 * 10) == pytest.approx(l0.sparsity(), abs=1e-9)
    model.eval()
    acc = float((model(xte).argmax(1) == yte).float().mean())
    assert acc > 0.9, acc


def test_l0_gate_math_and_finalize_fold():
    gate = HardConcreteGate((1000,), 0.0, 2 / 3, -0.1, 1.1)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-6, 6, 1000))
        z = torch.stack([gate.gate(True) for _ in range(400)])
    # P(z > 0) from samples matches the closed form within sampling error.
    torch.testing.assert_close((z > 0).float().mean(0), gate.open_probability().detach(),
                               atol=0.1, rtol=0)
    assert ((z >= 0) & (z <= 1)).all() and (z == 0).any() and (z == 1).any()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    l0 = T.L0(model, opt, density=0.5, t_end=100)
    with torch.no_grad():
        for g in l0.gates.values():
            g.log_alpha.normal_(0, 3)
    model.eval()
    x = torch.randn(4, 6)
    before = model(x)
    closed = 1 - sum(int((g.gate(False) > 0).sum()) for g in l0.gates.values()) / 45
    l0.finalize()
    torch.testing.assert_close(model(x), before)
    assert l0.sparsity() == pytest.approx(closed)
    assert "parametrizations" not in "".join(model.state_dict())
