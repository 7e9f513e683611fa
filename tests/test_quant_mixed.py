"""Mixed precision: bits per layer from the error database under a model-size budget."""

import copy

import pytest
import torch

import prunekit
from prunekit import GPTQ, RTN, PruneError
from prunekit.quant import mixed, quantized_layers


@pytest.fixture(scope="module")
def digits():
    from prunekit.models import calibration_batches, create
    model = create("digits-cnn", pretrained=True)
    calib = calibration_batches("digits-cnn", n=128, batch_size=64)
    db = mixed.database(model, GPTQ(), calib, progress=False)
    return model, calib, db


def test_database_levels_and_costs(digits):
    model, _, db = digits
    assert db.levels == (2, 3, 4, 8, 16) and db.errors.shape == (4, 5)
    assert (db.errors[:, -1] == 0).all() and (db.costs[:, -1] == 16 * db.weights).all()
    assert (db.errors[:, :-1] > 0).all()
    # fewer bits: more error, less storage (codes plus one float32 scale a row)
    assert (db.errors[:, :-2] >= db.errors[:, 1:-1]).all()
    sizes = [db.size(b) for b in db.levels]
    assert sizes == sorted(sizes)
    rows = {n: m.weight.shape[0] for n, m in model.named_modules() if n in db.names}
    assert db.size(4) == sum(4 * n + 32 * rows[name] for name, n in zip(db.names, db.weights))


@pytest.mark.parametrize("bits", [3, 4])
def test_allocation_beats_uniform_and_trace_at_equal_size(digits, bits):
    model, calib, db = digits
    budget = db.size(bits)
    uniform = db.uniform(bits)
    best = db.allocate(budget)
    trace = db.allocate(budget, sensitivity="trace")
    assert best.size_bits <= budget and trace.size_bits <= budget
    assert best.error <= uniform.error + 1e-12 and best.error <= trace.error + 1e-12
    assert set(best.bits.values()) <= set(db.levels)
    # the allocation runs as a budget; every layer's report error is its database entry
    m = copy.deepcopy(model)
    report = prunekit.quantize(m, GPTQ(), calib, budget=best.bits, progress=False)
    forms = quantized_layers(m)
    assert {n: q.grid.bits for n, q in forms.items()} == {n: b for n, b in best.bits.items()
                                                          if b != 16}
    for lr in report.layers:
        k = db.levels.index(best.bits[lr.name])
        assert lr.rel_error == pytest.approx(db.errors[db.names.index(lr.name), k], rel=1e-6)


def test_search_scores_no_worse_than_the_plain_dp_and_leaves_the_model(digits):
    """SPDY's search on the bit database: within the budget, its calibration loss at most
    that of the plain DP allocation (its first candidate), reproduced by writing the chosen
    weights into a copy, the model unchanged afterwards, seeded."""
    from prunekit.budget.spdy import output_error
    from prunekit.layers import find_layers, set_weight_matrix

    model, calib, _ = digits
    db = mixed.database(model, RTN(), calib, levels=(2, 3, 4, 16), progress=False,
                        keep_weights=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    budget = db.size(3)
    with torch.inference_mode():
        ref = [model(b[0] if isinstance(b, (tuple, list)) else b).float() for b in calib]

    def scored(bits):
        m = copy.deepcopy(model)
        layers = find_layers(m)
        for n, b in bits.items():
            set_weight_matrix(layers[n], db.quantized[n][db.levels.index(b)])
        return output_error(m, calib, ref)

    found = db.search(model, budget, calib, steps=12, seed=0, progress=False)
    again = db.search(model, budget, calib, steps=12, seed=0, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    plain = db.allocate(budget)
    assert found.size_bits <= budget and found.sensitivity == "searched"
    assert found.loss == pytest.approx(scored(found.bits), rel=1e-6)
    assert found.loss <= scored(plain.bits) + 1e-12
    assert found.history[0] == pytest.approx(scored(plain.bits), rel=1e-6)
    assert all(a >= b for a, b in zip(found.history, found.history[1:]))
    assert found.bits == again.bits and found.loss == again.loss
    with pytest.raises(PruneError, match="keep_weights=True"):
        mixed.database(model, RTN(), calib, levels=(2, 16), progress=False).search(
            model, budget, calib)


def test_mixed_bad_input(digits):
    model, calib, db = digits
    with pytest.raises(PruneError, match="below the cheapest"):
        db.allocate(db.size(2) - 1)
    with pytest.raises(PruneError, match="5 bits is not a level"):
        db.uniform(5)
    with pytest.raises(PruneError, match="quantization config"):
        mixed.database(model, prunekit.SparseGPT(sparsity=0.5), calib)
    with pytest.raises(PruneError, match="bits must be in 2..8"):
        mixed.database(model, RTN(), calib, levels=(3, 12))


def test_trace_sensitivity_is_the_hawq_formula(digits):
    """Omega[l, b] = mean diag(H) * ||RTN_b(W) - W||^2 / ||W X||^2 for one layer."""
    from prunekit.layers import find_layers, weight_matrix
    from prunekit.oneshot.calibrate import collect_stats
    model, calib, db = digits
    name = db.names[2]
    layer = find_layers(model, include=(name,))
    h = collect_stats(model, layer, calib)[name].hessian[0]
    w = weight_matrix(layer[name]).detach()
    rtn = prunekit.Grid(3).quantize(w).dequantize()
    omega = float(torch.diagonal(h).mean()) * float((rtn - w).double().square().sum()) \
        / float(torch.einsum("ij,jk,ik->", w.double(), h, w.double()))
    assert db.trace[2, db.levels.index(3)] == pytest.approx(omega, rel=1e-9)


def test_database_takes_the_configs_layers(digits):
    """The layers are the config's own (include / exclude) unless given: a budget built from
    the database never names a layer the config leaves float."""
    model, calib, _ = digits
    db = mixed.database(model, RTN(exclude=("fc2",)), calib, levels=(4, 8), progress=False)
    assert db.names == ["conv1", "conv2", "fc1"]
    db = mixed.database(model, RTN(exclude=("fc2",)), calib, levels=(4, 8), exclude=(),
                        progress=False)
    assert "fc2" in db.names
