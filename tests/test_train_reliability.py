"""Bad input to the training schedules gets a PruneError that names the parameter or layer,
before any work, and leaves the model and optimizer as they were; what the schedules do
around the user's model (modes, gradients, tied weights, GPT-2 layouts) is checked too.
The per-parameter cases are generated from SCHEDULES and each constructor's annotations."""

import inspect
import typing
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.config import coerce
from prunekit.errors import PruneError
from prunekit.train import L0, SCHEDULES, SMCP, SNIP, GaP, MaskHolder, RigL, Static
from test_train_masks import batch, small_net
from test_train_registry import build

pytestmark = pytest.mark.usefixtures("one_thread")

_NOT_CHECKED = {"self", "model", "optimizer"}


def annotated_parameters(cls):
    """(name, annotation) of every constructor argument a user passes, the layer choice of
    the base Schedule included."""
    out = {}
    for klass in (cls, *cls.__mro__[1:]):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        init = inspect.unwrap(init)
        hints = typing.get_type_hints(init)
        for p in inspect.signature(init).parameters.values():
            if p.name in hints and p.name not in _NOT_CHECKED and p.kind not in (
                    p.VAR_KEYWORD, p.VAR_POSITIONAL) and hints[p.name] is not typing.Any:
                out.setdefault(p.name, hints[p.name])
    return out


def wrong_values(tp):
    """Values of the wrong type for annotation `tp`: an arbitrary object, and number-like
    text where no string is accepted."""
    out = [object()]
    try:
        coerce(tp, "0.5", "probe")
    except PruneError:
        out.append("0.5")
    return out


def type_cases():
    for e in SCHEDULES.entries():
        for pname, tp in annotated_parameters(e.obj).items():
            for i, bad in enumerate(wrong_values(tp)):
                if pname == "pattern" and not e.meta.get("patterns"):
                    continue  # takes no pattern at all (refused by name, see below)
                yield pytest.param(e.name, pname, bad, id=f"{e.name}-{pname}-{i}")


def snapshot(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            len(opt._optimizer_step_post_hooks))


def assert_untouched(model, opt, before):
    state, hooks = before
    now = model.state_dict()
    assert sorted(now) == sorted(state)  # no parametrization left behind
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert len(opt._optimizer_step_post_hooks) == hooks
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(not p._backward_hooks for p in model.parameters())


@pytest.mark.parametrize("name,param,bad", list(type_cases()))
def test_a_wrong_type_is_refused_by_name_before_any_work(name, param, bad):
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = snapshot(model, opt)
    cls = SCHEDULES.get(name)
    with pytest.raises(PruneError, match=rf"{cls.__name__}\.{param}\b"):
        build(name, model, opt, **{param: bad})
    assert_untouched(model, opt, before)


@pytest.mark.parametrize("make,match", [
    (lambda m, o: RigL(m, o, density=0.5, t_end=10, seed=-1), "RigL.seed"),
    (lambda m, o: Static(m, o, density=0.5, seed=2 ** 70), "Static.seed"),
    (lambda m, o: L0(m, o, density=0.5, t_end=10, gate_lr=-1.0), "L0.gate_lr"),
    (lambda m, o: L0(m, o, density=0.5, t_end=10, dual_lr=0.0), "L0.dual_lr"),
    (lambda m, o: L0(m, o, density=0.5, t_end=10, zeta=float("inf")), "L0.zeta"),
    (lambda m, o: SNIP(m, o, density=0.5, data=[batch()], num_batches=10 ** 30), "gave only"),
    (lambda m, o: GaP(m, o, density=0.5, delta_t=2, t_end=6, partitions=9), "partitions"),
    (lambda m, o: RigL(m, o, density=0.5, t_end=10, foo=1), "unexpected keyword"),
    (lambda m, o: RigL(m, o, density=0.5), "t_end"),
])
def test_bad_values_are_refused_by_name_and_leave_nothing_behind(make, match):
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model, opt)
    with pytest.raises(PruneError, match=match):
        make(model, opt)
    assert_untouched(model, opt, before)


def test_smcp_with_an_example_input_the_model_cannot_take_leaves_no_soft_masks():
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model, opt)
    with pytest.raises(PruneError, match="example_input"):
        SMCP(model, opt, 0.5, t_end=6, delta_t=2, cost="flops", example_input=torch.randn(2, 3))
    assert_untouched(model, opt, before)


def _weight_norm_new():
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(8, 4)), nn.Linear(4, 4))


def _weight_norm_old():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.Sequential(nn.utils.weight_norm(nn.Linear(8, 4)), nn.Linear(4, 4))


def _frozen():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4))
    model[0].weight.requires_grad_(False)
    return model


def _quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "zero-element tensors"
        return make()


