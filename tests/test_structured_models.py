"""Equivalence on torchvision's classification models (one per architecture family; all 80 with
PRUNEKIT_TV_ALL=1) and tiny BERT / GPT-2 / LLaMA: zero a
random 30% of every coupled channel group, shrink the same channels away, and the smaller
model's outputs equal the masked model's; the shrunk model trains (forward and backward).
And generated from the criteria registry: every criterion shrinks every tiny model (and a
small CNN) into a model whose outputs equal the masked model's."""

import os

import pytest
import torch
import torchvision
from torch.utils._pytree import tree_flatten

from prunekit.structured import (
    CRITERIA,
    ChannelPrune,
    build_graph,
    remove_slices,
    score,
    shrink,
    verify_graph,
)
from prunekit.structured.plan import plan, removed_fraction
from reference import masked_copy

TV_MODELS = torchvision.models.list_models(module=torchvision.models)
#: One model per torchvision builder and block type: its larger siblings (resnet152 beside
#: resnet50, vit_h_14 beside vit_b_32, regnet_y_128gf beside regnet_y_400mf, ...) run the same
#: code with more and wider layers and cost most of the time; maxvit_t (224x224 windows) and
#: efficientnet_v2_s (efficientnet_b0's blocks plus fused ones) took 3 and 2 minutes of CI
#: alone. PRUNEKIT_TV_ALL=1 runs all 80.
TV_FAMILIES = {
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3",
    "mnasnet0_5", "mobilenet_v2",
    "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf",
    "resnet18", "resnet50", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0",
    "squeezenet1_1", "swin_t", "swin_v2_t", "vgg11", "vgg11_bn", "vit_b_32",
}
TV_RUN = TV_MODELS if os.environ.get("PRUNEKIT_TV_ALL") == "1" else [
    n for n in TV_MODELS if n in TV_FAMILIES]

# the big ones (>~60M parameters or 224x224 transformers) run in the slow set
HEAVY = {
    "convnext_base", "convnext_large", "convnext_small", "densenet161", "densenet169",
    "densenet201", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_l", "efficientnet_v2_m", "inception_v3", "maxvit_t", "regnet_x_16gf",
    "regnet_x_32gf", "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf", "regnet_y_32gf",
    "regnet_y_8gf", "resnet101", "resnet152", "resnext101_32x8d", "resnext101_64x4d",
    "swin_b", "swin_s", "swin_v2_b", "swin_v2_s", "swin_v2_t", "swin_t", "vgg11", "vgg11_bn",
    "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "vit_b_16", "vit_b_32",
    "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2", "wide_resnet50_2", "alexnet",
}
SIZE = {"inception_v3": 299,  # its auxiliary head (training mode) needs full size
        "maxvit_t": 224,  # window partitions of 7 at every stage
        "vit_h_14": 56}
# ViTs are built for the small input (image_size sets the position-embedding length)
BUILD = {n: {"image_size": SIZE.get(n, 64)} for n in TV_MODELS if n.startswith("vit_")}
BATCH = {"inception_v3": 2}  # the auxiliary head's batch norm sees 1x1 maps: needs a batch


