"""Tiny random transformers (BERT, GPT-2, LLaMA) for fast tests, with a byte-level tokenizer
so they run on real text: their 128-token vocabulary is ASCII."""

from __future__ import annotations

import torch

from prunekit.errors import PruneError

VOCAB = 128


class ByteTokenizer:
    """ASCII bytes as token ids (anything else becomes '?'); the call signature follows the
    Hugging Face tokenizers' for the arguments prunekit uses."""

    vocab_size = VOCAB
    pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [b if b < VOCAB else ord("?") for b in text.encode("ascii", "replace")]

    def __call__(self, text, return_tensors=None, truncation=False, max_length=None,
                 padding=False, **_):
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t) for t in texts]
        if truncation and max_length:
            ids = [i[:max_length] for i in ids]
        width = max(map(len, ids), default=0)
        if padding == "max_length" and max_length:
            width = max_length
        if padding or return_tensors == "pt":
            if not padding and len({len(i) for i in ids}) > 1:
                raise PruneError("texts of different lengths need padding=True for tensors")
            mask = [[1] * len(i) + [0] * (width - len(i)) for i in ids]
            ids = [i + [self.pad_token_id] * (width - len(i)) for i in ids]
        else:
            mask = [[1] * len(i) for i in ids]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor(ids, dtype=torch.long),
                    "attention_mask": torch.tensor(mask, dtype=torch.long)}
        if isinstance(text, str):
            return {"input_ids": ids[0], "attention_mask": mask[0]}
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids, **_) -> str:
        return bytes(int(i) for i in ids).decode("ascii", "replace")


def create_tiny(kind: str, seed: int = 0, **config) -> torch.nn.Module:
    """A 2-layer, hidden-64 random transformer ('bert' masked LM, 'gpt2' or 'llama' causal
    LM), the same weights for the same seed; config overrides the HF config fields."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if kind == "bert":
        cfg = BertConfig(**{**dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=128,
                                   max_position_embeddings=128), **config})
        model = BertForMaskedLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(**{**dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                   n_positions=128, bos_token_id=0, eos_token_id=0), **config})
        model = GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=128, max_position_embeddings=128),
                             **config})
        model = LlamaForCausalLM(cfg)
    else:
        raise PruneError(f"no tiny model {kind!r}; choose bert, gpt2 or llama")
    model.tokenizer = ByteTokenizer()
    return model.eval()
