"""Structured pruning: coupling found by the graph, importance against brute force, budgets,
bad input, save / load and the CLI."""

import json
import re

import pytest
import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.structured import (
    ChannelPrune,
    build_graph,
    count_flops,
    load_shrunk,
    read_description,
    remove_slices,
    save_shrunk,
    score,
    shrink,
    taylor_scores,
    verify_graph,
)
from reference import masked_copy


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(nn.Module):
    """conv chain, a residual add, a concat, a depthwise conv, flatten into linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 1)
        self.dw = nn.Conv2d(14, 14, 3, padding=1, groups=14)
        self.head = nn.Linear(14 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.a(x)  # residual: stem and a share channels
        x = torch.cat([x, self.b(x)], 1)  # concat: indices of b shift by 8
        x = self.dw(x)  # depthwise: in channel k is out channel k
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # 16 columns per channel
        return self.head(x)


def test_graph_couples_residual_concat_depthwise_flatten():
    net = Net().eval()
    graph = build_graph(net, torch.randn(1, 3, 8, 8))
    assert len(graph.groups) == 2
    res = next(g for g in graph.groups if ("stem.weight", 0) in g.key)
    assert len(res.classes) == 8
    c = res.classes[3]
    got = {(p, d) for p, d, i in c.slices}
    # residual: stem, bn and a produce it; a and b consume it; depthwise and head follow it
    assert {("stem.weight", 0), ("bn.weight", 0), ("a.weight", 0), ("a.weight", 1),
            ("b.weight", 1), ("dw.weight", 0), ("head.weight", 1)} <= got
    assert all(i == 3 for p, d, i in c.slices if p in ("stem.weight", "dw.weight"))
    assert sorted(i for p, d, i in c.slices if p == "head.weight") == list(range(48, 64))
    cat = next(g for g in graph.groups if ("b.weight", 0) in g.key)
    c = cat.classes[2]
    assert sorted(i for p, d, i in c.slices if p == "dw.weight") == [10]  # 8 + 2


def test_shrink_equals_masking_on_a_hand_made_net():
    net = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = build_graph(net, x)
    chosen = [g.classes[i] for g in graph.groups for i in (0, 2)]
    small = remove_slices(net, chosen)
    assert small.stem.out_channels == 6 and small.dw.groups == 10 and small.b.out_channels == 4
    assert small.head.in_features == 10 * 16
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked_copy(net, chosen)(x), rtol=1e-5,
                                   atol=1e-6)


class NoCopyParameter(nn.Parameter):
    """A parameter that refuses to be deep-copied."""

    def __deepcopy__(self, memo):
        raise AssertionError("a tensor that is cut was copied whole first")


def test_remove_slices_never_copies_a_cut_tensor_whole():
    """Cut tensors are made from the original, not from a full copy of it (peak memory on
    large models); inplace gives the same model, and the original stays as it was."""
    net = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = build_graph(net, x)
    chosen = [g.classes[i] for g in graph.groups for i in (0, 2)]
    want = remove_slices(net, chosen)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.stem.weight = NoCopyParameter(net.stem.weight.detach().clone())
    small = remove_slices(net, chosen)
    assert type(small.stem.weight) is nn.Parameter and small.stem.out_channels == 6
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    in_place = remove_slices(net, chosen, inplace=True)
    assert in_place is net and net.stem.out_channels == 6
    with torch.no_grad():
        torch.testing.assert_close(small(x), want(x))
        torch.testing.assert_close(in_place(x), want(x))


@pytest.mark.parametrize("inplace", [False, True])
def test_cut_tied_weights_stay_one_parameter(inplace):
    """GPT-2's embedding and LM head are one Parameter; cutting residual channels out of it
    (include_reduced) leaves them one Parameter, in a copy and in place."""
    from prunekit.models import create

    model = create("tiny-gpt2")
    x = {"input_ids": torch.randint(0, 128, (1, 10))}
    graph = verify_graph(model, build_graph(model, x), x, reduced=True)
    stream = next(g for g in graph.groups if g.reduced)
    small = remove_slices(model, stream.classes[:3], inplace=inplace)
    assert small.lm_head.weight is small.transformer.wte.weight
    assert small.transformer.wte.weight.shape == (128, len(stream.classes) - 3)
    assert small(**x).logits.shape == (1, 10, 128)


class Pads(nn.Module):
    """A spatial pad before a conv, and a channel pad (2 zero channels each side) on both
    sides of a residual add: the padded channels are fixed, the ones between them are not."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3)
        self.c = nn.Conv2d(8, 12, 3, padding=1)
        self.d = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = torch.relu(self.b(nn.functional.pad(y, (1, 1, 1, 1))))
        z = self.c(y) + nn.functional.pad(y, (0, 0, 0, 0, 2, 2))
        return self.d(z).mean((2, 3))


