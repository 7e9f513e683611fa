import pytest
import torch
from torch import nn

import prunekit
from prunekit import OBS, Magnitude, PruneError, SparseGPT, Wanda, prune, sparsity_report
from test_calibrate import Net


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.stem(x))))))
        return self.fc(x.mean(dim=(2, 3)))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("config", [
    Magnitude(sparsity=0.5), Magnitude(sparsity=0.6, scope="global"), Wanda(sparsity=0.5),
    SparseGPT(sparsity=0.5), SparseGPT(sparsity=0.5, pattern="unstructured:row"),
    OBS(sparsity=0.5), prunekit.Random(sparsity=0.3)], ids=lambda c: f"{c.method}-{c.scope}")
def test_prune_convnet_hits_sparsity_and_reports(config):
    net = ConvNet()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    report = prune(net, config, batches, progress=False)
    assert report.sparsity == pytest.approx(config.sparsity, abs=0.01)
    assert [lr.name for lr in report.layers] == ["stem", "dw", "pw", "fc"]
    sr = sparsity_report(net)
    assert sr["total"] == pytest.approx(report.sparsity, abs=1e-6)
    if config.scope == "layer":
        for lr in report.layers:
            assert lr.sparsity == pytest.approx(config.sparsity, abs=0.06)  # dw: 9 per group
    if config.needs == "hessian" and config.statistic == "full":
        assert all(lr.rel_error is not None and 0 <= lr.rel_error < 1 for lr in report.layers)
    elif config.needs == "hessian":  # diagonal statistics give no output error
        assert all(lr.rel_error is None for lr in report.layers)
    assert "sparsity" in report.to_dict() and str(report)


def test_reconstruction_beats_magnitude_on_model():
    torch.manual_seed(3)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    errs = {}
    for cfg in (Magnitude(sparsity=0.6), SparseGPT(sparsity=0.6), OBS(sparsity=0.6)):
        torch.manual_seed(5)
        net = ConvNet()
        r = prune(net, cfg, batches, progress=False)
        errs[cfg.method] = sum(lr.rel_error for lr in r.layers)
    assert errs["obs"] < errs["magnitude"] and errs["sparsegpt"] < errs["magnitude"]


def test_nm_on_model_with_exclusions():
    net = ConvNet()
    batches = [torch.randn(4, 3, 8, 8)]
    with pytest.raises(PruneError, match="stem: pattern 2:4 needs the input size"):
        prune(net, SparseGPT(pattern="2:4"), batches, progress=False)
    r = prune(net, SparseGPT(pattern="2:4", exclude=("stem", "dw")), batches, progress=False)
    assert [lr.name for lr in r.layers] == ["pw", "fc"]
    for name in ("pw", "fc"):
        w = getattr(net, name).weight
        prunekit.NM(2, 4).check(w.reshape(w.shape[0], -1) != 0)


def test_sequential_equals_stagewise_reference():
    """prune(sequential=True) == pruning each stage on a full pass of the partly pruned model."""
    batches = [torch.randn(4, 5, 8) for _ in range(3)]
    torch.manual_seed(7)
    a = Net()
    b = Net()
    b.load_state_dict(a.state_dict())
    prune(a, SparseGPT(sparsity=0.5, sequential=True), batches, progress=False)
    stages = [["embed"], ["blocks.0.*"], ["blocks.1.*"], ["blocks.2.*"], ["head"]]
    for inc in stages:
        prune(b, SparseGPT(sparsity=0.5, include=tuple(inc)), batches, progress=False)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=ka)
    # and differs from all-at-once, which calibrates every layer on the dense model
    c = Net()
    c.load_state_dict(b.state_dict())
    torch.manual_seed(7)
    d = Net()
    prune(d, SparseGPT(sparsity=0.5), batches, progress=False)
    assert not torch.allclose(d.blocks[2].fc1.weight, a.blocks[2].fc1.weight)


