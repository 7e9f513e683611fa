"""Text for language models, laid out as the field measures perplexity, and calibration
segments drawn only from the training or validation side.

WikiText-2 test is the Hugging Face `wikitext-2-raw-v1` test split joined with "\\n\\n", the
text behind published LLM perplexities. Its rows are the lines of the original
`wiki.test.raw`: a paragraph or heading keeps its trailing newline, a blank line is an empty
row. The shared raw file keeps only the 2,891 paragraph and heading lines; the shared
tokenized test file (same articles, same line order) keeps every line, blank ones included
(4,358, the split's row count). So the rows are rebuilt exactly: the tokenized file's layout,
its non-blank lines replaced one for one by the raw lines. (Blank rows surround every heading,
and a few more follow some paragraphs; the rule "headings surrounded by empty rows" alone
misses those.) WikiText-2 validation exists here only tokenized (v1, with <unk>); it is laid
out the same way and serves for calibration. TinyShakespeare: the first 90% of the
characters are the training side, the last 10% the test side (nanoGPT's split).
"""

from __future__ import annotations

import random
from functools import lru_cache

import torch

from prunekit.errors import PruneError

#: data set -> its splits for language-model text: (evaluation side, calibration side)
LM_SPLITS = {"wikitext2": ("test", "valid"), "tinyshakespeare": ("test", "train")}


def _rows(layout: list[str], lines: list[str] | None = None) -> list[str]:
    """Hugging Face wikitext rows from a file's lines: blank -> "", else line + newline; with
    `lines`, the non-blank rows take those lines in order."""
    fill = iter(lines) if lines is not None else None
    rows = []
    for line in layout:
        if not line.strip():
            rows.append("")
        else:
            rows.append((next(fill) if fill is not None else line) + "\n")
    return rows


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


@lru_cache(maxsize=1)
def wikitext2_test_rows() -> tuple[str, ...]:
    """The 4,358 rows of wikitext-2-raw-v1's test split (see the module docstring)."""
    from prunekit.data import load_wikitext2

    layout = _lines(load_wikitext2("test"))
    raw = _lines(load_wikitext2("test", raw=True))
    filled = [line for line in layout if line.strip()]
    if len(filled) != len(raw):
        raise PruneError(f"the raw WikiText-2 test file has {len(raw)} lines but the tokenized "
                         f"one has {len(filled)} non-blank lines; they should match one for "
                         f"one: fetch both files again")
    return tuple(_rows(layout, raw))


def lm_text(dataset: str = "wikitext2", split: str = "test") -> str:
    """The text of a language-model data set split: 'wikitext2' test (raw, rebuilt) or valid
    (tokenized v1, the only validation copy), 'tinyshakespeare' test (last 10%) or train
    (first 90%)."""
    from prunekit.data import load_tinyshakespeare, load_wikitext2

    if dataset not in LM_SPLITS:
        raise PruneError(f"no language-model text {dataset!r}; choose from "
                         f"{', '.join(LM_SPLITS)}")
    if split not in LM_SPLITS[dataset]:
        raise PruneError(f"{dataset} has no split {split!r}; use "
                         f"{' or '.join(LM_SPLITS[dataset])}")
    if dataset == "wikitext2":
        if split == "test":
            return "\n\n".join(wikitext2_test_rows())
        return "\n\n".join(_rows(_lines(load_wikitext2("valid"))))
    text = load_tinyshakespeare()
    cut = int(0.9 * len(text))
    return text[cut:] if split == "test" else text[:cut]


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """The whole text tokenized once, as a 1-D tensor of ids (no truncation)."""
    return torch.as_tensor(tokenizer(text)["input_ids"], dtype=torch.long).reshape(-1)


def lm_tokens(tokenizer, dataset: str = "wikitext2", split: str = "test") -> torch.Tensor:
    """A data set split's text tokenized once (1-D ids)."""
    return tokenize_stream(tokenizer, lm_text(dataset, split))


def calibration_segments(tokenizer, n: int = 128, seq_len: int = 2048, seed: int = 0,
                         source: str = "wikitext2", text: str | None = None,
                         batch_size: int = 8) -> list[dict]:
    """n segments of seq_len consecutive tokens for calibrating a causal LM, as SparseGPT and
    Wanda draw them: the calibration text tokenized once, n start positions drawn uniformly
    by seed. The text is WikiText-2 validation (source='wikitext2') or the first 90% of
    TinyShakespeare ('tinyshakespeare'), never a test side, or your own `text`. Batches of
    {'input_ids': (b, seq_len)}."""
    if not isinstance(n, int) or n < 1:
        raise PruneError(f"the number of calibration segments must be a positive integer, "
                         f"got {n!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise PruneError(f"calibration segments need at least 2 tokens each, got {seq_len!r}")
    if text is None:
        if source not in LM_SPLITS:
            raise PruneError(f"calibration source must be one of {', '.join(LM_SPLITS)} (or "
                             f"pass text=...), got {source!r}")
        text, what = lm_text(source, LM_SPLITS[source][1]), f"{source} calibration text"
    else:
        what = "the calibration text"
    ids = tokenize_stream(tokenizer, text)
    if len(ids) <= seq_len:
        raise PruneError(f"{what} has {len(ids)} tokens, not more than one segment of "
                         f"{seq_len}; give a longer text or a shorter segment length")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seq_len - 1) for _ in range(n)]
    segments = torch.stack([ids[s:s + seq_len] for s in starts])
    return [{"input_ids": b} for b in segments.split(batch_size)]
