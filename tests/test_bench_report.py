"""Reports: tables that match the stored rows, PNGs, and an HTML file that headless Chromium
opens without console errors, with every plot decoded. Also the bench/report commands."""

import base64
import json
import os
import re
import shutil
import statistics
import subprocess

import matplotlib.image
import pytest

from prunekit.bench import ResultStore, parse_experiment, run_sweep, write_report
from prunekit.commands.bench import main

SWEEP = """\
[experiment]
name = "report"
models = ["digits-cnn"]
sparsities = [0.5, 0.8]
patterns = ["unstructured", "2:4"]
seeds = [0, 1]
calibration_samples = 48
latency_repeats = 2

[[methods]]
name = "magnitude"
options = { exclude = ["conv1"] }

[[methods]]
name = "sparsegpt"
options = { blocksize = 16, exclude = ["conv1"] }
"""


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "r.sqlite"
    with ResultStore(path) as store:
        s = run_sweep(parse_experiment(SWEEP), store, progress=False)
    assert len(s.finished) == 12 and not s.failed
    return path


def test_tables_and_pngs_match_the_rows(db, tmp_path):
    out = write_report(db, tmp_path / "rep", prefix="t_")
    with ResultStore(db, readonly=True) as store:
        rows = store.rows()
    sg = [r["result"]["quality_after"]["top1"] for r in rows
          if r["config"]["method"] == "sparsegpt" and r["config"]["sparsity"] == 0.8]
    expected = f"{statistics.fmean(sg):.2f} ± {statistics.stdev(sg):.2f}"
    line = next(l for l in out["text"].splitlines() if l.startswith("sparsegpt")
                and " 0.8 " in l)
    assert expected in line
    assert len([l for l in out["text"].splitlines() if l.startswith(("magnitude", "sparsegpt"))]
               ) == 6  # two methods x (two sparsities + 2:4), seeds averaged
    names = sorted(p.name for p in out["pngs"])
    assert names == sorted(f"t_digits-cnn_{n}.png" for n in (
        "quality_vs_compression", "quality_vs_speedup", "layer_sparsity", "prune_time"))
    page = out["html"].read_text()
    inline = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(inline) == 4
    written = {p.read_bytes() for p in out["pngs"]}
    assert {base64.b64decode(b) for b in inline} == written
    for p in out["pngs"]:
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")


PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e)), true);
const _err = console.error;
console.error = (...a) => { window.__errors.push(a.join(' ')); _err(...a); };
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]);
  document.body.setAttribute('data-probe', JSON.stringify({imgs, errors: window.__errors}));
});
</script>"""


def _chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed (apt-get install -y chromium)")
    pytest.skip("chromium is not installed and CI is unset")


def test_html_opens_in_headless_chromium(db, tmp_path):
    chromium = _chromium()
    out = write_report(db, tmp_path / "rep")
    page = out["html"].read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    profile = tmp_path / "profile"
    profile.mkdir()
    res = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    match = re.search(r"data-probe=\"([^\"]*)\"", res.stdout)
    assert match, res.stdout[:500]
    probe_data = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert probe_data["errors"] == []
    assert len(probe_data["imgs"]) == 4
    for complete, width, height in probe_data["imgs"]:
        assert complete and width > 100 and height > 100
    console = [l for l in res.stderr.splitlines() if "CONSOLE" in l]
    assert console == []


def test_commands(db, tmp_path, capsys):
    exp = tmp_path / "e.toml"
    exp.write_text(SWEEP)
    assert main(["bench", str(exp), "--dry-run", "--db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "12 runs"
    assert all(l.endswith("[done]") for l in lines[:-1])
    assert main(["bench", str(exp), "--db", str(db), "--quiet"]) == 0
    assert "12 already done, 0 finished now" in capsys.readouterr().out
    assert main(["report", str(db), "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "digits-cnn" in text and "report.html" in text
    exp.write_text(SWEEP.replace('name = "sparsegpt"', 'name = "sparsgpt"'))
    assert main(["bench", str(exp), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{exp}, line 15: unknown method 'sparsgpt'" in err and "sparsegpt" in err
