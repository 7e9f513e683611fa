"""The runtime leaves the user's model as it was (weights, modules, each module's train/eval
mode) and refuses bad options by name before any work: convert, measure_latency,
export_onnx and the latency / export commands."""

import copy

import pytest
import torch
from torch import nn

from prunekit import Magnitude, PruneError, prune
from prunekit.cli import build_parser
from prunekit.runtime import convert, export_onnx, measure_latency, save_compressed

pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.frozen_bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 4 * 4, 16)

    def forward(self, x):
        x = self.frozen_bn(self.bn(self.conv(x))).relu()
        return self.fc(self.drop(x).flatten(1))


def training_model():
    """A pruned model in training, with one BatchNorm frozen in eval inside it."""
    model = _Net()
    prune(model, Magnitude(sparsity=0.8), progress=False)
    model.train()
    model.frozen_bn.eval()
    return model


def modes(model):
    return {n: m.training for n, m in model.named_modules()}


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, modes_before, state_before):
    assert modes(model) == modes_before
    now = model.state_dict()
    assert sorted(now) == sorted(state_before)
    assert all(torch.equal(now[k], state_before[k]) for k in state_before)


X = torch.randn(4, 3, 4, 4)


def test_convert_leaves_its_input_model_exactly_as_it_was():
    """It used to call model.eval() on its input even with inplace=False."""
    model = training_model()
    before_modes, before_state = modes(model), state(model)
    new, report = convert(model, X, kernels=("dense", "csr"), repeats=1, progress=False)
    assert_same(model, before_modes, before_state)
    assert isinstance(model.fc, nn.Linear) and isinstance(model.conv, nn.Conv2d)
    assert modes(new) == before_modes  # the copy keeps each module's mode too
    model.eval()
    new.eval()
    with torch.inference_mode():
        torch.testing.assert_close(new(X), model(X), rtol=1e-4, atol=1e-5)


def test_convert_in_place_keeps_each_modules_mode_and_batchnorm_statistics():
    model = training_model()
    before_modes = modes(model)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    new, _ = convert(model, X, kernels=("csr",), choose="first", inplace=True, progress=False)
    assert new is model
    assert {n: m.training for n, m in model.named_modules() if n in before_modes} == \
        before_modes
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())


def test_measure_latency_and_onnx_export_give_every_module_its_mode_back(tmp_path):
    pytest.importorskip("onnxruntime")
    model = training_model()
    before_modes, before_state = modes(model), state(model)
    measure_latency(model, X, warmup=1, repeats=1)
    assert_same(model, before_modes, before_state)
    export_onnx(model, X, tmp_path / "m.onnx")
    assert_same(model, before_modes, before_state)


@pytest.mark.parametrize("options,match", [
    ({"repeats": 0}, "repeats"),
    ({"repeats": "9"}, "repeats"),
    ({"threads": 0}, "threads"),
    ({"threads": "2"}, "threads"),
    ({"kernels": "csr"}, "kernels takes a list"),
    ({"kernels": ()}, "kernels is empty"),
    ({"kernels": ("crs",)}, "did you mean 'csr'"),
    ({"inplace": "no"}, "inplace"),
    ({"choose": "best"}, "choose"),
])
def test_convert_refuses_bad_options_by_name_before_copying_anything(monkeypatch, options,
                                                                      match):
    model = training_model()

    def no_copy(*a, **k):
        raise AssertionError("the model was copied before the options were checked")

    monkeypatch.setattr(copy, "deepcopy", no_copy)  # convert copies with copy.deepcopy
    with pytest.raises(PruneError, match=match):
        convert(model, X, progress=False, **options)


@pytest.mark.parametrize("call,match", [
    (lambda m: measure_latency(m, X, repeats=0), "repeats"),
    (lambda m: measure_latency(m, X, warmup=-1), "warmup"),
    (lambda m: measure_latency(m, X, threads=-2), "threads"),
    (lambda m: measure_latency({}, X), "model"),
    (lambda m: save_compressed(m, "/nonexistent/x", min_sparsity=-0.1), "min_sparsity"),
    (lambda m: save_compressed(m, "/nonexistent/x", min_sparsity="a"), "min_sparsity"),
    (lambda m: export_onnx(m, X, "/nonexistent/x.onnx", rtol=-1.0), "rtol"),
    (lambda m: export_onnx(m, X, "/nonexistent/x.onnx", opset="17"), "opset"),
])
def test_runtime_options_are_checked_first(call, match):
    model = training_model()
    before_modes, before_state = modes(model), state(model)
    with pytest.raises(PruneError, match=match):
        call(model)
    assert_same(model, before_modes, before_state)


def run(argv):
    args = build_parser().parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("argv,match", [
    (["--repeats", "0"], "--repeats"),
    (["--warmup", "-1"], "--warmup"),
    (["--threads", "0"], "threads"),
    (["--sparse", "--kernels", "csr,blok"], "did you mean 'block'"),
    (["--kernels", "csr"], "add --sparse"),
])
def test_latency_command_checks_its_options_before_loading_the_model(monkeypatch, argv,
                                                                     match):
    import prunekit.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(prunekit.models, "load_model", no_load)
    with pytest.raises(PruneError, match=match):
        run(["latency", "digits-cnn", *argv])


def test_latency_command_kernel_choices_come_from_the_registry():
    from prunekit.runtime import KERNELS

    help_text = build_parser()._subparsers._group_actions[0].choices["latency"].format_help()
    for name in KERNELS.names():
        assert f"{name}:" in " ".join(help_text.split())


def test_export_command_checks_the_batch_size_before_loading_the_model(monkeypatch, tmp_path):
    import prunekit.models

    monkeypatch.setattr(prunekit.models, "load_model", lambda *a, **k: 1 / 0)
    with pytest.raises(PruneError, match="--batch-size"):
        run(["export", "digits-cnn", "--format", "onnx", "--batch-size", "0",
             "--out", str(tmp_path / "m.onnx")])


def test_convert_serves_gpt2_conv1d_layers():
    pytest.importorskip("transformers")
    from prunekit.models import create

    model = create("tiny-gpt2")
    prune(model, Magnitude(sparsity=0.75, pattern="unstructured:row", exclude=["lm_head"]),
          progress=False)
    ids = torch.randint(0, 128, (2, 8))
    new, report = convert(model, ids, kernels=("csr",), choose="first", progress=False)
    chosen = {lc.name: lc.kernel for lc in report.layers}
    assert chosen["transformer.h.0.attn.c_attn"] == "csr"
    with torch.inference_mode():
        torch.testing.assert_close(new(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
