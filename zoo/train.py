"""Training the zoo's models: the target on all domains, drafters on the target's behaviour.

Where it sits: called by ``build_zoo`` between tokenization and evaluation; nothing
at serving time imports it.

Batches mix *sources*: a domain name draws a random window of real text (labels are
the next tokens), ``distill:<domain>`` draws a window of the target's own greedy
continuation of a training prompt (labels are the target's argmax at every
position). Drafters are judged by how often their argmax equals the target's along
the target's greedy path, so imitating that path directly is the cheapest way to
raise acceptance; the real-text share keeps them general within their domain.

Training runs under bf16 autocast where the CPU has native bf16 (about twice as fast
as fp32 there; ``presets.train_precision``, part of the zoo's cache key), in fp32
elsewhere, with fp32 master weights; everything after training (generation,
evaluation, the saved checkpoints) is fp32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from specfleet.zoo.presets import Arch, Training, train_precision


@dataclass
class Distilled:
    """The target's greedy continuations of some prompts."""

    tokens: torch.Tensor  # [N, P + G] prompt then greedy continuation
    labels: torch.Tensor  # [N, P + G] the target's argmax after each prefix
    prompt_tokens: int  # P


@dataclass
class TrainStats:
    steps: int
    tokens: int
    wall_s: float
    final_loss: float  # mean training loss over the last 10% of steps


def llama_config(arch: Arch, vocab_size: int, *, eos_id: int, pad_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.heads,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_positions,
        tie_word_embeddings=arch.tie_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def new_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def init_from_target(drafter: LlamaForCausalLM, target: LlamaForCausalLM,
                     layers: tuple[int, ...]) -> None:
    """Layer dropping: the drafter starts as the target with only ``layers`` kept.

    Embeddings and the output head carry most of what a small LM knows about token
    statistics, so this start converges far faster than a random one.
    """
    if len(layers) != drafter.config.num_hidden_layers:
        raise ValueError(
            f"drafter has {drafter.config.num_hidden_layers} layers, init names {layers}")
    with torch.no_grad():
        drafter.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
        drafter.model.norm.weight.copy_(target.model.norm.weight)
        if not drafter.config.tie_word_embeddings:
            drafter.lm_head.weight.copy_(target.lm_head.weight)
        for mine, theirs in zip(drafter.model.layers, layers):
            mine.load_state_dict(target.model.layers[theirs].state_dict())


class BatchSampler:
    """Deterministic batches of (inputs, labels) from named sources."""

    def __init__(self, streams: dict[str, torch.Tensor], distilled: dict[str, Distilled],
                 mix: dict[str, float], seq_len: int, seed: int):
        self.names = sorted(mix)
        for name in self.names:
            kind, _, domain = name.partition(":")
            if kind == "distill" and distilled[domain].tokens.shape[1] < seq_len:
                raise ValueError(f"{name}: distilled sequences are shorter than seq_len {seq_len}")
        self.weights = torch.tensor([mix[n] for n in self.names], dtype=torch.float64)
        self.streams, self.distilled, self.seq_len = streams, distilled, seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.gen))

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.multinomial(self.weights, batch, replacement=True, generator=self.gen)
        inputs, labels = [], []
        for pick in picks.tolist():
            kind, _, domain = self.names[pick].partition(":")
            if kind == "distill":
                d = self.distilled[domain]
                row = self._randint(d.tokens.shape[0])
                start = self._randint(d.tokens.shape[1] - self.seq_len + 1)
                inputs.append(d.tokens[row, start:start + self.seq_len])
                labels.append(d.labels[row, start:start + self.seq_len])
            else:
                stream = self.streams[kind]
                start = self._randint(stream.numel() - self.seq_len - 1)
                window = stream[start:start + self.seq_len + 1]
                inputs.append(window[:-1])
                labels.append(window[1:])
        return torch.stack(inputs), torch.stack(labels)  # [B, T] each


def _lr(step: int, spec: Training) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    warmup = max(1, int(spec.steps * spec.warmup_frac))
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, spec.steps - warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: LlamaForCausalLM, sampler: BatchSampler, spec: Training, *,
          desc: str, progress: bool) -> TrainStats:
    """AdamW, warm-up then cosine, gradient clipping, bf16 autocast where native; ``model``
    ends in eval mode."""
    bf16 = train_precision() == "bf16"
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    model.train()
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(spec.steps), desc=desc, disable=not progress, unit="step", leave=True,
               dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, spec)
        inputs, labels = sampler.sample(spec.batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=inputs).logits  # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == spec.steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    model.eval()
    tail = losses[-max(1, spec.steps // 10):]
    return TrainStats(spec.steps, spec.steps * spec.batch * spec.seq_len,
                      time.perf_counter() - start, sum(tail) / len(tail))


@torch.inference_mode()
def greedy_continue(model: LlamaForCausalLM, prompts: torch.Tensor, new_tokens: int,
                    batch: int, *, desc: str = "", progress: bool = False) -> Distilled:
    """The model's greedy continuation of equal-length ``prompts`` [N, P], with labels.

    ``labels[:, t]`` is the argmax after ``tokens[:, :t+1]``: on the continuation it is
    the next token itself, on the prompt it is what the model would have said.
    End-of-text is an ordinary token here (benchmarks decode a fixed length too).
    """
    from transformers import DynamicCache

    n, p = prompts.shape
    tokens = torch.empty(n, p + new_tokens, dtype=torch.long)
    labels = torch.empty(n, p + new_tokens, dtype=torch.long)
    chunks = range(0, n, batch)
    for lo in tqdm(chunks, desc=desc, disable=not progress, unit="batch", leave=False):
        hi = min(n, lo + batch)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompts[lo:hi], past_key_values=cache, use_cache=True)
        tokens[lo:hi, :p] = prompts[lo:hi]
        labels[lo:hi, :p] = out.logits.argmax(-1)
        for t in range(p, p + new_tokens):
            nxt = labels[lo:hi, t - 1]
            tokens[lo:hi, t] = nxt
            out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
            labels[lo:hi, t] = out.logits[:, -1].argmax(-1)
    return Distilled(tokens, labels, p)


def sample_prompts(stream: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` random windows of ``length`` tokens from a token stream: [count, length]."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(stream.numel() - length, (count,), generator=gen)
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


def spaced_prompts(stream: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """``count`` evenly spaced windows (held-out evaluation: no seed, same every build)."""
    span = stream.numel() - length
    if span <= 0:
        raise ValueError(f"held-out stream of {stream.numel()} tokens is shorter than {length}")
    starts = [i * span // max(1, count) for i in range(count)]
    return torch.stack([stream[s:s + length] for s in starts])
