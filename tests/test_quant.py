"""Quantization grids, RTN / GPTQ / OBQ on single layers, the quantize verb and bad input."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prunekit
from prunekit import GPTQ, OBQ, RTN, Grid, PruneError, quantize_layer
from prunekit.quant import QuantizedWeight, get_grid, quantized_layers
from prunekit.quant.grid import GridViolation
from prunekit.quant.methods.obq import obq_matrix


def _data(rows=16, d=32, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, d, generator=g)
    x = torch.randn(n, d, generator=g) @ (torch.eye(d) + 0.5 * torch.randn(d, d, generator=g))
    return w, x.double()


def _err(w, new, h):
    dw = (w - new).double()
    return float(torch.einsum("ij,jk,ik->", dw, h, dw)
                 / torch.einsum("ij,jk,ik->", w.double(), h, w.double()))


def _on_grid(q: QuantizedWeight, new):
    """The layer's weight is exactly the dequantized form, and lies on its grid."""
    q.check()
    assert torch.equal(new, q.dequantize())
    q.grid.check_tensor(new, q.scales, q.zeros)


def _on_grid_within_half_step(q: QuantizedWeight, w, new, clipped_ok=False):
    """Rounding w to its grid: on the grid, and within half a step of every weight the grid
    reaches (all of them with min-max scales; an MSE search may clip the largest)."""
    _on_grid(q, new)
    step = q.grid.expand(q.scales, w.shape[1])
    lo = q.grid.values(torch.zeros_like(q.codes), q.scales, q.zeros)
    hi = q.grid.values(torch.full_like(q.codes, q.grid.maxq), q.scales, q.zeros)
    # half a step, up to float32 rounding of the scale and of the difference
    reach = step / 2 * (1 + 1e-5) + 4 * torch.finfo(torch.float32).eps * w.abs()
    inside = (w >= lo - reach) & (w <= hi + reach)
    if not clipped_ok:
        assert inside.all()
    assert ((new - w).abs() <= reach)[inside].all()


# -- grids -----------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group,sym,search,scale",
                         itertools.product(range(2, 9), (None, 8), (True, False),
                                           ("minmax", "mse"), ("float32", "float16")))
def test_rtn_on_grid_and_within_half_step(bits, group, sym, search, scale):
    w = torch.randn(6, 32) * torch.logspace(-2, 1, 6).unsqueeze(1)
    grid = Grid(bits, group, sym, search, scale)
    new, q = quantize_layer(w, None, RTN(bits=bits, group_size=group, sym=sym, search=search,
                                         scale_dtype=scale))
    assert q.grid == grid
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= grid.maxq
    _on_grid_within_half_step(q, w, new, clipped_ok=search == "mse")
    if scale == "float16":
        assert torch.equal(q.scales, q.scales.half().float())
    if sym:
        assert (q.zeros == 2 ** (bits - 1)).all()


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), groups=st.integers(1, 4), g=st.sampled_from([1, 2, 4, 8]),
       bits=st.integers(2, 8), sym=st.booleans(), seed=st.integers(0, 2**16),
       spread=st.floats(1e-6, 1e6))
def test_grid_property_codes_roundtrip(rows, groups, g, bits, sym, seed, spread):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * g, generator=gen) * spread
    w[w.abs() < spread / 4] = 0.0  # exact zeros, and sometimes whole zero groups
    grid = Grid(bits, g, sym)
    q = grid.quantize(w)
    new = q.dequantize()
    _on_grid_within_half_step(q, w, new)
    assert (new[w == 0] == 0).all()  # zero is on every grid
    again = grid.quantize(new, q.scales, q.zeros)  # a point on the grid is its own rounding
    assert torch.equal(again.codes, q.codes)


def test_all_zero_group_gets_a_finite_grid_and_stays_zero():
    w = torch.randn(3, 16)
    w[1, 8:] = 0
    for sym in (True, False):
        q = Grid(4, 8, sym).quantize(w)
        assert torch.isfinite(q.scales).all() and (q.scales > 0).all()
        assert (q.dequantize()[1, 8:] == 0).all()


