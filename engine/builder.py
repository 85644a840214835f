"""Build drafters, the verifier and the in-process engine from a ``SpecFleetConfig``.

Where it sits: start-up. The in-process engine (benchmarks, tests) and the Ray
actors (one drafter or verifier per actor) all construct their pieces here, so a
config means the same thing everywhere. Heavy imports stay inside the functions.
"""

from __future__ import annotations

import logging

from specfleet.core.config import DrafterConfig, SpecFleetConfig, VerifierConfig
from specfleet.drafters.base import Drafter
from specfleet.verifiers.verifier import Verifier

logger = logging.getLogger(__name__)


def build_drafter(
    cfg: DrafterConfig, *, target: str, max_slots: int, max_seq_len: int, device: str = "cpu",
    target_model=None, target_dtype: str = "float32", kernel: str = "default",
) -> Drafter:
    """One drafter from its config; model drafters are checked against the target's vocabulary.

    An ``early_exit`` drafter runs the target's first layers: on ``target_model`` (the
    verifier's loaded HF model, in ``target_dtype``) when given — one copy of the
    weights in memory — else on its own load of ``target`` (its own actor). ``kernel``:
    the runner's linear path (``verifier.kernel``; a packed path packs its own copy)."""
    if cfg.kind == "ngram":
        from specfleet.drafters.ngram import NgramDrafter

        return NgramDrafter(name=cfg.name, max_draft_tokens=cfg.max_draft_tokens)
    if cfg.kind == "suffix":
        from specfleet.drafters.suffix_tree import SuffixTreeDrafter

        return SuffixTreeDrafter(name=cfg.name, max_draft_tokens=cfg.max_draft_tokens)

    from specfleet.drafters.model_drafter import ModelDrafter
    from specfleet.models.llama_runner import LlamaRunner
    from specfleet.models.loading import check_same_vocabulary, load_causal_lm, resolve_model_path

    if cfg.kind == "early_exit":
        model = target_model if target_model is not None else load_causal_lm(
            target, device=device, dtype=target_dtype, config_key="models.target")
        total = model.config.num_hidden_layers
        k = cfg.exit_layer or max(1, total // 4)
        if k >= total:
            raise ValueError(f"drafters[{cfg.name}].exit_layer: {k} must be below the target's "
                             f"{total} layers")
        runner = LlamaRunner(model, max_slots=max_slots, max_seq_len=max_seq_len, device=device,
                             dtype=target_dtype, num_layers=k, kernel=kernel)
        return ModelDrafter(runner, name=cfg.name, max_draft_tokens=cfg.max_draft_tokens)

    key = f"drafters[{cfg.name}].model"
    path = resolve_model_path(cfg.model, config_key=key)
    check_same_vocabulary(resolve_model_path(target, config_key="models.target"), path, cfg.name)
    model = load_causal_lm(str(path), device=device, dtype="float32", config_key=key)
    runner = LlamaRunner(model, max_slots=max_slots, max_seq_len=max_seq_len, device=device,
                         kernel=kernel)
    return ModelDrafter(runner, name=cfg.name, max_draft_tokens=cfg.max_draft_tokens)


def build_verifier(cfg: SpecFleetConfig, verifier_cfg: VerifierConfig | None = None, *,
                   model=None) -> Verifier:
    """The target's verifier; a ``TPVerifierGroup`` (this process is rank 0) when tp_size > 1.
    ``model``: the target already loaded (shared with an early-exit drafter)."""
    from specfleet.models.llama_runner import LlamaRunner
    from specfleet.models.loading import (
        generation_eos_ids,
        load_causal_lm,
        load_tokenizer,
        resolve_model_path,
    )

    cfg = with_context_length(cfg)
    vcfg = verifier_cfg or cfg.verifier
    tokenizer = load_tokenizer(
        cfg.models.tokenizer or cfg.models.target,
        config_key="models.tokenizer" if cfg.models.tokenizer else "models.target",
    )
    eos = generation_eos_ids(cfg.models.target, tokenizer)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    # The engine caps each window at the tokens a request still needs, so a cache of
    # max_seq_len also holds the drafts of the last round.
    if vcfg.tp_size > 1:
        from specfleet.verifiers.tensor_parallel import TPVerifierGroup

        return TPVerifierGroup(
            str(resolve_model_path(cfg.models.target, config_key="models.target")),
            vcfg.tp_size,
            max_slots=vcfg.max_batch_size,
            max_seq_len=vcfg.max_seq_len,
            devices=vcfg.device,
            dtype=vcfg.dtype,
            eos_token_ids=eos,
            decode=decode,
        )
    if model is None:
        model = load_causal_lm(
            cfg.models.target, device=vcfg.device, dtype=vcfg.dtype, config_key="models.target"
        )
    runner = LlamaRunner(
        model,
        max_slots=vcfg.max_batch_size,
        max_seq_len=vcfg.max_seq_len,
        device=vcfg.device,
        dtype=vcfg.dtype,
        kernel=vcfg.kernel,
    )
    return Verifier(runner, eos_token_ids=eos, decode=decode)


def with_context_length(cfg: SpecFleetConfig) -> SpecFleetConfig:
    """``cfg`` with ``verifier.max_seq_len`` filled in from the checkpoint when unset.

    Every start-up path calls this before sizing a KV cache, so drafters, verifiers
    and the frontend's limits agree on one context length."""
    if cfg.verifier.max_seq_len is not None:
        return cfg
    import dataclasses

    from specfleet.models.loading import checkpoint_context_length

    length = checkpoint_context_length(cfg.models.target, max_batch_size=cfg.verifier.max_batch_size,
                                       kv_cache_mb=cfg.verifier.kv_cache_mb, dtype=cfg.verifier.dtype)
    return dataclasses.replace(cfg, verifier=dataclasses.replace(cfg.verifier, max_seq_len=length))


def build_engine(cfg: SpecFleetConfig):
    """The whole in-process engine described by ``cfg``."""
    cfg = with_context_length(cfg)
    from specfleet.engine.engine import SpecEngine
    from specfleet.models.loading import load_causal_lm
    from specfleet.policy.factory import build_policies

    # An early-exit drafter runs on the first group's copy of the target (one set of weights).
    shared = None
    if cfg.verifier.tp_size == 1 and any(d.kind == "early_exit" for d in cfg.drafters):
        shared = load_causal_lm(cfg.models.target, device=cfg.verifier.device, dtype=cfg.verifier.dtype,
                                config_key="models.target")
    # verifier.count groups: each its own copy of the target, requests spread over them.
    verifiers = [build_verifier(cfg, model=shared if g == 0 else None) for g in range(cfg.verifier.count)]
    verifier = verifiers[0]
    drafters = {
        d.name: build_drafter(
            d,
            target=cfg.models.target,
            max_slots=cfg.verifier.max_batch_size * cfg.verifier.count,
            max_seq_len=cfg.verifier.max_seq_len,
            device=cfg.verifier.device,
            target_model=shared,
            target_dtype=cfg.verifier.dtype,
            kernel=cfg.verifier.kernel,
        )
        for d in cfg.drafters
    }
    from specfleet.zoo.domain_centroids import classifier_for

    policies = build_policies(cfg, verifier.decode, classifier_for(cfg))
    return SpecEngine(
        verifiers, drafters, draft_policy=policies.draft_length, router=policies.router,
        width=policies.width, default_drafter=policies.default_drafter, max_batch_size=cfg.verifier.max_batch_size,
        pipelined=cfg.scheduler.mode == "pipelined", first_window=cfg.scheduler.first_window,
    )
