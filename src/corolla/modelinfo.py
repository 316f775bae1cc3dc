"""What the torch-free layers know of a base model: built-in names, folder paths, and architecture families.

The configuration layer validates `model` with this (a folder must exist and hold a
supported `config.json`) without importing a model library; the client's
`corolla.learning.models` resolves names to folders and loads them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

#: architectures whose every block sees the whole sequence (classification only)
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2",
                           "albert", "mpnet", "camembert", "modernbert"})
#: causal decoders: classification (last-token head) and generation
DECODER_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
                           "olmo", "olmo2", "granite", "stablelm", "gpt_neox", "smollm3", "gpt2"})
#: architectures whose projections are transformers' Conv1D, weight stored (in, out): peft's `fan_in_fan_out`
FAN_IN_FAN_OUT_TYPES = frozenset({"gpt2"})
#: built-in models (a name that is not one of these and not a path is refused)
BUILTIN_MODELS = ("minilm", "tiny-bert", "smollm2", "tiny-llama", "cnn")


class ModelError(ValueError):
    """A model cannot be used; the message names the problem and the fix."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved base model: where it lives and what kind of network it is."""

    path: str
    model_type: str

    @property
    def is_decoder(self) -> bool:
        """True for causal decoders (generation-capable)."""
        return self.model_type in DECODER_TYPES


def is_model_path(name: str) -> bool:
    """True when `model` names a folder rather than a built-in model."""
    return os.sep in name or name.startswith((".", "~"))


def read_model_type(path: str | os.PathLike[str]) -> str:
    """The `model_type` of a Hugging Face model folder; ModelError naming what is missing otherwise."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelError(f"model folder {str(p)!r} does not exist; give `model` a folder holding a Hugging Face "
                         "model (config.json + weights) or a built-in name.")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ModelError(f"{str(p)!r} is not a Hugging Face model folder (no config.json); save the model with "
                         "`save_pretrained(folder)` and point `model` at that folder.")
    try:
        model_type = json.loads(cfg.read_text())["model_type"]
    except (ValueError, KeyError):
        raise ModelError(f"{cfg} holds no `model_type`; it is not a transformers configuration.") from None
    if model_type not in ENCODER_TYPES | DECODER_TYPES:
        raise ModelError(f"model {str(p)!r} has architecture {model_type!r}, which corolla does not support yet; "
                         f"supported: encoders {sorted(ENCODER_TYPES)}, decoders {sorted(DECODER_TYPES)}.")
    return model_type
