"""The one way SpecFleet turns a configured model path into a model and a tokenizer.

Where it sits: at start-up of every component that holds weights. The verifier loads
the target and each model drafter loads its checkpoint through ``load_causal_lm``;
both check ``check_same_vocabulary`` before the first request, because a drafter's
token ids are only meaningful to the target if both share one vocabulary. Nothing
here runs per request.

A model path (``models.target``, ``drafters[i].model`` in a config) is either a local
Hugging Face checkpoint directory or ``<scheme>:<rest>`` for a registered resolver:
``zoo:<size>/<name>`` names a model of SpecFleet's own zoo, built into the cache on
first use (see docs/zoo.md). A path ending in ``.gguf`` names a llama.cpp GGUF file,
converted once into a cached HF checkpoint (``models/gguf_import.py``). Resolvers come from the ``specfleet.model_resolvers``
entry-point group (or ``register_resolver``), so this module never imports the zoo. Loading is always
``local_files_only``: these machines never download, and a typo should fail at once,
naming the config key, instead of trying the Hub.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specfleet.models.gguf_import import GGUFImportError, convert_gguf, is_gguf_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# scheme → resolve(spec, *, config_key, build) -> Path; raises ValueError with a reason.
Resolver = Callable[..., Path]
_RESOLVERS: dict[str, Resolver] = {}
RESOLVER_GROUP = "specfleet.model_resolvers"


class ModelPathError(FileNotFoundError):
    """A configured model path does not name a usable checkpoint."""


class VocabularyMismatchError(ValueError):
    """A drafter's vocabulary differs from the target's."""


def register_resolver(scheme: str, resolver: Resolver) -> None:
    """Make ``<scheme>:...`` model paths resolve through ``resolver``."""
    _RESOLVERS[scheme] = resolver


def resolver_for(spec: str) -> Resolver | None:
    """The resolver of ``spec``'s scheme, from the registry or the entry points; None
    for a plain path (no scheme, or one nothing resolves)."""
    scheme, sep, _ = spec.partition(":")
    if not sep or not scheme.isidentifier():
        return None
    if scheme not in _RESOLVERS:
        for ep in entry_points(group=RESOLVER_GROUP, name=scheme):
            _RESOLVERS[scheme] = ep.load()
            break
    return _RESOLVERS.get(scheme)


def resolve_model_path(spec: str | Path, *, config_key: str = "model", build: bool = True,
                       tokenizer_only: bool = False) -> Path:
    """The checkpoint directory ``spec`` names, building the zoo if it names a zoo model.

    ``config_key`` (e.g. ``"drafters[1].model"``) goes into every error message so a
    user can find the line of their config to fix. With ``build=False`` a zoo model
    that is not built yet is an error instead of a multi-minute build. With
    ``tokenizer_only`` a directory holding just a tokenizer is enough.
    """
    text = str(spec)
    resolver = resolver_for(text)
    if resolver is not None:
        try:
            path = Path(resolver(text, config_key=config_key, build=build))
        except ValueError as exc:
            raise ModelPathError(f"{config_key}: {exc}") from None
    elif is_gguf_path(text):
        try:
            path = convert_gguf(text, config_key=config_key)
        except GGUFImportError as exc:
            raise ModelPathError(str(exc)) from None
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


def checkpoint_context_length(spec: str | Path, *, max_batch_size: int, kv_cache_mb: float,
                              dtype: str = "float32", config_key: str = "models.target") -> int:
    """The longest prompt + output a request may hold by default: the checkpoint's
    ``max_position_embeddings``, lowered until ``max_batch_size`` requests' KV cache
    (keys and values of every layer, in ``dtype``) fits ``kv_cache_mb``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(spec, config_key=config_key),
                                        local_files_only=True)
    text = getattr(config, "text_config", None) or config
    context = int(getattr(text, "max_position_embeddings", None) or 2048)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    itemsize = 4 if dtype == "float32" else 2
    bytes_per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * itemsize
    fits = int(kv_cache_mb * 2**20 // (bytes_per_token * max_batch_size))
    if fits < context:
        logger.info("%s: context %d lowered to %d so %d requests' KV cache fits verifier.kv_cache_mb=%g",
                    config_key, context, fits, max_batch_size, kv_cache_mb)
    return max(8, min(context, fits))


def generation_eos_ids(spec: str | Path, tokenizer: Any, *, config_key: str = "models.target") -> list[int]:
    """Every id that ends generation: the checkpoint's ``generation_config.json``
    ``eos_token_id`` (an int or a list — chat models often list several) and the
    tokenizer's EOS, in that order, without repeats."""
    ids: list[int] = []
    path = resolve_model_path(spec, config_key=config_key, tokenizer_only=True)
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        import json

        value = json.loads(gen_file.read_text()).get("eos_token_id")
        ids.extend(value if isinstance(value, list) else [] if value is None else [value])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


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