def test_grid_text_and_bad_grids():
    g = get_grid("int3:g64:asym:mse:fp16")
    assert (g.bits, g.group_size, g.sym, g.search, g.scale_dtype) == (3, 64, False, "mse",
                                                                        "float16")
    assert get_grid(g.spec) == g and get_grid("int4").group_size is None
    for bad in ("int4:g", "four", "int4:zz"):
        with pytest.raises(PruneError, match="grid"):
            get_grid(bad)
    for bits in (1, 9, 16):
        with pytest.raises(PruneError, match="bits must be in 2..8"):
            Grid(bits)
        with pytest.raises(PruneError, match="GPTQ: bits must be in 2..8"):
            GPTQ(bits=bits)
    with pytest.raises(PruneError, match="group_size"):
        RTN(group_size=0)


def test_bad_input_names_the_layer():
    w = torch.randn(4, 48)
    with pytest.raises(PruneError, match="attn.q: groups of 32 inputs need .* multiple of 32"):
        quantize_layer(w, None, RTN(group_size=32), name="attn.q")
    grid = Grid(4, 16)
    w[2, 16:32] = 0
    scales, zeros = grid.fit(w)
    naive = scales.clone()
    naive[2, 1] = 0.0  # what min-max gives an all-zero group without a guard
    with pytest.raises(PruneError, match=r"fc1: the scale of row 2, group 1 is 0.0"):
        grid.quantize(w, naive, zeros, layer="fc1")
    naive[2, 1] = float("nan")
    with pytest.raises(PruneError, match="fc1: .*finite and positive"):
        QuantizedWeight(grid, grid.codes(w, scales, zeros), naive, zeros).check("fc1")
    off = grid.quantize(w).dequantize()
    off[0, 3] += 1e-3
    with pytest.raises(GridViolation, match="fc1: 1 weights are off the int4:g16 grid"):
        grid.check_tensor(off, scales, zeros, layer="fc1")
    with pytest.raises(PruneError, match="needs calibration"):
        quantize_layer(w, None, GPTQ())
    with pytest.raises(PruneError, match="quantization method config"):
        quantize_layer(w, None, prunekit.Magnitude(sparsity=0.5))


# -- methods on one layer ----------------------------------------------------------------