@pytest.fixture(autouse=True)
def _threads(request):
    """One thread for the small models (many small ops gain nothing from threads); the
    heavy ones, whose large convolutions and weight initialisation do, use torch's default."""
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(model):
    """Non-trivial batch-norm statistics and no all-zero weights (torchvision zero-inits some
    heads), so every channel matters to the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def pick(graph, frac, seed=0):
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for g in graph.groups:
        if g.reduced:
            continue
        n = len(g.classes)
        k = min(int(frac * n), n - 1)
        chosen += [g.classes[i] for i in torch.randperm(n, generator=gen)[:k].tolist()]
    return chosen


def out_tensor(y):
    y = getattr(y, "logits", y)
    return y[0] if isinstance(y, (tuple, list)) else y


def trained_params(model, x):
    model.train()
    out = run(model, x)
    out = out.to_tuple() if hasattr(out, "to_tuple") else out
    tensors = [t for t in tree_flatten(out)[0] if torch.is_tensor(t) and t.is_floating_point()]
    sum(t.float().pow(2).mean() for t in tensors).backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def run(model, x):
    return model(**x) if isinstance(x, dict) else model(x)


def check_equivalence(model, x, criterion):
    model = randomise(model)
    graph = verify_graph(model, build_graph(model, x), x)
    assert graph.groups, "no prunable group found"
    # the trace alone got every coupling right: verification had no group to take out
    assert not [r for r in graph.frozen_reasons.values() if "breaks the model" in r]
    chosen = pick(graph, 0.3)
    assert chosen, "30% of every group rounds to nothing"
    small = remove_slices(model, chosen)
    masked = masked_copy(model, chosen)
    with torch.no_grad():
        y_ref = out_tensor(run(model, x))
        y_mask = out_tensor(run(masked, x))
        y_small = out_tensor(run(small, x))
    del masked  # the largest models: keep at most the original and one smaller copy
    scale = y_mask.abs().max().clamp_min(1e-12)
    assert y_small.shape == y_mask.shape
    assert ((y_small - y_mask).abs().max() / scale) < 1e-4
    assert not torch.allclose(y_ref, y_mask)  # the masked channels did matter
    n0 = sum(p.numel() for p in model.parameters())
    n1 = sum(p.numel() for p in small.parameters())
    assert n1 < n0
    # the shrunk model trains: forward and backward (training mode, auxiliary heads too)
    # reach the same parameters as in the original model
    small_trained = trained_params(small, x)
    del small
    # each criterion scores and shrinks (rotated over the models to keep CI short)
    calib = x if isinstance(x, dict) else [x]
    _, report = shrink(model.eval(), ChannelPrune(channel_ratio=0.7, importance=criterion), x,
                       calib=calib, report_latency=False, graph=graph)
    del _
    assert report.params_after < report.params_before
    assert report.flops_after < report.flops_before
    # last, as training mode moves the original's batch-norm statistics
    assert small_trained == trained_params(model, x)


# the fast tier runs a few small models of distinct structure (residual, depthwise and
# squeeze-excitation, channel shuffle and split, concat); the slow set runs them all
FAST = {"resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1"}


def _params(name):
    marks = [] if name in FAST else [pytest.mark.slow]
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", [_params(n) for n in TV_RUN])
def test_torchvision_equivalence(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **BUILD.get(name, {})).eval()
    s = SIZE.get(name, 64)
    criteria = CRITERIA.names()
    criterion = criteria[TV_MODELS.index(name) % len(criteria)]
    if criterion == "sosp" and name in HEAVY:  # three gradient passes: 14 GB on vit_h_14
        criterion = "taylor"
    check_equivalence(model, torch.randn(BATCH.get(name, 1), 3, s, s), criterion)


TINY = ["tiny-bert", "tiny-gpt2", "tiny-llama"]


def tiny_input():
    return {"input_ids": torch.randint(0, 128, (2, 12),
                                       generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("name", TINY)
def test_transformers_equivalence(name):
    from prunekit.models import create

    check_equivalence(create(name), tiny_input(), "l1")


class SmallCNN(torch.nn.Module):
    """conv-BN-ReLU stem, a residual block, a concat branch, global pooling, linear head."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12),
                                   nn.ReLU(), nn.Conv2d(12, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.side = nn.Sequential(nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Linear(14, 5)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        h = torch.cat([h, self.side(h)], 1)
        return self.head(h.mean((2, 3)))


_PREPARED: dict = {}


def prepared(name):
    """(model, example input, verified graph), built once per model for all criteria."""
    if name not in _PREPARED:
        from prunekit.models import create

        torch.manual_seed(0)
        model = randomise(SmallCNN()) if name == "small-cnn" else create(name).eval()
        x = torch.randn(4, 3, 12, 12) if name == "small-cnn" else tiny_input()
        _PREPARED[name] = (model, x, verify_graph(model, build_graph(model, x), x))
    return _PREPARED[name]


@pytest.mark.parametrize("name", ["small-cnn", *TINY])
@pytest.mark.parametrize("criterion", CRITERIA.names())
def test_every_criterion_shrinks_to_the_masked_model(name, criterion):
    """Generated from CRITERIA: a new criterion function appears here with no other edit.
    shrink(importance=criterion) keeps 70% of every group; its model equals the original with
    the classes the criterion ranks lowest zeroed."""
    model, x, graph = prepared(name)
    calib = x if isinstance(x, dict) else [x]
    cfg = ChannelPrune(channel_ratio=0.7, importance=criterion)
    small, report = shrink(model, cfg, x, calib=calib, graph=graph, report_latency=False)
    # shrink scores its first step with seed + 1
    scores = score(model, graph, criterion, calib=calib, seed=cfg.seed + 1)
    assert set(scores) == {c.id for g in graph.groups for c in g.classes}
    assert all(v == v and abs(v) < float("inf") for v in scores.values())  # no NaN or Inf
    chosen = plan(graph, scores, removed_fraction(cfg.channel_ratio), cfg, [])
    assert chosen and report.params_after < report.params_before
    masked = masked_copy(model, chosen)
    with torch.no_grad():
        y_small, y_mask = out_tensor(run(small, x)), out_tensor(run(masked, x))
    scale = y_mask.abs().max().clamp_min(1e-12)
    assert y_small.shape == y_mask.shape
    assert ((y_small - y_mask).abs().max() / scale) < 1e-4


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
def test_transformer_heads_and_neurons(name):
    """Heads come out as whole units (q, k, v and the output projection together, and LLaMA's
    grouped key/value heads with their query heads) and MLP neurons one by one; the residual
    stream, mixed by layer norm, is flagged as approximate and left alone by default."""
    from prunekit.models import create

    model = create(name)
    x = {"input_ids": torch.randint(0, 128, (1, 8))}
    graph = build_graph(model, x)
    heads = [g for g in graph.groups if len(g.classes) in (2, 4) and not g.reduced]
    mlps = [g for g in graph.groups if len(g.classes) == (256 if name == "tiny-gpt2" else 128)]
    assert len(heads) == 2 and len(mlps) == 2
    qparam, qdim, per_head = {"tiny-bert": ("attention.self.query.weight", 0, 16),
                              "tiny-gpt2": ("attn.c_attn.weight", 1, 48),  # q, k and v
                              "tiny-llama": ("self_attn.q_proj.weight", 0, 32)}[name]
    for g in heads:
        for c in g.classes:
            assert sum(1 for p, d, _ in c.slices if p.endswith(qparam) and d == qdim) == per_head
    assert any(g.reduced for g in graph.groups)
    small, report = shrink(model, ChannelPrune(per_layer={"*attn*": 0.5, "*attention*": 0.5,
                                                          "*mlp*": 0.75, "*intermediate*": 0.75}),
                           x, report_latency=False)
    with torch.no_grad():
        small(**x)
    assert report.params_after < report.params_before
