"""The one way SpecFleet turns a configured model path into a model and a tokenizer.

Where it sits: at start-up of every component that holds weights. The verifier loads
the target and each model drafter loads its checkpoint through ``load_causal_lm``;
both check ``check_same_vocabulary`` before the first request, because a drafter's
token ids are only meaningful to the target if both share one vocabulary. Nothing
here runs per request.

A model path (``models.target``, ``drafters[i].model`` in a config) is either a local
Hugging Face checkpoint directory or ``zoo:<size>/<name>``, a model of SpecFleet's own
zoo, built into the cache on first use (see docs/zoo.md). Loading is always
``local_files_only``: these machines never download, and a typo should fail at once,
naming the config key, instead of trying the Hub.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

ZOO_PREFIX = "zoo:"


class ModelPathError(FileNotFoundError):
    """A configured model path does not name a usable checkpoint."""


class VocabularyMismatchError(ValueError):
    """A drafter's vocabulary differs from the target's."""


def parse_zoo_spec(spec: str) -> tuple[str, str] | None:
    """``"zoo:small/drafter-code"`` -> ``("small", "drafter-code")``; None for a plain path.

    Raises ValueError for a malformed zoo spec (unknown size or model name).
    """
    if not spec.startswith(ZOO_PREFIX):
        return None
    from specfleet.zoo.presets import MODEL_NAMES, SIZES

    size, sep, name = spec[len(ZOO_PREFIX):].partition("/")
    names = (*MODEL_NAMES, "tokenizer")  # the shared tokenizer has its own directory
    if not sep or size not in SIZES or name not in names:
        raise ValueError(
            f"{spec!r}: a zoo model is zoo:<size>/<name> with size one of {', '.join(SIZES)} "
            f"and name one of {', '.join(names)}"
        )
    return size, name


def resolve_model_path(spec: str | Path, *, config_key: str = "model", build: bool = True,
                       tokenizer_only: bool = False) -> Path:
    """The checkpoint directory ``spec`` names, building the zoo if it names a zoo model.

    ``config_key`` (e.g. ``"drafters[1].model"``) goes into every error message so a
    user can find the line of their config to fix. With ``build=False`` a zoo model
    that is not built yet is an error instead of a multi-minute build. With
    ``tokenizer_only`` a directory holding just a tokenizer is enough.
    """
    text = str(spec)
    try:
        parsed = parse_zoo_spec(text)
    except ValueError as exc:
        raise ModelPathError(f"{config_key}: {exc}") from None
    if parsed is not None:
        size, name = parsed
        from specfleet.zoo.presets import read_manifest, zoo_dir

        root = zoo_dir(size)
        if read_manifest(root) is None:
            if not build:
                raise ModelPathError(
                    f"{config_key}: {text!r}: the {size} zoo is not built at {root}; "
                    f"run `specfleet zoo build --size {size}`"
                )
            from specfleet.zoo.build import build_zoo

            logger.info("%s: %s is not built yet; building the %s zoo", config_key, text, size)
            root = build_zoo(size, progress=True)
        path = root / name
    else:
        path = Path(text).expanduser()
    if not path.is_dir():
        raise ModelPathError(f"{config_key}: model directory {str(path)!r} does not exist")
    if tokenizer_only:
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise ModelPathError(f"{config_key}: {str(path)!r} holds no tokenizer")
    elif not (path / "config.json").is_file():
        raise ModelPathError(
            f"{config_key}: {str(path)!r} is not a Hugging Face checkpoint (no config.json)"
        )
    return path


def load_causal_lm(spec: str | Path, *, device: str = "cpu", dtype: str = "float32",
                   config_key: str = "model") -> PreTrainedModel:
    """A causal LM from a local directory or zoo spec, on ``device``, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"{config_key}: dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    path = resolve_model_path(spec, config_key=config_key)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtypes[dtype])
    return model.to(torch.device(device)).eval()


def load_tokenizer(spec: str | Path, *, config_key: str = "tokenizer") -> PreTrainedTokenizerBase:
    """The tokenizer saved with a checkpoint (local directory or zoo spec)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(spec, config_key=config_key, tokenizer_only=True)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _vocabulary(source: Any, key: str) -> dict[str, int]:
    """token -> id of a tokenizer, or of the tokenizer stored with a checkpoint spec."""
    if isinstance(source, (str, Path)):
        source = load_tokenizer(source, config_key=key)
    return source.get_vocab()


def check_same_vocabulary(target: Any, drafter: Any, drafter_name: str) -> None:
    """Refuse a drafter whose tokenizer is not the target's, token for token.

    ``target`` and ``drafter`` are tokenizers or checkpoint specs (directories or zoo
    specs). Equal ``token -> id`` maps are required, special tokens included: a drafter
    proposes ids, and the target must read the same strings from them.
    """
    target_vocab = _vocabulary(target, "models.target")
    drafter_vocab = _vocabulary(drafter, f"drafter {drafter_name!r}")
    if target_vocab == drafter_vocab:
        return
    only_drafter = sorted(set(drafter_vocab) - set(target_vocab))
    moved = sorted(t for t in set(drafter_vocab) & set(target_vocab)
                   if drafter_vocab[t] != target_vocab[t])
    detail = []
    if len(target_vocab) != len(drafter_vocab):
        detail.append(f"sizes {len(drafter_vocab)} vs the target's {len(target_vocab)}")
    if only_drafter:
        detail.append(f"{len(only_drafter)} tokens the target lacks (e.g. {only_drafter[:3]})")
    if moved:
        detail.append(f"{len(moved)} tokens with different ids (e.g. {moved[:3]})")
    raise VocabularyMismatchError(
        f"drafter {drafter_name!r}: its vocabulary differs from the target's "
        f"({'; '.join(detail) or 'different token ids'}); a drafter must share the target's "
        "tokenizer (cross-tokenizer drafting is not supported yet)"
    )