def test_pads_keep_channels_prunable_and_shrink_exactly():
    net = Pads().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = build_graph(net, x)
    assert not graph.frozen_reasons
    a, b = (next(g for g in graph.groups if (f"{n}.weight", 0) in g.key) for n in "ab")
    assert len(a.classes) == 8  # the spatial pad keeps a's channels linked to b's input
    assert len(b.classes) == 8  # b's channels i are c's output channels i + 2
    assert all(sorted(i for p, d, i in cl.slices if p == "c.weight" and d == 0) ==
               [j + 2 for p, d, j in cl.slices if p == "b.weight" and d == 0]
               for cl in b.classes)
    assert not any(("c.weight", 0, i) in cl.slices for g in graph.groups for cl in g.classes
                   for i in (0, 1, 10, 11))  # c's outputs that meet the padded zeros
    chosen = [a.classes[1], a.classes[5], b.classes[0], b.classes[6]]
    small = remove_slices(net, chosen)
    assert small.c.out_channels == 10 and small.b.in_channels == 6
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked_copy(net, chosen)(x), rtol=1e-5,
                                   atol=1e-6)


def test_cifar_resnet_residual_stream_shrinks_through_option_a_shortcuts(tmp_path):
    """The zero channels of the option-A shortcuts are buffers, so every stage's residual
    stream is prunable: the stem's stream, and each padded half of stages 2 and 3."""
    from prunekit.models import create

    net = create("resnet20-cifar10").eval()
    x = torch.randn(2, 3, 32, 32)
    graph = build_graph(net, x)
    stream = [g for g in graph.groups if any(p.endswith("shortcut.front") or p == "conv1.weight"
                                             or p.endswith("shortcut.back") for p, _ in g.key)]
    assert sorted(len(g.classes) for g in stream) == [8, 8, 16, 16, 16]
    stem = next(g for g in stream if ("conv1.weight", 0) in g.key)
    # stem channel i runs on as channel i + 8 of stage 2 and i + 24 of stage 3
    cl = stem.classes[3]
    assert ("layer2.2.conv2.weight", 0, 11) in cl.slices
    assert ("layer3.2.conv2.weight", 0, 27) in cl.slices
    chosen = [g.classes[i] for g in graph.groups for i in (0, 2)]
    small = remove_slices(net, chosen)
    assert small.conv1.out_channels == 14 and small.layer3[0].shortcut.front.numel() == 14
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked_copy(net, chosen)(x), rtol=1e-4,
                                   atol=1e-5)
    path = tmp_path / "r20.safetensors"
    save_shrunk(small, path)
    rebuilt = load_shrunk(create("resnet20-cifar10"), path)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), small(x))


def test_grouped_conv_removes_the_same_local_index_from_every_group():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                        nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 6, 6)
    graph = build_graph(net, x)
    for g in graph.groups:
        for c in g.classes:
            first = sorted(i for p, d, i in c.slices if p == "0.weight" and d == 0)
            if first:
                assert len(first) == 2 and first[1] - first[0] == 4
    small = remove_slices(net, [graph.groups[0].classes[0]])
    assert small[2].groups == 2 and small[2].in_channels == 6
    small(x)


def test_l1_against_brute_force():
    net = Net().eval()
    x = torch.randn(4, 3, 8, 8)
    graph = build_graph(net, x)
    params = dict(net.named_parameters())
    s = score(net, graph, "l1")
    for g in graph.groups:
        for c in g.classes:
            l1 = sum(float(params[p].select(d, i).abs().sum()) for p, d, i in c.slices
                     if p in params and params[p].dim() >= 2)
            assert s[c.id] == pytest.approx(l1, rel=1e-5)


