"""Experiment files: grid expansion, run keys, error messages; FLOPs and compression counts."""

import pytest
import torch
from torch import nn

from prunekit.bench import metrics
from prunekit.bench.experiment import parse_experiment
from prunekit.errors import PruneError

BASE = """\
[experiment]
name = "t"
models = ["digits-cnn"]
sparsities = [0.3, 0.5, 0.7]
patterns = ["unstructured", "2:4"]
seeds = [0, 1, 2]

[[methods]]
name = "magnitude"

[[methods]]
name = "sparsegpt"
options = { blocksize = 16, exclude = ["conv1"] }
"""


def test_grid_expands_every_combination_once():
    runs = parse_experiment(BASE)
    # per method: 3 sparsities x 3 seeds (unstructured) + 3 seeds (2:4 fixes its sparsity)
    assert len(runs) == 2 * (3 * 3 + 3)
    assert len({r.key for r in runs}) == len(runs)
    combos = {(r.method, r.pattern, r.sparsity, r.seed) for r in runs}
    for m in ("magnitude", "sparsegpt"):
        for s in (0.3, 0.5, 0.7):
            for seed in (0, 1, 2):
                assert (m, "unstructured", s, seed) in combos
        for seed in (0, 1, 2):
            assert (m, "2:4", None, seed) in combos
    sg = next(r for r in runs if r.method == "sparsegpt")
    assert sg.options == {"blocksize": 16, "exclude": ["conv1"]}
    assert all(r.dataset == "digits" for r in runs)


def test_key_is_the_full_configuration():
    a = parse_experiment(BASE)
    b = parse_experiment(BASE.replace('name = "t"', 'name = "other"'))
    assert [r.key for r in a] == [r.key for r in b]  # the experiment's name is not config
    c = parse_experiment(BASE.replace("blocksize = 16", "blocksize = 32"))
    changed = {r.key for r in c} ^ {r.key for r in a}
    assert len(changed) == 2 * 12  # exactly the SparseGPT runs changed key
    d = parse_experiment(BASE.replace("seeds = [0, 1, 2]",
                                      "seeds = [0, 1, 2]\neval_limit = 100"))
    assert not {r.key for r in d} & {r.key for r in a}


def _error(text):
    with pytest.raises(PruneError) as e:
        parse_experiment(text, "exp.toml")
    return str(e.value)


@pytest.mark.parametrize("old, new, line, words", [
    ('name = "magnitude"', 'name = "magnitud"', 9, ["unknown method", "magnitude", "wanda",
                                                  "obs"]),
    ('models = ["digits-cnn"]', 'models = ["resnet21"]', 3, ["unknown model", "resnet20"]),
    ('models = ["digits-cnn"]', 'models = [{ name = "digits-cnn", dataset = "imagenet" }]', 3,
     ["unknown dataset", "cifar10", "stsb"]),
    ("blocksize = 16", "blocksise = 16", 13, ["unknown option 'blocksise'", "blocksize",
                                               "dampening"]),
    ("seeds = [0, 1, 2]", "seeds = [0, 1, 2]\nsead = 3", 7, ["unknown option 'sead'",
                                                            "seeds"]),
    ('"2:4"', '"diagonal"', 5, ["diagonal", "N:M"]),
    ("0.7]", "1.5]", 4, ["outside [0, 1)"]),
])
def test_bad_input_names_file_line_and_valid_names(old, new, line, words):
    msg = _error(BASE.replace(old, new))
    assert msg.startswith(f"exp.toml, line {line}:"), msg
    for w in words:
        assert w in msg, msg


def test_other_file_errors():
    assert "not valid TOML" in _error(BASE + "\n[broken\n")
    assert "line" in _error(BASE.replace('dataset = "', 'x = "') + "\n[other]\n")
    msg = _error(BASE.replace("seeds = [0, 1, 2]", "seeds = [0, 0]"))
    assert "twice" in msg
    # a method that does not support a pattern is caught before anything runs
    text = BASE.replace('patterns = ["unstructured", "2:4"]', 'patterns = ["1x4"]')
    text = text.replace('name = "magnitude"', 'name = "obs"')
    assert "does not support pattern '1x4'" in _error(text)


def _toy():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 6))


def test_flops_and_compression_by_hand():
    torch.manual_seed(0)
    model = _toy()
    x = torch.randn(7, 3, 5, 5)
    pos = metrics.output_positions(model, x)
    assert pos == {"0": 25, "3": 1}
    with torch.no_grad():
        model[0].weight[torch.rand_like(model[0].weight) < 0.6] = 0
        model[3].weight[torch.rand_like(model[3].weight) < 0.3] = 0
    # brute force: count multiply-accumulates with a nonzero weight, one output at a time
    conv_nz = int(model[0].weight.count_nonzero())
    lin_nz = int(model[3].weight.count_nonzero())
    dense = 4 * 27 * 25 + 6 * 100
    f = metrics.flops(model, pos)
    assert f["flops_dense"] == dense
    assert f["flops_sparse"] == conv_nz * 25 + lin_nz
    assert f["theoretical_speedup"] == pytest.approx(dense / (conv_nz * 25 + lin_nz))
    c = metrics.compression(model)
    params = sum(p.numel() for p in model.parameters())
    nonzero = conv_nz + lin_nz + 4 + 6  # biases are nonzero
    assert c["compression"] == pytest.approx(params / nonzero)
    assert c["compression_prunable"] == pytest.approx((108 + 600) / (conv_nz + lin_nz))


def test_transformer_positions_are_tokens():
    lin = nn.Linear(8, 3)
    assert metrics.output_positions(lin, torch.randn(2, 11, 8)) == {"": 11}


def test_sparsity_for_speedup_meets_the_target():
    from prunekit import Magnitude, prune

    model = _toy()
    x = torch.randn(2, 3, 5, 5)
    pos = metrics.output_positions(model, x)
    for target, layers in ((3.0, ["0", "3"]), (1.5, ["0"])):
        m = _toy()
        m.load_state_dict(model.state_dict())
        s = metrics.sparsity_for_speedup(m, pos, layers, target)
        prune(m, Magnitude(sparsity=s, include=tuple(layers)), progress=False)
        # rounding to whole weights moves the speedup by at most one weight's FLOPs
        assert metrics.flops(m, pos)["theoretical_speedup"] == pytest.approx(target, rel=0.03)
    with pytest.raises(PruneError, match="cannot be met"):
        metrics.sparsity_for_speedup(model, pos, ["3"], 10.0)


@pytest.mark.parametrize("option, words", [
    ('keep_first = "no"', "keep_first must be true or false"),
    ('blocksize = "64"', "blocksize must be an integer"),
    ("blocksize = 0", "blocksize must be > 0"),
    ("dampening = -1.0", "dampening must be >= 0"),
])
def test_method_option_types_are_checked_when_the_file_is_read(option, words):
    """keep_first = "no" kept the first layer dense and blocksize = "64" failed every run at
    run time; both are now refused when the file is read, with its line."""
    text = BASE.replace("options = { blocksize = 16, exclude = [\"conv1\"] }",
                        f"options = {{ {option} }}")
    with pytest.raises(PruneError, match=words) as e:
        parse_experiment(text, "exp.toml")
    assert "exp.toml, line 13" in str(e.value)  # the options line
