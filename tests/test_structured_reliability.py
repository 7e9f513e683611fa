"""Structured pruning where it used to go wrong silently (issue 24) or cost too much (issue 19):
a forward that branches on its data, weight-normed and otherwise parametrized layers, tied
weights, per-module train/eval modes, and budget searches that copied the whole model per
probe."""

import collections
import copy

import pytest
import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.structured import (
    ChannelPrune,
    build_graph,
    count_flops,
    count_params,
    load_shrunk,
    measure_latency,
    remove_slices,
    save_shrunk,
    score,
    shrink,
    verify_graph,
)
from reference import masked_copy


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, saved):
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def close(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) < 1e-5


# ----- data-dependent control flow --------------------------------------------------------

class Branchy(nn.Module):
    """Takes `c` only when the input sums above zero: a trace on a negative input never sees
    it, and a model shrunk on that trace fails on positive inputs."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.b = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if x.sum() > 0:
            h = torch.relu(self.c(h))
        return self.b(h)


def test_a_forward_that_branches_on_data_is_refused():
    torch.manual_seed(0)
    model = Branchy().eval()
    saved = state(model)
    with pytest.raises(PruneError, match=r"Branchy branches on the values of its inputs.*"
                                         r"aten.t in b .*aten.t in c "):
        shrink(model, ChannelPrune(channel_ratio=0.5), -torch.ones(2, 8))
    assert same_state(model, saved)


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.f, self.g = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, h):
        return self.f(h) if h.sum() > 0 else self.g(h)


class Gated(nn.Module):
    """The branch lives in a submodule: leaving that module whole makes shrinking safe."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16, bias=False)  # a(-x) = -a(x): the negated input flips the gate
        self.gate = Gate()
        self.b, self.head = nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.head(torch.relu(self.b(self.gate(self.a(x)))))


def test_a_branching_submodule_is_named_and_ignoring_it_shrinks_safely():
    torch.manual_seed(0)
    model, x = Gated().eval(), torch.randn(2, 8)
    with pytest.raises(PruneError, match=r"ignore=\('gate',\)"):
        shrink(model, ChannelPrune(channel_ratio=0.5), x, report_latency=False)
    # what an ignored module reads stays inside it: no warning either
    small, report = shrink(model, ChannelPrune(channel_ratio=0.5, ignore=("gate",)), x,
                           report_latency=False)
    assert small.b.out_features == 6 and small.gate.f.in_features == 16
    assert not report.warnings
    graph = build_graph(model, x, ignore=("gate",))
    assert [g.name for g in graph.groups] == ["b"] and not graph.data_reads
    chosen = graph.groups[0].classes[::2]
    part, masked = remove_slices(model, chosen), masked_copy(model, chosen)
    with torch.no_grad():
        assert (model.a(x).sum() > 0) != (model.a(-x).sum() > 0)  # x and -x: both paths
        for inputs in (x, -x):
            assert close(part(inputs), masked(inputs))
            assert small(inputs).shape == (2, 4)