class Gated(nn.Module):
    """conv -> BN -> ReLU -> conv -> pool -> linear -> ReLU -> linear, with a multiplicative
    gate (all ones) on every channel and neuron that can be removed."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 5, 3)
        self.f1, self.f2 = nn.Linear(5, 7), nn.Linear(7, 3)
        for k, n in (("c", 6), ("p", 5), ("f", 7)):
            self.register_buffer(f"gate_{k}", torch.ones(n))

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x))) * self.gate_c.view(1, -1, 1, 1)
        h = self.c2(h).mean((2, 3)) * self.gate_p
        return self.f2(torch.relu(self.f1(h)) * self.gate_f)


def test_taylor_is_the_squared_gradient_of_a_gate_on_each_channel():
    """Molchanov's gate form: for each channel, (dL/dz)^2 for a gate z on its output, summed
    over micro-batches; checked against the gradients of explicit gates."""
    torch.manual_seed(0)
    net = Gated().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2)
    x, y = torch.randn(8, 3, 9, 9), torch.randint(0, 3, (8,))
    graph = build_graph(net, x[:1])
    t = score(net, graph, "taylor", calib=[(x, y)], micro_batch=4)
    want = {"c": torch.zeros(6), "p": torch.zeros(5), "f": torch.zeros(7)}
    gates = [t.requires_grad_() for t in (net.gate_c, net.gate_p, net.gate_f)]
    for s in (0, 4):
        loss = nn.functional.cross_entropy(net(x[s:s + 4]), y[s:s + 4])
        grads = torch.autograd.grad(loss, gates)
        for k, gr in zip(want, grads, strict=True):
            want[k] += gr.pow(2)
    producer = {"c": "c1.weight", "p": "c2.weight", "f": "f1.weight"}
    checked = 0
    for g in graph.groups:
        for c in g.classes:
            k = next(k for k, p in producer.items() if (p, 0) in {(q, d) for q, d, _ in
                                                                  c.slices})
            i = next(i for p, d, i in c.slices if p == producer[k] and d == 0)
            assert t[c.id] == pytest.approx(float(want[k][i]), rel=1e-4, abs=1e-12)
            checked += 1
    assert checked == 6 + 5 + 7


def test_taylor_weight_and_group_forms_sum_over_the_coupled_weights():
    """taylor_weight sums (g x w)^2 over every weight coupled with a channel (its filter and
    bias, its batch norm, and the next layer's input slice), per micro-batch; the "group"
    form squares their plain sum. Checked against slices named by hand."""
    torch.manual_seed(0)
    net = Gated().eval()
    x, y = torch.randn(8, 3, 9, 9), torch.randint(0, 3, (8,))
    graph = build_graph(net, x[:1])
    got_w = score(net, graph, "taylor_weight", calib=[(x, y)], micro_batch=4)
    got_g = taylor_scores(net, graph, [(x, y)], "group", micro_batch=4)
    coupled = {"c": ["c1.weight", "c1.bias", "bn.weight", "bn.bias", ("c2.weight", 1)],
               "p": ["c2.weight", "c2.bias", ("f1.weight", 1)],
               "f": ["f1.weight", "f1.bias", ("f2.weight", 1)]}
    params = dict(net.named_parameters())
    want_w = {k: torch.zeros(params[v[0]].shape[0]) for k, v in coupled.items()}
    want_g = {k: torch.zeros_like(v) for k, v in want_w.items()}
    for s in (0, 4):
        loss = nn.functional.cross_entropy(net(x[s:s + 4]), y[s:s + 4])
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        for k, names in coupled.items():
            plain = torch.zeros_like(want_w[k])
            for n in names:
                n, d = n if isinstance(n, tuple) else (n, 0)
                gw = (grads[n] * params[n]).detach().movedim(d, 0)
                gw = gw.reshape(len(gw), -1)
                want_w[k] += gw.pow(2).sum(1)
                plain += gw.sum(1)
            want_g[k] += plain.pow(2)
    checked = 0
    for g in graph.groups:
        for c in g.classes:
            k = next(k for k, v in coupled.items() if (v[0], 0) in {(p, d) for p, d, _ in
                                                                    c.slices})
            i = next(i for p, d, i in c.slices if p == coupled[k][0] and d == 0)
            assert got_w[c.id] == pytest.approx(float(want_w[k][i]), rel=1e-4, abs=1e-12)
            assert got_g[c.id] == pytest.approx(float(want_g[k][i]), rel=1e-4, abs=1e-12)
            checked += 1
    assert checked == 6 + 5 + 7
    with pytest.raises(PruneError, match="Taylor form"):
        taylor_scores(net, graph, [(x, y)], "gates")


def test_scoring_gives_back_train_mode_and_weights_when_it_fails():
    """A loss that fails part-way (here in SOSP's Hessian-vector product, after the first
    gradient) leaves the model in its own mode with its own weights, even while the
    traceback is still held."""
    torch.manual_seed(0)
    net = Gated().train()
    x, y = torch.randn(4, 3, 9, 9), torch.randint(0, 3, (4,))
    graph = build_graph(net, x[:1])
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calls = []

    def loss(model, batch):
        calls.append(model.training)
        if len(calls) == 2:
            raise RuntimeError("loss failed")
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    with pytest.raises(RuntimeError, match="loss failed") as failure:
        score(net, graph, "sosp", calib=[(x, y)], loss_fn=loss)
    assert failure.traceback and calls == [False, False]  # scored in eval mode
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("name,reads,writes", [
    ("tiny-gpt2", ("h.0.attn.c_proj.weight", 0), ("h.0.attn.c_attn.weight", 1)),  # Conv1D
    ("tiny-bert", ("layer.0.attention.output.dense.weight", 1),
     ("layer.0.attention.self.query.weight", 0)),
])
def test_taylor_reads_heads_at_the_output_projection(name, reads, writes):
    """A head's gate is read where the output projection takes it in, whichever way the
    weight is stored; the q/k/v rows that write it are not counted."""
    from prunekit.models import create

    model = create(name)
    x = {"input_ids": torch.randint(0, 128, (1, 8))}
    keys = {(p, d) for g in build_graph(model, x).groups for c in g.classes
            for p, d, _ in c.readers}
    assert any(p.endswith(reads[0]) and d == reads[1] for p, d in keys)
    assert not any(p.endswith(writes[0]) and d == writes[1] for p, d in keys)
    assert not any("wte" in p or "embeddings" in p for p, _ in keys)


def test_shrink_takes_your_own_scores():
    """Given the l1 scores it removes what importance="l1" removes; given their negation it
    keeps exactly those channels instead; incomplete scores are refused, naming the gap."""
    net = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = build_graph(net, x)
    l1 = score(net, graph, "l1")
    cfg = ChannelPrune(channel_ratio=0.5, importance="l2")
    by_name, _ = shrink(net, ChannelPrune(channel_ratio=0.5, importance="l1"), x,
                        report_latency=False)
    mine, report = shrink(net, cfg, x, report_latency=False, graph=graph, scores=l1)
    assert report.config["importance"] == "custom scores"
    for a, b in zip(by_name.state_dict().values(), mine.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    flipped, _ = shrink(net, cfg, x, report_latency=False, graph=graph,
                        scores={k: -v for k, v in l1.items()})
    assert flipped.stem.out_channels == mine.stem.out_channels
    assert not torch.equal(flipped.stem.weight, mine.stem.weight)
    with pytest.raises(PruneError, match="no importance for 1 channel classes"):
        shrink(net, cfg, x, graph=graph, scores=dict(list(l1.items())[1:]))
    with pytest.raises(PruneError, match="pass the graph"):
        shrink(net, cfg, x, scores=l1)


def test_sosp_hessian_vector_product_matches_autograd():
    from prunekit.structured.importance import _hvp, default_loss

    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.double), torch.randint(0, 3, (5,))
    plist = list(net.parameters())
    hv = _hvp(net, (x, y), default_loss, plist, eps=1e-5)
    g = torch.autograd.grad(default_loss(net, (x, y)), plist, create_graph=True)
    exact = torch.autograd.grad(sum((gi * p.detach()).sum() for gi, p in zip(g, plist)), plist)
    for a, b in zip(hv, exact, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_flops_params_and_ratio_budgets():
    from prunekit.models import create

    model = create("resnet20-cifar10")
    x = torch.randn(1, 3, 32, 32)
    small, rep = shrink(model, ChannelPrune(flops_ratio=0.6), x, report_latency=False)
    assert 0.5 < rep.flops_ratio <= 0.6
    assert rep.flops_after == count_flops(small, x)
    small, rep = shrink(model, ChannelPrune(params_ratio=0.7), x, report_latency=False)
    assert 0.6 < rep.params_ratio <= 0.7
    small, rep = shrink(model, ChannelPrune(channel_ratio=0.5, round_to=8), x, report_latency=False)
    for m in small.modules():
        if isinstance(m, nn.Conv2d) and m.out_channels not in (16, 32, 64, 10):
            assert m.out_channels % 8 == 0
    assert rep.params_after < rep.params_before
    assert all(g["removed"] * 2 <= g["units"] for g in rep.groups)
    # out of reach: the most that can be removed is returned, with a warning naming the
    # FLOPs it leaves and the target asked for
    with pytest.warns(UserWarning, match="flops target not reached") as caught:
        small, rep = shrink(model, ChannelPrune(flops_ratio=1e-3), x, report_latency=False)
    least, asked = re.search(r"leaves (\S+) > (\S+)", str(caught[0].message)).groups()
    assert float(least) == pytest.approx(rep.flops_after, rel=1e-3)
    assert float(asked) == pytest.approx(1e-3 * rep.flops_before, rel=1e-3)
    assert rep.flops_ratio > 1e-3 and rep.warnings


def test_per_layer_min_channels_and_clamp_warning():
    net = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    small, rep = shrink(net, ChannelPrune(per_layer={"stem": 0.1}, min_channels=3), x,
                        report_latency=False)
    assert small.stem.out_channels == 3  # 90% of 8 would leave 1 < min_channels
    assert small.b.out_channels == 6
    small, rep = shrink(net, ChannelPrune(per_layer={"b": 0.01}), x, report_latency=False)
    assert small.b.out_channels == 1


@pytest.mark.parametrize("bad,field", [
    (dict(channel_ratio=0.0), "channel_ratio=0.0 must be in \\(0, 1\\]: it is the fraction kept"),
    (dict(channel_ratio=0.7, flops_ratio=0.5), "takes one budget, not channel_ratio, flops_ratio"),
    (dict(flops_ratio=1.5), "flops_ratio=1.5"), (dict(channel_ratio="0.5"), "channel_ratio"),
    (dict(importance="tayler"), "importance: unknown criterion 'tayler'; did you mean 'taylor'"),
    (dict(per_layer={"a": 0.0}), "per_layer\\['a'\\]"), (dict(round_to=0), "round_to"),
    (dict(ignore="classifier"), "ignore takes a list"), (dict(seed=1.5), "seed")])
def test_bad_configs_are_refused_naming_the_field(bad, field):
    """At construction, before any work; the config is frozen and every ratio is kept."""
    with pytest.raises(PruneError, match=f"ChannelPrune.{field}"):
        ChannelPrune(**bad)
    cfg = ChannelPrune()
    assert cfg.flops_ratio == 0.5 and cfg.budget == "flops"
    with pytest.raises(AttributeError):
        cfg.flops_ratio = 0.3
    assert ChannelPrune(per_layer={"b": 0.5}).budget is None


def test_a_new_criterion_is_one_decorated_function(capsys):
    """Registered, it is a valid importance, it scores, and the CLI offers it."""
    from prunekit.cli import build_parser
    from prunekit.structured import CRITERIA

    @CRITERIA.register("negative_l1", needs="none")
    def negative_l1(model, graph, batches, loss_fn, seed, micro_batch):
        """Keeps the smallest weights (a throwaway test criterion)."""
        l1 = CRITERIA.get("l1")(model, graph, batches, loss_fn, seed, micro_batch)
        return {k: -v for k, v in l1.items()}

    try:
        net, x = Net().eval(), torch.randn(2, 3, 8, 8)
        small, report = shrink(net, ChannelPrune(channel_ratio=0.5, importance="negative_l1"),
                               x, report_latency=False)
        assert report.config["importance"] == "negative_l1" and small.stem.out_channels == 4
        with pytest.raises(SystemExit):
            build_parser().parse_args(["shrink", "--help"])
        assert "negative_l1: Keeps the smallest weights" in " ".join(
            capsys.readouterr().out.split())
    finally:
        CRITERIA.remove("negative_l1")


class Odd(nn.Module):
    def forward(self, h):
        return torch.sort(h, dim=1).values  # reorders channels: no rule follows that


class Sorty(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.odd = Odd()
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.odd(self.a(x)))


def test_unknown_op_names_module_and_ignore_fixes_it():
    net = Sorty()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 4)
    with pytest.raises(PruneError, match=r"odd: aten.sort.*ignore=\('odd',\)"):
        shrink(net, ChannelPrune(channel_ratio=0.5), x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(PruneError, match="no channel"):
        shrink(net, ChannelPrune(channel_ratio=0.5, ignore=("odd",)), x)  # a feeds odd: kept whole
    with pytest.raises(PruneError, match="matches no module"):
        shrink(net, ChannelPrune(channel_ratio=0.5, ignore=("nothere",)), x)


def test_taylor_needs_calibration():
    with pytest.raises(PruneError, match="calib"):
        shrink(Net().eval(), ChannelPrune(channel_ratio=0.7, importance="taylor"),
               torch.randn(1, 3, 8, 8))


def test_save_and_load_rebuild_from_the_original_constructor(tmp_path):
    from prunekit.models import create

    model = create("tiny-gpt2")
    x = {"input_ids": torch.randint(0, 128, (1, 10))}
    small, _ = shrink(model, ChannelPrune(per_layer={"*attn*": 0.5, "*mlp*": 0.7}), x,
                      report_latency=False)
    path = tmp_path / "small.safetensors"
    save_shrunk(small, path)
    desc = read_description(path)
    assert desc["attrs"]["transformer.h.0.attn"]["num_heads"] == 2
    rebuilt = load_shrunk(create("tiny-gpt2"), path)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**x).logits, small(**x).logits)
    assert rebuilt.lm_head.weight is rebuilt.transformer.wte.weight  # still tied
    with pytest.raises(PruneError, match="not in"):
        load_shrunk(Net(), path)


def test_iterative_steps_call_between_steps():
    net = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    seen = []

    def between(model, step):
        seen.append((step, model.stem.out_channels))
        return model

    small, rep = shrink(net, ChannelPrune(channel_ratio=0.5, iterative_steps=2), x,
                        between_steps=between, report_latency=False)
    assert [s for s, _ in seen] == [1]
    assert 4 <= seen[0][1] < 8 and small.stem.out_channels == 4


@pytest.mark.parametrize("cfg", [dict(channel_ratio=0.5), dict(per_layer={"stem": 0.5, "b": 0.66})])
def test_iterative_steps_end_on_the_one_shot_shapes(cfg):
    """Five steps of a linear schedule must not lose channels to rounding on the way
    (8 channels: floor at every step would stop at 5 kept, not 4)."""
    net = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    kept = []

    def between(model, step):
        kept.append(model.stem.out_channels)

    once, _ = shrink(net, ChannelPrune(**cfg), x, report_latency=False)
    steps, _ = shrink(net, ChannelPrune(**cfg, iterative_steps=5), x, between_steps=between,
                      report_latency=False)
    assert kept == sorted(kept, reverse=True) and kept[-1] < 8
    assert [m.weight.shape for m in steps.modules() if hasattr(m, "weight")] == \
        [m.weight.shape for m in once.modules() if hasattr(m, "weight")]
    assert once.stem.out_channels == 4


def test_iterative_global_ranking_removes_the_one_shot_count():
    """With one global threshold the groups may split differently, but five steps remove
    as many channels in all as one shot does (floor at every step removed fewer)."""
    net = Net().eval()
    x = torch.randn(1, 3, 8, 8)

    def kept(model):
        return model.stem.out_channels + model.b.out_channels

    once, _ = shrink(net, ChannelPrune(channel_ratio=0.5, global_ranking=True), x,
                     report_latency=False)
    steps, _ = shrink(net, ChannelPrune(channel_ratio=0.5, global_ranking=True,
                                        iterative_steps=5), x, report_latency=False)
    assert kept(once) == kept(steps) == 14 - 7


def test_cli_shrink(tmp_path, capsys):
    """`prunekit shrink` as a user types it: a JSON report, or the report as text and the
    file written; a gradient criterion gets calibration images of the model's dataset."""
    from prunekit.cli import main

    out = tmp_path / "r20.safetensors"
    assert main(["shrink", "resnet20-cifar10", "--flops-ratio", "0.7", "--out", str(out),
                 "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["flops_ratio"] <= 0.7
    assert read_description(out)["format"] == "prunekit-shrunk-1"
    text = tmp_path / "taylor.safetensors"
    assert main(["shrink", "resnet20-cifar10", "--flops-ratio", "0.8", "--importance",
                 "taylor_weight", "--calib-samples", "16", "--out", str(text), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "FLOPs" in printed and printed.rstrip().endswith(f"wrote {text}")
    saved = read_description(text)["extra"]["report"]
    assert saved["config"]["importance"] == "taylor_weight" and saved["flops_ratio"] <= 0.8
    assert main(["shrink", "resnet20-cifar10", "--channel-ratio", "0.75", "--json",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["channel_ratio"] == 0.75
    assert all(g["removed"] == g["units"] // 4 for g in report["groups"] if not g["reduced"])


class HardCoded(nn.Module):
    """`a`'s 12 outputs are viewed as a hard-coded (3, 4): the trace sees 3 removable blocks,
    but any removal breaks the view. `branches` more linear pairs shrink cleanly."""

    def __init__(self, branches=1):
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(4, 5)
        self.up = nn.ModuleList(nn.Linear(8, 6) for _ in range(branches))
        self.down = nn.ModuleList(nn.Linear(6, 3) for _ in range(branches))

    calls = 0  # forward passes of every copy (the shrunk models are deep copies)

    def forward(self, x):
        HardCoded.calls += 1
        h = self.a(x).view(x.shape[0], 3, 4)
        out = self.b(h).sum(1)
        for u, d in zip(self.up, self.down):
            out = torch.cat([out, d(u(x).relu())], -1)
        return out


def test_verify_freezes_groups_that_break_and_names_them():
    torch.manual_seed(0)
    model, x = HardCoded().eval(), torch.randn(2, 8)
    raw = build_graph(model, x)
    bad = [g for g in raw.groups if g.name == "a"]
    assert bad, "the trace no longer offers a's blocks: pick another hard-coded example"
    with pytest.raises(RuntimeError):
        remove_slices(model, bad[0].classes[:1])(x)
    with pytest.warns(UserWarning, match=r"left unpruned.*\ba \(RuntimeError"):
        graph = verify_graph(model, build_graph(model, x), x)
    assert {g.name for g in graph.groups} == {g.name for g in raw.groups} - {"a"}
    assert "a" in graph.frozen_reasons
    with pytest.warns(UserWarning, match="left unpruned"):
        small, _ = shrink(model, ChannelPrune(channel_ratio=0.5), x, report_latency=False)
    assert small.a.out_features == 12 and small.up[0].out_features == 3
    assert small(x).shape == model(x).shape


def test_verify_finds_one_bad_group_by_bisection():
    """One bad group among 33: far fewer forward passes than testing each group alone."""
    torch.manual_seed(0)
    model, x = HardCoded(branches=32).eval(), torch.randn(2, 8)
    raw = build_graph(model, x)
    n = len(raw.groups)
    assert n == 33
    HardCoded.calls = 0
    with pytest.warns(UserWarning, match="1 channel group"):
        graph = verify_graph(model, raw, x)
    assert len(graph.groups) == n - 1
    # one check = the masked model + the shrunk one in eval and training mode; bisection down
    # to one bad group of 33 takes 1 + 2 * 6 checks, then one check of what is left
    assert 0 < HardCoded.calls <= 3 * (1 + 2 * 6 + 1) < 3 * n
    calls = HardCoded.calls
    assert verify_graph(model, graph, x) is graph and HardCoded.calls == calls  # once
