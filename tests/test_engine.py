"""The one-shot engine: what every family relies on (checks before work, transactions with
undo, tied and parametrized weights, per-module modes) and the regressions that found it."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import prunekit
from prunekit.errors import PruneError
from prunekit.layers import shared_weights
from prunekit.oneshot.engine import LayerResult, Transform, run


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tied_head_is_left_alone_and_reported():
    """Pruning GPT-2's output head, tied to the input embedding, zeroed half the embedding
    table and the report named only the head."""
    model = prunekit.models.create("tiny-gpt2")
    emb = model.transformer.wte.weight.detach().clone()
    assert shared_weights(model)["lm_head.weight"] == ["transformer.wte.weight"]
    report = prunekit.prune(model, prunekit.Magnitude(sparsity=0.5), progress=False)
    assert "lm_head" in report.skipped and "wte" in report.skipped["lm_head"]
    assert "lm_head" not in {lr.name for lr in report.layers}
    assert torch.equal(model.transformer.wte.weight, emb)
    assert "left as it is" in str(report)


def test_tied_head_changed_on_request_says_both():
    model = prunekit.models.create("tiny-gpt2")
    report = prunekit.prune(model, prunekit.Magnitude(sparsity=0.5, tied="change",
                                                      include=("lm_head",)), progress=False)
    (lr,) = report.layers
    assert lr.name == "lm_head" and lr.detail["tied"] == "transformer.wte.weight"
    assert float((model.transformer.wte.weight == 0).float().mean()) == pytest.approx(0.5)


def test_weight_norm_layer_is_really_pruned():
    """Layers under weight_norm were reported pruned (0.500) and kept every weight."""
    torch.manual_seed(0)
    model = MLP().eval()
    nn.utils.parametrizations.weight_norm(model.fc1)
    x = torch.randn(64, 16)
    report = prunekit.prune(model, prunekit.SparseGPT(sparsity=0.5), x, progress=False)
    w = model.fc1.weight.detach()
    assert float((w == 0).float().mean()) == pytest.approx(0.5)
    assert {lr.name: lr.sparsity for lr in report.layers}["fc1"] == pytest.approx(0.5)
    # the model computes with the pruned weight
    ref = nn.functional.linear(x, w, model.fc1.bias)
    assert torch.allclose(model.fc1(x), ref, atol=1e-6)


def _interrupt_second_layer(monkeypatch) -> list:
    """Make the engine raise KeyboardInterrupt when it starts on its second layer."""
    import prunekit.oneshot.engine as engine

    real, calls = engine.transform_module, []

    def fail_second(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(engine, "transform_module", fail_second)
    return calls


def test_weight_norm_restored_bit_for_bit_on_error(monkeypatch):
    model = MLP().eval()
    nn.utils.parametrizations.weight_norm(model.fc1)
    before = _params(model)

    calls = _interrupt_second_layer(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prunekit.prune(model, prunekit.Magnitude(sparsity=0.5), progress=False)
    assert calls and _same(before, _params(model))


@pytest.mark.parametrize("spill", [False, True], ids=["in-memory", "spilled-to-disk"])
def test_originals_come_back_bit_for_bit_from_memory_or_disk(monkeypatch, spill):
    """Large models keep the copies to restore in an unlinked file (a model copy in memory
    doubled SmolLM2's footprint while pruning): the restore is exact either way, for every
    dtype, a shared parameter and an empty one."""
    import prunekit.layers as layers

    monkeypatch.setattr(layers, "SPILL_BYTES", -1 if spill else 2**40)
    torch.manual_seed(0)
    shared = nn.Parameter(torch.randn(3, 5))
    params = [nn.Parameter(torch.randn(4, 6).to(dt)) for dt in
              (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
    params += [shared, nn.Parameter(torch.randn(6, 4).t()), shared, nn.Parameter(torch.empty(0))]
    before = [p.detach().clone() for p in params]
    originals = layers.Originals(params)
    assert (originals.file is not None) == spill
    with torch.no_grad():
        for p in params:
            p.mul_(0).add_(7)
    originals.restore()
    originals.close()
    assert all(p.dtype == b.dtype and torch.equal(p, b) for p, b in zip(params, before))


def test_model_restored_after_an_interrupt_with_its_originals_on_disk(monkeypatch):
    import prunekit.layers as layers

    monkeypatch.setattr(layers, "SPILL_BYTES", -1)
    torch.manual_seed(0)
    model = MLP().eval()
    before = _params(model)
    calls = _interrupt_second_layer(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prunekit.prune(model, prunekit.SparseGPT(sparsity=0.5), torch.randn(32, 16),
                       progress=False)
    assert calls and _same(before, _params(model))


def test_parametrization_without_inverse_is_refused_before_work():
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model = MLP().eval()
    nn.utils.parametrize.register_parametrization(model.fc2, "weight", Double())
    before = _params(model)
    with pytest.raises(PruneError, match="fc2.weight is computed by a parametrization"):
        prunekit.prune(model, prunekit.Magnitude(sparsity=0.5), progress=False)
    assert _same(before, _params(model))


def test_per_module_modes_come_back():
    """A BatchNorm frozen in eval inside a training model came back in train mode."""
    model = MLP().train()
    model.bn.eval()
    prunekit.prune(model, prunekit.Magnitude(sparsity=0.5), torch.randn(8, 16), progress=False)
    assert model.training and model.fc1.training and not model.bn.training


def test_sparsity_that_empties_a_layer_is_refused():
    """0.997 emptied small layers entirely while 1.0 was refused."""
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 300))
    before = _params(model)
    with pytest.raises(PruneError, match="would remove every weight of its 10x10"):
        prunekit.prune(model, prunekit.Magnitude(sparsity=0.997), progress=False)
    assert _same(before, _params(model))
    with pytest.raises(PruneError, match="remove every weight"):
        prunekit.prune(model, prunekit.Wanda(sparsity=0.96, pattern="unstructured:row"),
                       torch.randn(4, 10), progress=False)


@pytest.mark.parametrize("kind", ["asymmetric", "negative"])
def test_prune_layer_refuses_a_hessian_no_data_could_give(kind):
    w = torch.randn(8, 16)
    x = torch.randn(64, 16)
    h = x.T @ x
    if kind == "asymmetric":
        h[3, 5] += 0.01 * float(h.abs().max())
    else:
        h = -h
    with pytest.raises(PruneError, match="Hessian"):
        prunekit.prune_layer(w, h, prunekit.SparseGPT(sparsity=0.5))


def test_meta_and_integer_weights_are_refused():
    meta = nn.Linear(4, 4, device="meta")
    with pytest.raises(PruneError, match="meta device"):
        prunekit.prune(nn.Sequential(meta), prunekit.Magnitude(sparsity=0.5), progress=False)
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int64), requires_grad=False)
    with pytest.raises(PruneError, match="dtype torch.int64"):
        prunekit.prune(nn.Sequential(lin), prunekit.Magnitude(sparsity=0.5), progress=False)


def test_configs_are_frozen_and_checked_when_built():
    with pytest.raises(PruneError, match="SparseGPT.blocksize must be > 0"):
        prunekit.SparseGPT(blocksize=0)
    with pytest.raises(PruneError, match="SparseGPT.blocksize must be an integer"):
        prunekit.SparseGPT(blocksize="64")
    with pytest.raises(PruneError, match="keep_first must be true or false"):
        prunekit.Magnitude(keep_first="no")
    with pytest.raises(PruneError, match="include takes a list"):
        prunekit.Magnitude(include="layer*")
    cfg = prunekit.Wanda(sparsity=0.5)
    with pytest.raises(AttributeError):
        cfg.pattern = "2:4"
    assert cfg.replace(pattern="2:4").pattern == "2:4"
    d = prunekit.SparseGPT(sparsity=0.6, pattern="1x4", exclude=("head",)).to_dict()
    assert d["type"] == "sparsegpt" and d["exclude"] == ["head"]
    from prunekit.config import from_dict
    assert from_dict(d, prunekit.METHODS) == prunekit.SparseGPT(sparsity=0.6, pattern="1x4",
                                                                exclude=("head",))



@pytest.mark.parametrize("method", sorted(n for n in prunekit.METHODS.names()
                                          if prunekit.METHODS.entry(n).meta.get("family")
                                          == "prune"))
@pytest.mark.parametrize("pattern", ["3:2", "2:x", "0x4", "dense-ish"])
def test_a_pattern_that_does_not_parse_names_the_field(method, pattern):
    """Every pruning config, through the one field-parser hook of Config: the message names
    the class and field before it says what is wrong with the text."""
    cls = prunekit.METHODS.get(method)
    with pytest.raises(PruneError, match=rf"^{cls.__name__}\.pattern: "):
        cls(pattern=pattern)


def test_field_parsers_prefix_keep_canonical_forms_and_merge_over_bases():
    from prunekit.config import Config

    @dataclass(frozen=True)
    class Base(Config):
        text: str = "a"
        field_parsers = {"text": lambda v: v if v.islower() else
                         (_ for _ in ()).throw(PruneError("lower case only"))}

    @dataclass(frozen=True)
    class Child(Base):
        grid: str | None = None
        field_parsers = {"grid": str.strip}

    assert Child(grid="  int4 ").grid == "int4" and Child(grid=None).grid is None
    with pytest.raises(PruneError, match=r"^Child\.text: lower case only$"):
        Child(text="A")
    with pytest.raises(PruneError, match=r"^Child\.text must be a string"):
        Child(text=3)  # the type check runs first
    q = prunekit.SparseGPT(quant="int4:g64:asym")
    assert q.quant == prunekit.SparseGPT(quant=q.grid).quant  # canonical text either way


@dataclass(frozen=True)
class _HalfRank(Transform):
    """A throwaway low-rank-like transform that replaces each layer by a module of its own
    and fails on the layer named in `fail_on`, to test the engine's undo."""

    fail_on: str = ""
    name = "halfrank_test"
    family = "lowrank"

    def transform(self, w, hessian, layer, plan=None):
        if layer == self.fail_on:
            raise PruneError(f"{layer}: failing on purpose")
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = max(1, len(s) // 2)
        a, b = u[:, :r] * s[:r], vh[:r]
        return LayerResult(a @ b, factors=(a, b))

    def apply(self, name, module, result, model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        a, b = result.factors
        first = nn.Linear(b.shape[1], b.shape[0], bias=False)
        second = nn.Linear(a.shape[1], a.shape[0], bias=module.bias is not None)
        with torch.no_grad():
            first.weight.copy_(b)
            second.weight.copy_(a)
            if module.bias is not None:
                second.bias.copy_(module.bias)
        setattr(parent, child, nn.Sequential(first, second))
        return lambda: setattr(parent, child, module)


def test_transform_that_replaces_modules_is_undone_on_error():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(32, 16)
    before, fc1 = _params(model), model.fc1
    with pytest.raises(PruneError, match="failing on purpose"):
        run(model, _HalfRank(fail_on="fc2"), x, progress=False)
    assert model.fc1 is fc1 and _same(before, _params(model))
    report = run(model, _HalfRank(), x, progress=False)
    assert isinstance(model.fc1, nn.Sequential) and len(report.layers) == 2
    assert all(lr.rel_error is not None and lr.rel_error > 0 for lr in report.layers)


def test_all_finite_is_exact_even_when_the_sum_overflows():
    from prunekit.errors import all_finite

    big = torch.full((4, 3), torch.finfo(torch.float32).max)  # finite; its sum overflows
    assert all_finite(big) and all_finite(torch.zeros(0)) and all_finite(torch.arange(5))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(64, 8)
        x[17, 3] = bad
        assert not all_finite(x) and not all_finite(x.double()) and not all_finite(x.half())
    both = torch.tensor([float("inf"), -float("inf"), 1.0])  # the sum is NaN
    assert not all_finite(both)
    assert not all_finite(torch.cat([big.reshape(-1), torch.tensor([float("nan")])]))