class Checked(nn.Module):
    """Reads its input into Python to validate it, with one path whatever the data."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        if torch.isnan(x).any():
            raise ValueError("NaN input")
        return self.b(torch.relu(self.a(x)))


def test_a_forward_that_reads_data_on_one_path_is_shrunk_with_a_warning():
    torch.manual_seed(0)
    model, x = Checked().eval(), torch.randn(2, 8)
    with pytest.warns(UserWarning, match=r"<model>: aten._local_scalar_dense.*same path"):
        small, report = shrink(model, ChannelPrune(channel_ratio=0.5), x, report_latency=False)
    assert small.a.out_features == 8 and report.warnings


# ----- parametrized weights ---------------------------------------------------------------

class WeightNormed(nn.Module):
    def __init__(self, legacy=False):
        super().__init__()
        wn = nn.utils.weight_norm if legacy else nn.utils.parametrizations.weight_norm
        self.c1 = wn(nn.Conv2d(3, 8, 3, padding=1))
        self.c2 = wn(nn.Conv2d(8, 8, 3, padding=1))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def plain_weights(model):
    """The same function with the weight norms folded into plain weights (a new model:
    remove_parametrizations on a deep copy would strip the class that the copy shares)."""
    plain = WeightNormed.__new__(WeightNormed)
    nn.Module.__init__(plain)
    plain.c1, plain.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    plain.fc = copy.deepcopy(model.fc)
    with torch.no_grad():
        for name in ("c1", "c2"):
            getattr(plain, name).weight.copy_(getattr(model, name).weight)
            getattr(plain, name).bias.copy_(getattr(model, name).bias)
    return plain.eval()


@pytest.mark.filterwarnings("ignore:.*weight_norm. is deprecated:FutureWarning")
@pytest.mark.parametrize("legacy", [False, True], ids=["parametrizations", "hook"])
def test_weight_normed_layers_shrink_through_their_own_parameters(legacy, tmp_path):
    """w = g * v / ||v|| per output channel: removing an output channel cuts g and v's row
    and equals zeroing that row of w; the channels a weight-normed layer reads are normed
    over (removing one rescales the others), so they are approximate and kept by default."""
    torch.manual_seed(0)
    model, x = WeightNormed(legacy).eval(), torch.randn(2, 3, 6, 6)
    graph = verify_graph(model, build_graph(model, x), x)
    by_layer = {g.name: g for g in graph.groups}
    assert by_layer["c1"].reduced and not by_layer["c2"].reduced
    chosen = by_layer["c2"].classes[1::2]
    cut = {i for c in chosen for p, d, i in c.slices if p.startswith("c2.") and d == 0}
    small = remove_slices(model, chosen)
    plain = plain_weights(model)
    with torch.no_grad():
        for i in cut:
            plain.c2.weight[i] = 0
            plain.c2.bias[i] = 0
        assert close(small(x), plain(x))
    shrunk, report = shrink(model, ChannelPrune(channel_ratio=0.5), x, report_latency=False)
    assert shrunk.c2.out_channels == 4 and shrunk.c1.out_channels == 8
    assert shrunk.c2.weight.shape == (4, 8, 3, 3) and report.params_after < report.params_before
    path = tmp_path / "wn.safetensors"
    save_shrunk(shrunk, path)
    rebuilt = load_shrunk(WeightNormed(legacy), path)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), shrunk(x))


class Orthogonal(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.utils.parametrizations.orthogonal(nn.Linear(8, 8))
        self.b, self.c = nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_another_parametrization_is_refused_naming_the_layer_and_ignoring_it_works():
    torch.manual_seed(0)
    model, x = Orthogonal().eval(), torch.randn(3, 8)
    saved = state(model)
    with pytest.raises(PruneError, match=r"a.parametrizations.weight.*ignore=\('a',\)"):
        shrink(model, ChannelPrune(channel_ratio=0.5), x, report_latency=False)
    assert same_state(model, saved)
    small, _ = shrink(model, ChannelPrune(channel_ratio=0.5, ignore=("a",)), x,
                      report_latency=False)
    assert small.b.out_features == 3 and small.a.weight.shape == (8, 8)
    assert small(x).shape == (3, 2)


# ----- tied weights ---------------------------------------------------------------------

class Twins(nn.Module):
    """Two layers with one weight (tied by object, or by storage only) in parallel."""

    def __init__(self, by_storage=False):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 2)
        self.b.weight = nn.Parameter(self.a.weight.data) if by_storage else self.a.weight

    def forward(self, x):
        return self.head(torch.relu(self.a(x)) * torch.sigmoid(self.b(2 * x)))


@pytest.mark.parametrize("by_storage", [False, True], ids=["one-object", "one-storage"])
def test_tied_weights_are_cut_together_stay_tied_and_are_reported(by_storage):
    torch.manual_seed(0)
    model, x = Twins(by_storage).eval(), torch.randn(3, 8)
    graph = verify_graph(model, build_graph(model, x), x)
    assert graph.tied == [["a.weight", "b.weight"]] and len(graph.groups) == 1
    chosen = graph.groups[0].classes[::3]
    small = remove_slices(model, chosen)
    assert small.a.weight.data_ptr() == small.b.weight.data_ptr()  # still one tensor
    assert (small.a.weight is small.b.weight) == (not by_storage)
    with torch.no_grad():
        assert close(small(x), masked_copy(model, chosen)(x))
    shrunk, report = shrink(model, ChannelPrune(channel_ratio=0.5), x, report_latency=False)
    assert shrunk.a.weight.shape == (8, 8)
    assert shrunk.a.weight.data_ptr() == shrunk.b.weight.data_ptr()
    assert report.tied == [["a.weight", "b.weight"]] and "a.weight = b.weight" in str(report)
    assert report.params_after == count_params(shrunk)


class Fused(nn.Module):
    """Two layers whose weights are two halves of one storage (a fused projection)."""

    def __init__(self):
        super().__init__()
        fused = torch.randn(32, 8) * 0.3
        self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(32, 2)
        self.a.weight = nn.Parameter(fused[:16])
        self.b.weight = nn.Parameter(fused[16:])

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], 1))


def test_weights_that_are_views_of_one_storage_are_left_whole():
    torch.manual_seed(0)
    model, x = Fused().eval(), torch.randn(3, 8)
    graph = build_graph(model, x)
    assert not graph.groups and any("shares storage" in r for r in graph.frozen_reasons.values())
    with pytest.raises(PruneError, match="no channel that can be removed"):
        shrink(model, ChannelPrune(channel_ratio=0.5), x, report_latency=False)


# ----- modes ------------------------------------------------------------------------------

class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn, self.c2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c(x)))).mean((2, 3))


def test_every_step_gives_back_each_modules_own_mode():
    """A training model with a batch norm frozen in eval: shrink and every step of it leave
    the original's modes module by module, and the smaller model has the same modes."""
    torch.manual_seed(0)
    model, x = Frozen().train(), torch.randn(2, 3, 8, 8)
    model.bn.eval()
    modes = {n: m.training for n, m in model.named_modules()}

    def now(m):
        return {n: mm.training for n, mm in m.named_modules()}

    graph = build_graph(model, x)
    verify_graph(model, graph, x)
    score(model, graph, "taylor", calib=[x])
    count_flops(model, x)
    measure_latency(model, x, repeats=1, warmup=0)
    assert now(model) == modes
    small, _ = shrink(model, ChannelPrune(channel_ratio=0.5, importance="taylor"), x,
                      calib=[x])
    assert now(model) == modes and now(small) == modes


