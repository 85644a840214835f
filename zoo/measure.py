"""The figures a zoo's manifest reports: held-out loss, acceptance, decode cost.

Where it sits: the last step of ``build_zoo``. The figures tell a user (and the
router's priors) what each drafter is good for, and tell benchmark readers what the
cost ratio ``c`` between drafter and target was.

Definitions, fixed here so reports can cite them:

- *held-out loss*: mean next-token cross-entropy (nats) over evenly spaced windows of
  the domain's held-out text.
- *greedy acceptance*: along the target's greedy continuation of held-out prompts,
  teacher-forced, the fraction of positions where the drafter's argmax equals the
  target's. This is the per-token acceptance probability of greedy speculation.
- *mean accepted (window k)*: the same match flags replayed as speculation rounds of
  k draft tokens (accept the matching prefix, the target supplies one token, the next
  round starts after it): mean accepted draft tokens per round, in [0, k].
- *decode ms / c*: median wall time of a one-token forward with a KV cache (batch 1,
  fp32, one torch thread, after a short prompt); c = drafter time / target time.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from specfleet.zoo.train import Distilled


@torch.inference_mode()
def heldout_loss(model: PreTrainedModel, stream: torch.Tensor, windows: int, seq_len: int) -> float:
    span = stream.numel() - seq_len - 1
    starts = [i * span // max(1, windows) for i in range(windows)]
    batch = torch.stack([stream[s:s + seq_len + 1] for s in starts])  # [W, T + 1]
    total = 0.0
    for chunk in batch.split(16):
        logits = model(input_ids=chunk[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        total += loss.item()
    return total / (batch.shape[0] * seq_len)


@torch.inference_mode()
def match_flags(drafter: PreTrainedModel, path: Distilled) -> torch.Tensor:
    """[N, G + 1] bool: drafter argmax == target argmax at each continuation position."""
    first = path.prompt_tokens - 1  # the last prompt position predicts the first new token
    flags = []
    for tokens, labels in zip(path.tokens.split(16), path.labels.split(16)):
        logits = drafter(input_ids=tokens).logits  # [b, P + G, V]
        flags.append(logits[:, first:].argmax(-1) == labels[:, first:])
    return torch.cat(flags)


def mean_accepted(flags: torch.Tensor, window: int) -> float:
    """Replay match flags as greedy speculation rounds of ``window`` drafts."""
    accepted = []
    for row in flags.tolist():
        i = 0
        while i + window <= len(row):  # only full windows: a cut-off round would bias low
            run = 0
            while run < window and row[i + run]:
                run += 1
            accepted.append(run)
            i += run + 1
    return sum(accepted) / max(1, len(accepted))


@torch.inference_mode()
def decode_ms(model: PreTrainedModel, context: int, steps: int, vocab_size: int) -> float:
    """Median ms of one cached one-token forward (batch 1, fp32, caller sets threads)."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, vocab_size, (1, context), generator=gen)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for step in range(steps + 3):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        if step >= 3:  # the first calls pay one-off allocation costs
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def param_count(model: PreTrainedModel) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
