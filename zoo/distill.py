"""``specfleet distill --target PATH --out DIR``: a small drafter for any checkpoint.

Where it sits: offline, before serving; its output is an ordinary HF checkpoint that a
config names as a ``kind: model`` drafter. For a target with no small sibling (the
common case for a real checkpoint), it trains a 1–2 layer drafter that shares the
target's tokenizer and starts as the target with most layers dropped (embeddings,
final norm and LM head copied and kept frozen — they hold most of what a small LM
knows about token statistics; ``zoo/train.init_from_target``), on the target's own
greedy continuations — the very thing acceptance measures — of text this machine
has: the zoo's corpus (the Python standard library's code and docs, generated data
records), wrapped in chat requests (summarise, rewrite, explain, continue, to JSON)
when the target has a chat template. Training stops at a wall-clock budget (default
15 minutes), with a progress bar. Verification is unchanged, so any drafter is exact;
distillation only decides how often it is accepted.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from specfleet.zoo.train import greedy_continue, init_from_target

# Chat requests wrapped around corpus snippets: the kinds of prompt the benchmark asks.
INSTRUCTIONS = (
    "Summarise the following text in two sentences:\n\n{}",
    "Rewrite the following text so that it is clearer:\n\n{}",
    "Explain what the following means:\n\n{}",
    "Continue the following:\n\n{}",
    "Convert the important facts of the following text to JSON:\n\n{}",
)


@dataclass
class DistillSettings:
    target: str
    out: str
    layers: int = 2
    minutes: float = 15.0
    prompts: int = 256
    prompt_tokens: int = 96  # longest prompt (chat prompts are left-trimmed to this)
    new_tokens: int = 64  # the target's greedy continuation per prompt
    seq_len: int = 128
    batch: int = 8
    lr: float = 1e-3
    seed: int = 0
    threads: int = 2


def _snippets(count: int, seed: int) -> list[str]:
    from specfleet.zoo.corpus import build_corpus
    from specfleet.zoo.presets import recipe_for

    corpus = build_corpus(recipe_for("tiny").corpus, seed=seed)
    rng = random.Random(seed)
    texts = [t for domain in corpus.values() for t in domain.train]
    out = []
    for _ in range(count):
        text = rng.choice(texts)
        start = rng.randrange(max(1, len(text) - 400))
        out.append(text[start:start + 400])
    return out


def build_prompts(tokenizer, s: DistillSettings) -> torch.Tensor:
    """[N, prompt_tokens] prompt ids (equal length, so the target continues them in batches)."""
    from specfleet.router.chat import has_chat_template, render_chat

    rows = []
    for i, snippet in enumerate(_snippets(s.prompts * 2, s.seed)):
        if has_chat_template(tokenizer):
            messages = [{"role": "user", "content": INSTRUCTIONS[i % len(INSTRUCTIONS)].format(snippet)}]
            ids = render_chat(tokenizer, messages)
        else:
            ids = tokenizer.encode(snippet)
        if len(ids) >= s.prompt_tokens:
            # keep the end: a chat prompt's last tokens are the assistant's turn marker
            rows.append(ids[-s.prompt_tokens:])
        if len(rows) == s.prompts:
            break
    if len(rows) < s.prompts:
        raise ValueError(f"only {len(rows)} prompts of {s.prompt_tokens} tokens; lower --prompt-tokens")
    return torch.tensor(rows)


def new_drafter(target, layers: int):
    """The target's config with ``layers`` decoder layers, spread over the target's depth
    (first and last kept), weights copied from those layers."""
    import copy

    from transformers import AutoModelForCausalLM

    total = target.config.num_hidden_layers
    if not 1 <= layers < total:
        raise ValueError(f"--layers: {layers} must be in [1, {total})")
    keep = tuple(round(i * (total - 1) / max(1, layers - 1)) for i in range(layers)) if layers > 1 else (0,)
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    drafter = AutoModelForCausalLM.from_config(config)
    init_from_target(drafter, target, keep)
    if drafter.config.tie_word_embeddings:
        drafter.tie_weights()
    for p in (drafter.model.embed_tokens.weight, drafter.lm_head.weight):
        p.requires_grad_(False)  # the target's token statistics stay as they are
    return drafter, keep


def agreement(drafter, tokens: torch.Tensor, labels: torch.Tensor, start: int) -> float:
    """Fraction of continuation positions where the drafter's argmax is the target's."""
    with torch.inference_mode():
        pred = drafter(input_ids=tokens).logits.argmax(-1)
    return float((pred[:, start:] == labels[:, start:]).float().mean())


def distill(s: DistillSettings, *, progress: bool = True) -> dict:
    from specfleet.models.loading import load_causal_lm, load_tokenizer

    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    started = time.perf_counter()
    budget_s = s.minutes * 60
    target = load_causal_lm(s.target, config_key="--target")
    tokenizer = load_tokenizer(s.target, config_key="--target")
    prompts = build_prompts(tokenizer, s)
    data = greedy_continue(target, prompts, s.new_tokens, batch=16, desc="target's greedy continuations",
                           progress=progress)
    held = max(8, s.prompts // 16)  # judged on continuations it never trained on
    train_tokens, train_labels = data.tokens[held:], data.labels[held:]
    drafter, keep = new_drafter(target, s.layers)
    before = agreement(drafter, data.tokens[:held], data.labels[:held], s.prompt_tokens)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed)
    width = train_tokens.shape[1]
    seq = min(s.seq_len, width)
    drafter.train()
    steps, losses = 0, []
    left = budget_s - (time.perf_counter() - started)
    bar = tqdm(total=max(0, int(left)), desc="distilling", unit="s", disable=not progress, dynamic_ncols=True)
    train_start = time.perf_counter()
    while (elapsed := time.perf_counter() - train_start) < left:
        rows = torch.randint(train_tokens.shape[0], (s.batch,), generator=gen)
        starts = torch.randint(width - seq + 1, (s.batch,), generator=gen)
        inputs = torch.stack([train_tokens[r, b:b + seq] for r, b in zip(rows.tolist(), starts.tolist())])
        labels = torch.stack([train_labels[r, b:b + seq] for r, b in zip(rows.tolist(), starts.tolist())])
        for group in opt.param_groups:  # cosine over the time budget, not a step count
            group["lr"] = s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / left))))
        loss = F.cross_entropy(drafter(input_ids=inputs).logits.flatten(0, 1), labels.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        steps += 1
        losses.append(loss.item())
        bar.n = min(bar.total, int(time.perf_counter() - train_start))
        bar.set_postfix(step=steps, loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    drafter.eval()
    for p in drafter.parameters():
        p.requires_grad_(True)
    after = agreement(drafter, data.tokens[:held], data.labels[:held], s.prompt_tokens)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    drafter.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {
        "target": s.target, "layers_kept": list(keep), "steps": steps,
        "train_s": round(time.perf_counter() - train_start, 1), "total_s": round(time.perf_counter() - started, 1),
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "heldout_agreement_before": before, "heldout_agreement_after": after,
        "prompts": s.prompts, "new_tokens": s.new_tokens,
    }
    (out / "specfleet_distill.json").write_text(json.dumps(report, indent=2))
    return report
