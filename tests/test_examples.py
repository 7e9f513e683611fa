"""The examples run as a user would run them (CI runs every file in examples/)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.py"))
#: smaller runs than the defaults, so CI stays quick; the code path is the same
QUICK = {"prune_resnet.py": ["--images", "300"], "prune_minilm.py": ["--pairs", "150"],
         "rigl_training.py": ["--steps", "120"],
         "shrink_resnet56.py": ["--images", "200", "--steps", "10"]}


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path):
    env = dict(os.environ, PRUNEKIT_PROGRESS="0")
    out = subprocess.run([sys.executable, str(path), *QUICK.get(path.name, [])],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), f"{path.name} printed nothing"