def _gptq_reference(w, h, grid, blocksize=128, damp=0.01):
    """GPTQ as published (float64, column by column; groups fitted at their block's start,
    as the reference code does)."""
    w = w.double().clone()
    h = h.double().clone()
    d = h.shape[0]
    h += damp * torch.diag(h).mean() * torch.eye(d, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    g = grid.group(d)
    params = {}
    if grid.group_size is None:
        params = dict(enumerate(zip(*(t.T for t in grid.fit(w.float())))))
    out = torch.zeros_like(w)
    for i1 in range(0, d, blocksize):
        frozen = w.clone()  # the block's groups are fitted on the weights at its start
        for j in range(i1, min(i1 + blocksize, d)):
            if grid.group_size is not None and j % g == 0:
                s, z = grid.fit(frozen[:, j:j + g].float())
                params[j // g] = (s[:, 0], z[:, 0])
            s, z = params[j // g]
            s, z = s.double(), z.double()
            q = (torch.clamp(torch.round(w[:, j] / s) + z, 0, grid.maxq) - z) * s
            out[:, j] = q
            w[:, j:] -= torch.outer((w[:, j] - q) / u[j, j], u[j, j:])
    return out


@pytest.mark.parametrize("group,sym", [(None, True), (16, True), (16, False)])
def test_gptq_matches_published_algorithm(group, sym):
    w, x = _data(rows=24, d=64)
    h = x.T @ x
    new, q = quantize_layer(w, h, GPTQ(bits=3, group_size=group, sym=sym, blocksize=32))
    ref = _gptq_reference(w, h, Grid(3, group, sym), blocksize=32)
    _on_grid(q, new)
    assert _err(w, new, h) == pytest.approx(_err(w, ref, h), rel=1e-3)
    assert float((new.double() - ref).abs().gt(1e-5).float().mean()) < 0.05


@pytest.mark.parametrize("bits,group", [(2, None), (3, None), (4, None), (3, 8), (4, 16)])
def test_gptq_beats_rtn_and_act_order_keeps_groups(bits, group):
    w, x = _data(rows=32, d=64)
    h = x.T @ x
    rtn, _ = quantize_layer(w, h, RTN(bits=bits, group_size=group))
    gptq, q = quantize_layer(w, h, GPTQ(bits=bits, group_size=group))
    act, qa = quantize_layer(w, h, GPTQ(bits=bits, group_size=group, act_order=True))
    _on_grid(qa, act)
    assert _err(w, gptq, h) < 0.8 * _err(w, rtn, h)
    assert _err(w, act, h) < 0.8 * _err(w, rtn, h)
    # static groups: every scale is the starting weights' own, in the original layout
    s, z = Grid(bits, group).fit(w)
    assert torch.equal(qa.scales, s) and torch.equal(qa.zeros, z)


def test_obq_first_step_is_brute_force_optimal():
    """One OBQ step: the weight whose rounding (with the others re-solved exactly) costs
    least, found by trying every weight."""
    for seed in range(4):
        w, x = _data(rows=1, d=10, seed=seed)
        h = x.T @ x
        grid = Grid(3)
        scales, zeros = grid.fit(w)
        target = grid.quantize(w, scales, zeros).dequantize().double()
        hinv = torch.linalg.inv(h)
        q = obq_matrix(w.double(), hinv, grid, scales, zeros, steps=1)
        costs, sols = [], []
        for p in range(10):
            rest = [i for i in range(10) if i != p]
            sol = w.double().clone()
            sol[0, p] = target[0, p]
            # min over the rest of (sol - w) H (sol - w)^T with sol_p fixed
            delta = torch.linalg.solve(h[rest][:, rest], -h[rest][:, [p]]
                                       * (target[0, p] - w[0, p].double()))
            sol[0, rest] = w[0, rest].double() + delta[:, 0]
            costs.append(float((sol - w.double()) @ h @ (sol - w.double()).T))
            sols.append(sol)
        best = min(range(10), key=costs.__getitem__)
        assert sorted(costs)[1] > costs[best] * 1.01  # a clear winner
        # OBQ moved the best weight to its grid point and re-solved the rest exactly: its
        # codes (the rest rounded as they stand after one step) are those of brute force's
        # best state
        assert torch.equal(q.codes, grid.codes(sols[best].float(), scales, zeros)), seed
        assert int(q.codes[0, best]) == int(grid.codes(w, scales, zeros)[0, best])


def test_obq_error_at_most_gptq_on_small_layers():
    wins = 0
    for seed, bits in itertools.product(range(4), (2, 3, 4)):
        w, x = _data(rows=16, d=24, seed=seed)
        h = x.T @ x
        g, _ = quantize_layer(w, h, GPTQ(bits=bits))
        o, q = quantize_layer(w, h, OBQ(bits=bits))
        _on_grid(q, o)
        assert _err(w, o, h) <= _err(w, g, h) * 1.02, (seed, bits)
        wins += _err(w, o, h) < _err(w, g, h)
    assert wins >= 10  # of 12


# -- whole models ----------------------------------------------------------------------

def _tiny():
    from prunekit.models import calibration_batches, create
    return create("tiny-llama"), calibration_batches("tiny-llama", n=8, batch_size=4)


@pytest.mark.parametrize("config", [RTN(bits=8), GPTQ(bits=4, group_size=32, sequential=True),
                                    GPTQ(bits=3, act_order=True, exclude=("lm_head",))])
def test_quantize_model_keeps_forms_equal_to_weights(config):
    from prunekit.layers import weight_matrix
    model, calib = _tiny()
    report = prunekit.quantize(model, config, calib, progress=False)
    forms = quantized_layers(model)
    assert [lr.name for lr in report.layers] == list(forms) and forms
    modules = dict(model.named_modules())
    for name, q in forms.items():
        assert torch.equal(weight_matrix(modules[name]).detach(), q.dequantize())
        assert q.grid.bits == config.bits
    limit = {8: 1e-4, 4: 0.02, 3: 0.06}[config.bits]
    assert all(lr.detail["bits"] == config.bits and lr.rel_error < limit
               for lr in report.layers), [lr.rel_error for lr in report.layers]


def test_budget_bits_and_float_layers():
    model, calib = _tiny()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    budget = {"model.layers.0.mlp.up_proj": 2, "model.layers.1.mlp.up_proj": 8,
              "model.layers.0.self_attn.q_proj": 16}
    report = prunekit.quantize(model, GPTQ(group_size=32), calib, budget=budget,
                               progress=False)
    forms = quantized_layers(model)
    assert {n: q.grid.bits for n, q in forms.items()} == {"model.layers.0.mlp.up_proj": 2,
                                                          "model.layers.1.mlp.up_proj": 8}
    assert torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                       before["model.layers.0.self_attn.q_proj.weight"])
    assert len(report.layers) == 2
    with pytest.raises(PruneError, match="budget for model.layers.0.mlp.up_proj"):
        prunekit.quantize(model, GPTQ(), calib, budget={"model.layers.0.mlp.up_proj": 5.5})


def test_failure_leaves_model_and_forms_untouched(monkeypatch):
    model, calib = _tiny()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(PruneError, match="lm_head: groups of 48 inputs"):
        prunekit.quantize(model, GPTQ(group_size=48, include=("lm_head",)), calib,
                          progress=False)
    calls = []
    orig = GPTQ.quantize_matrix

    def fail_late(self, w, h, layer):  # a failure in the middle of the work
        calls.append(layer)
        if len(calls) == 9:
            raise PruneError("stop")
        return orig(self, w, h, layer)
    monkeypatch.setattr(GPTQ, "quantize_matrix", fail_late)
    with pytest.raises(PruneError, match="stop"):
        prunekit.quantize(model, GPTQ(group_size=32, sequential=True), calib, progress=False)
    assert len(calls) == 9
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert quantized_layers(model) == {}


def test_save_load_round_trip_and_stale_forms(tmp_path):
    from prunekit.quant import load_quantized, save_quantized
    model, calib = _tiny()
    prunekit.quantize(model, GPTQ(bits=4, group_size=32, sym=False), calib, progress=False)
    save_quantized(model, tmp_path / "q")
    fresh, _ = _tiny()
    loaded = load_quantized(fresh, tmp_path / "q")
    for name, q in quantized_layers(model).items():
        for key, t in q.tensors().items():
            assert torch.equal(t, getattr(loaded[name], key))
    ids = calib[0]["input_ids"]
    assert torch.equal(model(ids).logits, fresh(ids).logits)
    # a weight changed after quantization no longer saves (nor prunes with a reconstruction
    # method, which would move it off its grid)
    with torch.no_grad():
        fresh.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    with pytest.raises(PruneError, match="model.layers.0.mlp.up_proj: the weight no longer"):
        save_quantized(fresh, tmp_path / "again")
    with pytest.raises(PruneError, match=r"model.layers.0.self_attn.q_proj is quantized "
                                         r"\(int4:g32:asym\); SparseGPT would move"):
        prunekit.prune(fresh, prunekit.SparseGPT(sparsity=0.5), calib, progress=False)
    with pytest.raises(PruneError, match="not a quantized model directory"):
        load_quantized(fresh, tmp_path)