# ----- the cost of a budget search ----------------------------------------------------------

class CountedParameter(nn.Parameter):
    """A parameter that counts its deep copies."""

    copies: collections.Counter = collections.Counter()

    def __deepcopy__(self, memo):
        CountedParameter.copies[self.name_for_test] += 1
        new = nn.Parameter(self.detach().clone(), requires_grad=self.requires_grad)
        memo[id(self)] = new
        return new


@pytest.mark.parametrize("budget", ["flops_ratio", "params_ratio"])
def test_a_budget_search_copies_no_weight_more_than_once(budget):
    """13 bisection probes and the verification of every group used to deep-copy the whole
    model each; now every weight is copied once, into the result."""
    from prunekit.models import create

    model, x = create("resnet20-cifar10").eval(), torch.randn(1, 3, 32, 32)
    for mname, m in model.named_modules():
        for k, p in [(k, p) for k, p in m._parameters.items() if p is not None]:
            counted = CountedParameter(p.detach().clone())
            counted.name_for_test = f"{mname}.{k}"
            m._parameters[k] = counted
    CountedParameter.copies.clear()
    small, report = shrink(model, ChannelPrune(**{budget: 0.6}), x, report_latency=False)
    assert report.flops_ratio < 1 and report.params_ratio <= (0.6 if budget[0] == "p" else 1)
    assert CountedParameter.copies and max(CountedParameter.copies.values()) == 1


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.c3 = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 12, 1)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h = torch.relu(self.bn1(self.c1(x)))
        h = torch.relu(self.c3(torch.relu(self.c2(h))))
        return self.head(h.mean((2, 3)))


def test_meta_and_real_probes_count_the_same(monkeypatch):
    """FLOPs and parameter probes on the meta device give the counts of the real smaller
    model, so a budget search ends on the same channels either way."""
    from prunekit.structured import plan

    torch.manual_seed(0)
    model, x = Tower().eval(), torch.randn(1, 3, 8, 8)
    graph = verify_graph(model, build_graph(model, x), x)
    scores = score(model, graph, "l1")
    cfg = ChannelPrune(flops_ratio=0.5)
    chosen = plan.plan(graph, scores, 0.4, cfg, [])
    small = remove_slices(model, chosen)
    monkeypatch.setattr(plan, "META_BYTES", 0)
    for what, real in (("flops", count_flops(small, x)), ("params", count_params(small))):
        probe = plan.Probe(model, x, what)
        assert probe.meta is not None and probe(chosen) == real
    target = 0.5 * count_flops(model, x)
    on_meta = plan.search(plan.Probe(model, x, "flops"), graph, scores, cfg, target, [])
    monkeypatch.setattr(plan, "META_BYTES", 1 << 60)
    probe = plan.Probe(model, x, "flops")
    assert probe.meta is None
    assert plan.search(probe, graph, scores, cfg, target, []) == on_meta
