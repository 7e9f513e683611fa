"""Per-group widths: the DP over a width table against brute force, shrink with
allocation='dp' within its budget, the latency table, AMC over widths, and bad input."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit.budget.dp import Unreachable
from prunekit.errors import PruneError
from prunekit.structured import ChannelPrune, build_graph, count_flops, score, shrink
from prunekit.structured.widths import (
    WidthTable,
    amc_widths,
    candidate_widths,
    shrink_for_speedup,
    width_table,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_dp_over_widths_matches_brute_force(data):
    groups = data.draw(st.integers(1, 3))
    errors, saving = [], []
    for _ in range(groups):
        k = data.draw(st.integers(1, 4))
        # more cut (later widths): more error and more saving
        e = sorted(data.draw(st.lists(st.floats(0, 5), min_size=k, max_size=k)))
        s = sorted(data.draw(st.lists(st.integers(0, 30), min_size=k, max_size=k)))
        errors.append([0.0] + e)
        saving.append([0.0] + [float(x) for x in s])
    table = WidthTable([None] * groups, [[9] * len(e) for e in errors], errors,
                       {"flops": saving}, {"flops": 100.0})
    target = data.draw(st.floats(100 - sum(max(s) for s in saving) - 5, 100))
    combos = [c for c in itertools.product(*[range(len(e)) for e in errors])
              if table.predict("flops", c) <= target + 1e-9]
    if not combos:
        with pytest.raises(Unreachable, match="cannot be met") as e:
            table.allocate("flops", target, resolution=None)
        assert e.value.best == pytest.approx(100 - sum(max(s) for s in saving))
        return
    choice = table.allocate("flops", target, resolution=None)
    assert table.predict("flops", choice) <= target + 1e-9
    best = min(sum(errors[g][k] for g, k in enumerate(c)) for c in combos)
    assert sum(errors[g][k] for g, k in enumerate(choice)) == pytest.approx(best)


class Tower(nn.Module):
    """Two independent inner groups (a's and c's outputs) around a fixed stream."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 64, 1)
        self.d = nn.Conv2d(64, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.b(torch.relu(self.a(x)))
        x = x + self.d(torch.relu(self.c(x)))
        return self.head(x.mean((2, 3)))


@pytest.fixture
def tower():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 10, (8,))
    return Tower().eval(), x, [(x, y)]


def test_candidate_widths_are_multiples_of_the_step(tower):
    net, x, _ = tower
    graph = build_graph(net, x)
    groups = {g.name: g for g in graph.groups}
    assert candidate_widths(groups["a"], 8, 12, 1) == [32, 24, 16, 8]
    assert candidate_widths(groups["c"], 8, 12, 1) == [64, 56, 48, 40, 32, 24, 16, 8]
    assert candidate_widths(groups["c"], 8, 4, 1) == [64, 40, 24, 8]  # at most `levels`
    assert candidate_widths(groups["c"], 16, 12, 20) == [64, 48, 32]  # at least `least`


@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_dp_allocation_meets_its_flops_budget(tower, ratio):
    net, x, calib = tower
    cfg = ChannelPrune(flops_ratio=ratio, allocation="dp", cut=("a", "c"))
    small, report = shrink(net, cfg, x[:1], calib=calib, report_latency=False)
    assert count_flops(small, x[:1]) <= ratio * count_flops(net, x[:1])
    kept = {g["group"]: g["units"] - g["removed"] for g in report.groups}
    assert all(k % 8 == 0 for k in kept.values())  # widths in steps of 8


def test_width_table_times_every_level_in_the_model(tower):
    net, x, calib = tower
    cfg = ChannelPrune(cut=("a", "c"))
    graph = build_graph(net, x)
    scores = score(net, graph, "l1")
    table = width_table(net, graph, scores, x, cfg, calib, metrics=("latency", "flops"),
                        repeats=2)
    assert table.base["latency"] > 0 and len(table.saving["latency"]) == 2
    assert [len(s) for s in table.saving["latency"]] == [len(w) for w in table.widths]
    assert table.saving["flops"][0][0] == 0 and table.saving["flops"][0][-1] > 0
    assert all(e[0] == 0.0 for e in table.errors)


def test_shrink_for_speedup_and_amc_over_widths(tower):
    net, x, calib = tower
    cfg = ChannelPrune(cut=("a", "c"), allocation="dp", flops_ratio=1.0)
    base = count_flops(net, x)

    def by_flops(dense, small):  # a deterministic stand-in for timing
        return base / count_flops(small, x)

    graph = build_graph(net, x)
    scores = score(net, graph, "l1")
    table = width_table(net, graph, scores, x, cfg, calib, metrics=("flops",))
    table.saving["latency"], table.base["latency"] = table.saving["flops"], table.base["flops"]
    found = shrink_for_speedup(net, cfg, x, 1.3, calib, table=table, measure=by_flops,
                               progress=False)
    assert found.measured >= 1.3
    with torch.no_grad():
        ref = net(x).argmax(1)

    def agreement(model):
        with torch.no_grad():
            return 100.0 * float((model(x).argmax(1) == ref).float().mean())

    result, widths = amc_widths(net, table, scores, agreement, "flops", 0.8 * base,
                                episodes=6, warmup=3, hidden=16, seed=0, progress=False)
    assert len(result.history) == 6 and len(widths) == 2
    assert table.cost_at("flops", result.keep) <= 0.8 * base * (1 + 1e-9)


@pytest.mark.data
def test_cli_shrink_with_dp_widths_and_reconstruction(tmp_path, capsys):
    import json

    from prunekit.cli import main
    assert main(["shrink", "resnet20-cifar10", "--flops-ratio", "0.6", "--allocation", "dp",
                 "--cut", "layer*.conv1", "--reconstruct", "--calib-samples", "32", "--json",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["flops_ratio"] <= 0.6
    assert report["config"]["allocation"] == "dp" and report["config"]["reconstruct"]
    kept = [g["units"] - g["removed"] for g in report["groups"] if g["removed"]]
    assert kept and all(k % 8 == 0 for k in kept)


def test_bad_dp_configs(tower):
    net, x, _ = tower
    with pytest.raises(PruneError, match="allocation='dp'.*budget"):
        ChannelPrune(per_layer={"a": 0.5}, allocation="dp")
    with pytest.raises(PruneError, match="pass calib="):
        shrink(net, ChannelPrune(flops_ratio=0.5, allocation="dp"), x[:1],
               report_latency=False)
    with pytest.raises(Unreachable, match="cannot be met.*predicted"):
        shrink(net, ChannelPrune(flops_ratio=0.05, allocation="dp", cut=("a", "c")),
               x[:1], calib=[x], report_latency=False)