def test_failure_leaves_model_untouched():
    net = Net()
    before = _state(net)
    few = [torch.randn(1, 1, 8)]  # rank-1 Hessians: no dampening means Cholesky fails
    with pytest.raises(PruneError, match="not positive definite"):
        prune(net, SparseGPT(sparsity=0.5, dampening=0.0, exclude=("embed",)), few,
              progress=False)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_calibration_and_configs():
    net = Net()
    with pytest.raises(PruneError, match="empty"):
        prune(net, Wanda(sparsity=0.5), [], progress=False)
    with pytest.raises(PruneError, match="batch 1 is empty"):
        prune(net, Wanda(sparsity=0.5), [torch.randn(2, 8), torch.randn(0, 8)], progress=False)
    nan = torch.randn(2, 8)
    nan[0, 0] = float("nan")
    with pytest.raises(PruneError, match="NaN"):
        prune(net, Wanda(sparsity=0.5), [nan], progress=False)
    with pytest.raises(PruneError, match="batch 0 could not run"):
        prune(net, Wanda(sparsity=0.5), [torch.randn(2, 7)], progress=False)
    with pytest.raises(PruneError, match="needs calibration data"):
        prune(net, SparseGPT(sparsity=0.5), None, progress=False)
    with pytest.raises(PruneError, match="sparsity"):
        prune(net, Magnitude(sparsity=1.2), progress=False)
    with pytest.raises(PruneError, match="global"):
        prune(net, Magnitude(pattern="2:4", scope="global"), progress=False)
    with pytest.raises(PruneError, match="sequential"):
        prune(net, Magnitude(sparsity=0.5, scope="global", sequential=True), [torch.randn(2, 8)],
              progress=False)
    net.head.weight.data[0, 0] = float("inf")
    with pytest.raises(PruneError, match="head.weight holds NaN"):
        prune(net, Magnitude(sparsity=0.5), progress=False)
    with pytest.raises(PruneError, match="no prunable layer"):
        prune(nn.Sequential(nn.ReLU()), Magnitude(sparsity=0.5), progress=False)


def _tiny_hf(kind):
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )
    torch.manual_seed(11)
    if kind == "bert":
        cfg = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                         num_hidden_layers=3, vocab_size=100)
        return BertModel(cfg, add_pooling_layer=False), "encoder.layer"
    if kind == "gpt2":
        cfg = GPT2Config(n_embd=32, n_head=4, n_layer=3, vocab_size=100, bos_token_id=0,
                         eos_token_id=0)
        return GPT2LMHeadModel(cfg), "transformer.h"
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, num_hidden_layers=3, vocab_size=100)
    return LlamaForCausalLM(cfg), "model.layers"


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_sequential_on_transformers_equals_stagewise_reference(kind):
    """Block inputs are cached with their keyword arguments (masks, rotary positions)."""
    a, prefix = _tiny_hf(kind)
    b, _ = _tiny_hf(kind)
    a.eval()
    b.eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 100, (2, 12), generator=g),
                "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(2)]
    cfg = dict(sparsity=0.5, exclude=("lm_head",))
    prune(a, SparseGPT(sequential=True, **cfg), batches, progress=False)
    for i in range(3):
        prune(b, SparseGPT(include=(f"{prefix}.{i}.*",), **cfg), batches, progress=False)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=ka)


def test_prune_dispatches_gradient_methods():
    from prunekit import WoodFisher
    net = ConvNet()
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(8)]
    cfg = WoodFisher(sparsity=0.5, num_grads=8, block_size=16)
    with pytest.raises(PruneError, match="loss_fn"):
        prune(net, cfg, batches, progress=False)

    def loss_fn(model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
    report = prune(net, cfg, batches, progress=False, loss_fn=loss_fn)
    assert report.sparsity == pytest.approx(0.5, abs=0.01)


def test_subpackages_reachable_from_import_prunekit():
    """`import prunekit` alone gives prunekit.train.RigL, prunekit.runtime.convert and the
    other subpackages the README names (a fresh interpreter: no test has imported them)."""
    import subprocess
    import sys

    code = ("import sys, prunekit; assert 'prunekit.train' not in sys.modules; "
            "prunekit.train.RigL, prunekit.runtime.convert, prunekit.budget.spdy_search, "
            "prunekit.models.create, prunekit.bench, prunekit.data, prunekit.evaluate\n"
            "try:\n    prunekit.nope\nexcept AttributeError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "has no attribute 'nope'" in out.stdout