BAD_LAYERS = {
    "weight_norm": (_weight_norm_new, "parametrization"),
    "old_weight_norm": (_weight_norm_old, "parametrization"),
    "frozen": (_frozen, "frozen"),
    "meta": (lambda: nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4)).to("meta"), "meta"),
    "empty": (lambda: _quiet(lambda: nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 4))), "empty"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LAYERS))
@pytest.mark.parametrize("name", SCHEDULES.names())
def test_layers_a_mask_cannot_hold_are_refused_by_name(name, kind):
    """A mask on a computed weight (weight_norm) would not stick: these were reported as
    pruned while every weight was kept, or reached torch's own errors."""
    make, match = BAD_LAYERS[kind]
    model = make()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    entry = SCHEDULES.entry(name)
    kw = dict(entry.meta["example"])
    if "data" in entry.meta.get("needs", ()):
        kw["data"] = [(torch.randn(2, 8), torch.randint(0, 4, (2,)))]
    with pytest.raises(PruneError, match=rf"layer 0\b.*{match}"):
        entry.obj(model, opt, **kw)


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.frozen_bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(self.frozen_bn(self.bn(self.conv(x))).relu().flatten(1))


def test_smcp_flops_measurement_leaves_modes_and_batchnorm_statistics_alone():
    model = _BNNet().train()
    model.frozen_bn.eval()  # frozen inside a training model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    SMCP(model, opt, 0.5, t_end=6, delta_t=2, cost="flops",
         example_input=torch.randn(4, 3, 4, 4))
    assert model.training and model.bn.training and not model.frozen_bn.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())


def test_gap_first_partition_starts_dense_with_its_initial_weights():
    model = small_net()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    sched = GaP(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.3, delta_t=2,
                t_end=6, partitions=2)
    for n in sched.partitions[0]:
        assert bool(sched.masks[n].all())
        assert torch.equal(sched.holder.weights[n], initial[f"{n}.weight"])
    for n in sched.partitions[1]:
        assert abs(float(sched.masks[n].float().mean()) - 0.3) < 0.05


def test_snip_leaves_the_users_gradients_even_when_its_data_fails():
    model = small_net()
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PruneError, match="pairs"):
        SNIP(model, opt, density=0.5, data=[batch(), "not a pair"], num_batches=2)
    SNIP(model, opt, density=0.5, data=[batch()])
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def tiny_gpt2():
    pytest.importorskip("transformers")
    from prunekit.models import create

    return create


def test_tied_output_head_is_named_and_pruned_in_every_copy(tiny_gpt2):
    model = tiny_gpt2("tiny-gpt2")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"lm_head.*transformer\.wte\.weight"):
        holder = MaskHolder(model, opt, include=("lm_head",))
    assert holder.tied == {"lm_head": ["transformer.wte.weight"]}
    holder.set_mask("lm_head", holder.select("lm_head", torch.rand(128, 64), 0.5))
    assert float((model.transformer.wte.weight == 0).float().mean()) == 0.5


def test_smcp_counts_gpt2_input_channels_on_the_transposed_weight(tiny_gpt2):
    """Soft masks rename Conv1D's class (ParametrizedConv1D); its (in, out) weight must still
    be read as such: c_attn has 64 input features and 192 outputs."""
    model = tiny_gpt2("tiny-gpt2")
    sched = SMCP(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5, t_end=6, delta_t=2,
                 exclude=("lm_head",))
    assert sched.channels["transformer.h.0.attn.c_attn"] == 64
    assert sched.channels["transformer.h.0.mlp.c_proj"] == 256
    assert sched.holder.matrix_shape("transformer.h.0.attn.c_attn") == (192, 64)


@pytest.mark.parametrize("corrupt,match", [
    (lambda t: t.update({"3.weight": torch.full_like(t["3.weight"], float("nan"))}), "NaN"),
    (lambda t: t.update({"3.weight": t["3.weight"].long()}), "dtype"),
    (lambda t: t.update({"__prunekit_mask__.3": t["__prunekit_mask__.3"] * 7}), "0 and 1"),
])
def test_load_sparse_refuses_a_corrupt_file_before_changing_anything(tmp_path, corrupt, match):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from prunekit.train import load_sparse, save_sparse

    model = small_net()
    sched = Static(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.5)
    path = save_sparse(tmp_path / "ck.safetensors", model, sched)
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    corrupt(tensors)
    save_file(tensors, str(path), metadata=meta)
    model2 = small_net()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    sched2 = Static(model2, opt2, density=0.5, seed=1)
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    masks = {k: m.clone() for k, m in sched2.masks.items()}
    with pytest.raises(PruneError, match=match):
        load_sparse(path, model2, sched2)
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(sched2.masks[k], m) for k, m in masks.items())
