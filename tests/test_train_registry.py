"""Tests generated from prunekit.train.SCHEDULES: every registered schedule, under every
pattern family it declares, on a small model and on tiny GPT-2 (transposed Conv1D weights).
A new schedule file with its decorator and `example` appears here with no other edit.

Each schedule is built from its registry entry (`example` keyword arguments, plus data and a
loss where it `needs` them) and run past its last event:
- masks change only at the step next_event() announced; log_dict() agrees with sparsity(),
  next_event() and the step count; once no event is left nothing changes and sparsity() is
  the masks' own;
- pruned weights are exactly zero in the weights the forward uses, after every optimizer
  step and after every schedule step, under SGD with momentum and weight decay and AdamW;
- save_sparse / load_sparse into a fresh model rebuilds the same model and schedule state,
  bit for bit, and both then train on identically.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from prunekit.patterns import get_pattern
from prunekit.train import SCHEDULES, load_sparse, save_sparse
from test_train_masks import small_net

pytestmark = pytest.mark.usefixtures("one_thread")

#: one concrete pattern per family of prunekit.train.ANY_PATTERN
EXAMPLE_PATTERN = {"unstructured": "unstructured", "unstructured:row": "unstructured:row",
                   "N:M": "2:4", "1xN": "1x4"}
MAX_STEPS = 16  # an example run must end (next_event() None) within this many steps

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def cases():
    out = []
    for e in SCHEDULES.entries():
        families = e.meta.get("patterns", ())
        out += [(e.name, EXAMPLE_PATTERN[f]) for f in families] or [(e.name, None)]
    return out


def data_batch(gen, gpt2=False):
    if gpt2:
        ids = torch.randint(0, 128, (2, 8), generator=gen)
        return ids, ids
    return torch.randn(8, 4, 6, 6, generator=gen), torch.randint(0, 8, (8,), generator=gen)


def lm_loss(out, y):
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), y[:, 1:].flatten())


def build(name, model, opt, pattern=None, gpt2=False, **extra):
    """The schedule `name` as its registry entry describes a short run of it."""
    entry = SCHEDULES.entry(name)
    kw = dict(entry.meta["example"])
    if pattern is not None:
        kw["pattern"] = pattern
        if (isinstance(pattern, str) and get_pattern(pattern).implied_sparsity is not None
                and "density" in kw):
            kw["density"] = None  # the pattern fixes it
    if "data" in entry.meta.get("needs", ()):
        kw["data"] = [data_batch(torch.Generator().manual_seed(1), gpt2)]
        if gpt2:
            kw["loss_fn"] = lm_loss
    kw.update(extra)
    return entry.obj(model, opt, **kw)


def train_step(model, opt, gen, gpt2=False):
    x, y = data_batch(gen, gpt2)
    opt.zero_grad()
    loss = lm_loss(model(x), y) if gpt2 else F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def assert_pruned_are_zero(sched):
    """Every weight a mask prunes is exactly zero in the weight the forward uses (the
    parametrized one in soft and gated modes)."""
    for name, layer in sched.holder.layers.items():
        with torch.no_grad():
            w = layer.weight
        assert bool((w[~sched.masks[name]] == 0).all()), name


def masks_of(sched):
    return {n: m.clone() for n, m in sched.masks.items()}


def run_to_end(sched, model, opt, gen, gpt2=False, extra_steps=2):
    """Step until no event is left (then `extra_steps` more), checking every step."""
    finished_at = None
    while sched.step_count < MAX_STEPS:
        announced = sched.next_event()
        if announced is not None:
            assert announced["step"] > sched.step_count and isinstance(announced["event"], str)
        before = masks_of(sched)
        train_step(model, opt, gen, gpt2)
        assert_pruned_are_zero(sched)  # the optimizer step kept them at zero
        sched.step()
        assert_pruned_are_zero(sched)
        changed = [n for n in before if not torch.equal(before[n], sched.masks[n])]
        if changed:
            assert announced is not None and announced["step"] == sched.step_count, changed
        log, nxt = sched.log_dict(), sched.next_event()
        assert log["step"] == float(sched.step_count)
        assert log["sparsity"] == sched.sparsity() and 0.0 <= log["sparsity"] <= 1.0
        assert log["next_event_step"] == (float(nxt["step"]) if nxt else -1.0)
        if nxt is None and finished_at is None:
            finished_at = sched.step_count
        if finished_at is not None and sched.step_count >= finished_at + extra_steps:
            break
    assert finished_at is not None, "the example run has events left after MAX_STEPS steps"
    return finished_at


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("name,pattern", cases())
def test_every_schedule_logs_announces_and_keeps_pruned_weights_at_zero(name, pattern,
                                                                         opt_name):
    torch.manual_seed(0)
    model = small_net()
    opt = OPTIMIZERS[opt_name](model.parameters())
    sched = build(name, model, opt, pattern)
    gen = torch.Generator().manual_seed(2)
    run_to_end(sched, model, opt, gen)
    frozen = masks_of(sched)
    for _ in range(2):  # no event left: nothing changes any more
        train_step(model, opt, gen)
        sched.step()
        assert sched.next_event() is None
    assert all(torch.equal(frozen[n], sched.masks[n]) for n in frozen)
    assert sched.sparsity() == sched.holder.sparsity() > 0.0
    if pattern is not None:
        sched.holder.check_pattern()


def assert_same_state(a: dict, b: dict):
    """Two schedule state dicts are equal: tensors bit for bit, the rest as JSON."""
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif k == "masks":
            assert sorted(a[k]) == sorted(b[k])
            assert all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
        else:
            assert json.dumps(a[k], sort_keys=True) == json.dumps(b[k], sort_keys=True), k


def assert_same_model(m1, m2):
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert sorted(s1) == sorted(s2)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k


@pytest.mark.parametrize("when", ["mid", "end"])
@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_saves_and_loads_to_the_identical_model_and_state(tmp_path, name, when):
    torch.manual_seed(0)
    model = small_net()
    opt = OPTIMIZERS["sgd"](model.parameters())
    sched = build(name, model, opt)
    gen = torch.Generator().manual_seed(3)
    if when == "mid":
        for _ in range(3):
            train_step(model, opt, gen)
            sched.step()
    else:
        run_to_end(sched, model, opt, gen, extra_steps=0)
    path = save_sparse(tmp_path / "ck.safetensors", model, sched)

    torch.manual_seed(99)  # another initialisation: everything must come from the file
    model2 = small_net()
    opt2 = OPTIMIZERS["sgd"](model2.parameters())
    sched2 = build(name, model2, opt2)
    load_sparse(path, model2, sched2)
    assert_same_model(model, model2)
    assert_same_state(sched.state_dict(), sched2.state_dict())
    assert sched2.sparsity() == sched.sparsity()
    assert sched2.next_event() == sched.next_event() and sched2.log_dict() == sched.log_dict()

    # The optimizer is the user's to save; given the same one, both go on identically.
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy: torch shares tensors
    for i in range(4):
        for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
            torch.manual_seed(10 + i)  # L0 samples its gates
            train_step(m, o, torch.Generator().manual_seed(20 + i))
            s.step()
    assert_same_model(model, model2)
    assert_same_state(sched.state_dict(), sched2.state_dict())


@pytest.fixture(scope="module")
def gpt2_factory():
    pytest.importorskip("transformers")
    from prunekit.models import create

    torch.manual_seed(0)
    proto = create("tiny-gpt2")
    state = {k: v.clone() for k, v in proto.state_dict().items()}

    def make():
        model = create("tiny-gpt2")
        model.load_state_dict(state)
        return model.train()
    return make


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_runs_on_gpt2_conv1d(gpt2_factory, name):
    """GPT-2's Conv1D stores its weight (in, out): the (out, in) view patterns work on is a
    transposed, strided matrix (this raised "view size is not compatible" in GMP, RigL,
    Static, GaP and LotteryTicket)."""
    model = gpt2_factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    families = SCHEDULES.entry(name).meta.get("patterns", ())
    pattern = "unstructured" if "unstructured" in families else None
    sched = build(name, model, opt, pattern, gpt2=True, exclude=("lm_head",))
    assert all(v.transposed for v in sched.holder.views.values())  # every layer a Conv1D
    run_to_end(sched, model, opt, torch.Generator().manual_seed(4), gpt2=True, extra_steps=0)
    assert sched.sparsity() > 0.0
    with torch.no_grad():
        ids = torch.randint(0, 128, (1, 8))
        assert torch.isfinite(model(ids).logits).all()
