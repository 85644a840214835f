"""A lean runner for Llama-family Hugging Face checkpoints with a rollback-able KV cache.

Where it sits: the verifier runs the target through it (one forward pass checks a
whole batch of ragged draft chains or token trees), and the small-LM drafter runs
its model through it. Both need the same three things HF's ``forward`` does not
give cheaply: a per-request KV cache that can be truncated (rejected drafts) or
compacted (the accepted path of a tree), ragged batches, and tree attention masks.

Why not drive HF modules with a custom cache: HF's ``DynamicCache`` crops every
request of a batch to one length, so ragged per-request rollback and compaction of a
tree's accepted path would mean copying caches around each round. Speed alone is not
the reason: a plain decode step is only ~1.1x faster here than HF's (measured with
``python -m specfleet.benchmarks.runner_bench``, see docs/benchmarks.md). This file
loads the HF weights unchanged and reimplements only the Llama forward (RMSNorm,
RoPE, GQA attention, SwiGLU), with the same op order as transformers so fp32 logits
match it to rounding; HF ``generate`` stays the oracle in tests.

KV cache layout (gpt-fast style, rollback is implicit): per layer one tensor
``[max_slots, max_seq_len, kv_heads, head_dim]``; a request owns a slot and a
length. Rejected tokens are simply beyond the length and get overwritten later.
Tree tokens are written in submission order and ``compact`` moves the accepted
path down to consecutive positions.

Tensor parallelism (gpt-fast ``tp.py`` layout; the process group is passed in, see
``verifiers/tensor_parallel.py`` for the group of processes around it): with a
``tp_group`` of size T, rank r keeps heads ``[r*H/T, (r+1)*H/T)`` of q/k/v and the
matching columns of o (column-wise then row-wise), the same for gate/up and down,
and sums the row-parallel partial outputs with one all-reduce after o and one after
down. Its KV cache holds only its own kv heads. Embeddings, norms and the LM head
stay whole on every rank. With T == 1 (or no group) nothing changes.

Kernel paths (``kernel=``, ``verifier.kernel``): the linears and attention run either
torch's defaults or the batch-invariant oneDNN path of ``models/kernels.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from specfleet.models.kernels import Linear, pack_linear, resolve_kernel, row_attention, row_keys

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one this runner implements."""


class TensorParallelError(ValueError):
    """The model cannot be split over the requested number of tensor-parallel ranks."""


class TPGroup(Protocol):
    """What the runner needs of a tensor-parallel group: a ``torch.distributed``
    ``ProcessGroup`` (or backend such as ``ProcessGroupGloo``) satisfies it as is."""

    def rank(self) -> int: ...

    def size(self) -> int: ...

    def allreduce(self, tensors: list[torch.Tensor]) -> Any: ...  # a Work with .wait()


@dataclass
class ForwardItem:
    """One request's tokens for a forward pass.

    ``parents[i]`` is the index (within this item) of token i's parent, or -1 for a
    token that directly follows the request's cached context. ``None`` means a
    chain (each token follows the previous one). ``logit_rows`` selects which
    tokens' next-token logits to return (``None``: all; ``[]``: none, e.g. prefill).
    """

    request_id: str
    tokens: list[int]
    parents: list[int] | None = None
    logit_rows: list[int] | None = None


@dataclass
class _Layer:
    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


@dataclass
class _LayerLinears:
    """One layer's linears on the runner's kernel path (models/kernels.py)."""

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear

    @classmethod
    def pack(cls, layer: _Layer, kernel: str) -> _LayerLinears:
        return cls(
            q=pack_linear(layer.q, layer.q_bias, kernel), k=pack_linear(layer.k, layer.k_bias, kernel),
            v=pack_linear(layer.v, layer.v_bias, kernel), o=pack_linear(layer.o, None, kernel),
            gate=pack_linear(layer.gate, None, kernel), up=pack_linear(layer.up, None, kernel),
            down=pack_linear(layer.down, None, kernel),
        )


class LlamaRunner:
    """Forward passes over a slot-based KV cache. Not thread-safe; one owner."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        max_slots: int,
        max_seq_len: int,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        tp_group: TPGroup | None = None,
        num_layers: int | None = None,
        kernel: str = "default",
    ):
        """``tp_group``: this rank's tensor-parallel group (None or size 1: unsharded).
        Every rank of the group must make the same sequence of calls (see module doc).
        ``num_layers``: run only the first k decoder layers, then the final norm and LM
        head — an early-exit copy of the model (a self-speculative drafter) that shares
        its weight tensors and has its own KV cache for those layers.
        ``kernel``: the linear layers' path (``default``, ``mkldnn``, ``auto``; see
        models/kernels.py); non-default paths pack a copy of each weight once, here."""
        cfg = model.config
        check_supported(cfg, max_seq_len)
        tp_size = 1 if tp_group is None else tp_group.size()
        check_tensor_parallel(cfg, tp_size)
        self.tp_group = tp_group if tp_size > 1 else None
        self.tp_rank = 0 if self.tp_group is None else tp_group.rank()
        self.tp_size = tp_size
        rope = getattr(cfg, "rope_parameters", None) or {}

        self.device = torch.device(device)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        # Heads on this rank: all of them unless tensor-parallel.
        self.num_heads = cfg.num_attention_heads // tp_size
        self.num_kv_heads = (cfg.num_key_value_heads or cfg.num_attention_heads) // tp_size
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        # Same formula and dtype path as transformers' default RoPE initialisation.
        self.inv_freq = 1.0 / (
            rope_theta
            ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim)
        ).to(self.device)

        if self.tp_group is None:
            model = model.to(device=self.device, dtype=self.dtype)
            inner = model.model
            self.embed = inner.embed_tokens.weight
            self.final_norm = inner.norm.weight
            self.lm_head = model.lm_head.weight
            self.layers = [self._extract_layer(layer) for layer in inner.layers[:num_layers]]
        else:
            # Slice before moving, so a rank never holds the whole model on its device.
            def move(t: torch.Tensor) -> torch.Tensor:
                return t.detach().to(device=self.device, dtype=self.dtype)

            inner = model.model
            self.embed = move(inner.embed_tokens.weight)
            self.final_norm = move(inner.norm.weight)
            self.lm_head = move(model.lm_head.weight)
            self.layers = [
                shard_layer(self._extract_layer(layer), self.tp_rank, tp_size, move)
                for layer in inner.layers[:num_layers]
            ]
        self.kernel = resolve_kernel(kernel, self.dtype, self.device)
        self.linears = [_LayerLinears.pack(layer, self.kernel) for layer in self.layers]
        self.lm_head_linear = pack_linear(self.lm_head, None, self.kernel)
        shape = (max_slots, max_seq_len, self.num_kv_heads, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self._slots: dict[str, int] = {}
        self._lengths: dict[str, int] = {}
        self._free = list(range(max_slots - 1, -1, -1))  # pop() hands out the lowest slot

    @staticmethod
    def _extract_layer(layer) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        return _Layer(
            input_norm=layer.input_layernorm.weight,
            q=attn.q_proj.weight,
            k=attn.k_proj.weight,
            v=attn.v_proj.weight,
            q_bias=attn.q_proj.bias,
            k_bias=attn.k_proj.bias,
            v_bias=attn.v_proj.bias,
            o=attn.o_proj.weight,
            post_norm=layer.post_attention_layernorm.weight,
            gate=mlp.gate_proj.weight,
            up=mlp.up_proj.weight,
            down=mlp.down_proj.weight,
        )

    # ---- slots -------------------------------------------------------------------
    def allocate(self, request_id: str) -> None:
        if request_id in self._slots:
            raise ValueError(f"request {request_id!r} already has a KV-cache slot")
        if not self._free:
            raise RuntimeError(f"all {self.max_slots} KV-cache slots are in use")
        self._slots[request_id] = self._free.pop()
        self._lengths[request_id] = 0

    def free(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self._lengths.pop(request_id)
            self._free.append(slot)
            self._free.sort(reverse=True)

    def has(self, request_id: str) -> bool:
        return request_id in self._slots

    def length(self, request_id: str) -> int:
        return self._lengths[request_id]

    @property
    def active_requests(self) -> list[str]:
        return list(self._slots)

    def truncate(self, request_id: str, length: int) -> None:
        """Roll the cache back to ``length`` tokens (later ones become garbage)."""
        if not 0 <= length <= self._lengths[request_id]:
            raise ValueError(f"cannot truncate {request_id!r} to {length}")
        self._lengths[request_id] = length

    def compact(self, request_id: str, base: int, keep: list[int]) -> None:
        """Keep only tokens ``base + keep[j]`` (ascending), moved to ``base + j``.

        Used after a tree verify: the accepted path's K/V move down so the cache
        holds exactly the committed sequence. For a chain prefix it is a no-op move.
        """
        slot = self._slots[request_id]
        src = torch.tensor(keep, dtype=torch.long, device=self.device) + base
        n = len(keep)
        if keep != list(range(n)):
            for cache in (*self.k_cache, *self.v_cache):
                cache[slot, base : base + n] = cache[slot, src]
        self._lengths[request_id] = base + n

    # ---- forward -----------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        """Append each item's tokens to its request's cache and return logits.

        Returns, per item, float32 logits ``[len(rows), vocab]`` for the selected
        rows. Each request's cache length grows by ``len(item.tokens)``; the caller
        truncates or compacts afterwards to what it commits.
        """
        if not items:
            return []
        dev = self.device
        batch = len(items)
        seq = max(len(it.tokens) for it in items)
        bases = [self._lengths[it.request_id] for it in items]
        for it, base in zip(items, bases):
            if base + len(it.tokens) > self.max_seq_len:
                raise ValueError(
                    f"request {it.request_id!r}: {base + len(it.tokens)} tokens exceed the "
                    f"KV cache's max_seq_len {self.max_seq_len}"
                )
        kv_len = max(b + len(it.tokens) for it, b in zip(items, bases))

        # input_ids/positions: [B, S]; mask: [B, 1, S, L] (True = may attend)
        input_ids = torch.zeros(batch, seq, dtype=torch.long)
        positions = torch.zeros(batch, seq, dtype=torch.long)
        mask = torch.zeros(batch, 1, seq, kv_len, dtype=torch.bool)
        write_b, write_i, write_pos = [], [], []
        attn_rows = []  # mkldnn: each token's keys, for attention one query row at a time
        for b, (it, base) in enumerate(zip(items, bases)):
            n = len(it.tokens)
            input_ids[b, :n] = torch.tensor(it.tokens, dtype=torch.long)
            depth, visible = _tree_structure(it.parents, n)
            positions[b, :n] = depth + base
            mask[b, 0, :n, :base] = True
            mask[b, 0, :n, base : base + n] = visible
            if self.kernel == "mkldnn":
                attn_rows += row_keys(b, self._slots[it.request_id], base, visible)
            mask[b, 0, n:, 0] = True  # padding rows attend somewhere to avoid NaN; ignored
            write_b += [b] * n
            write_i += range(n)
            write_pos += range(base, base + n)
            self._lengths[it.request_id] = base + n
        input_ids, positions, mask = input_ids.to(dev), positions.to(dev), mask.to(dev)
        slots = [self._slots[it.request_id] for it in items]
        slot_idx = torch.tensor([slots[b] for b in write_b], dtype=torch.long, device=dev)
        wb = torch.tensor(write_b, dtype=torch.long, device=dev)
        wi = torch.tensor(write_i, dtype=torch.long, device=dev)
        wpos = torch.tensor(write_pos, dtype=torch.long, device=dev)
        # Contiguous ascending slots (the common case: requests admitted together)
        # let attention read the cache through a view instead of a gather copy.
        contiguous = slots == list(range(slots[0], slots[0] + batch))
        slot_tensor = None if contiguous else torch.tensor(slots, dtype=torch.long, device=dev)

        cos, sin = self._rope(positions)
        hidden = F.embedding(input_ids, self.embed)
        for li, (layer, lin) in enumerate(zip(self.layers, self.linears)):
            residual = hidden
            x = _rms_norm(hidden, layer.input_norm, self.eps)
            q = lin.q(x).view(batch, seq, self.num_heads, self.head_dim)
            k = lin.k(x).view(batch, seq, self.num_kv_heads, self.head_dim)
            v = lin.v(x).view(batch, seq, self.num_kv_heads, self.head_dim)
            q, k = _apply_rope(q, k, cos, sin)
            k_cache, v_cache = self.k_cache[li], self.v_cache[li]
            k_cache[slot_idx, wpos] = k[wb, wi]
            v_cache[slot_idx, wpos] = v[wb, wi]
            if self.kernel == "mkldnn":
                attn = row_attention(q, k_cache, v_cache, attn_rows, self.num_kv_heads != self.num_heads)
                attn = attn.reshape(batch, seq, self.num_heads * self.head_dim)
            else:
                attn = self._attention(q, k_cache, v_cache, mask, slots, slot_tensor, kv_len, contiguous)
            hidden = residual + self._all_reduce(lin.o(attn))
            residual = hidden
            x = _rms_norm(hidden, layer.post_norm, self.eps)
            mlp = lin.down(F.silu(lin.gate(x)) * lin.up(x))
            hidden = residual + self._all_reduce(mlp)

        # Only the requested rows go through the final norm and the LM head.
        row_b, row_i, counts = [], [], []
        for b, it in enumerate(items):
            rows = range(len(it.tokens)) if it.logit_rows is None else it.logit_rows
            row_b += [b] * len(rows)
            row_i += rows
            counts.append(len(rows))
        if not row_b:
            return [torch.empty(0, self.vocab_size) for _ in items]
        picked = hidden[torch.tensor(row_b, device=dev), torch.tensor(row_i, device=dev)]
        logits = self.lm_head_linear(_rms_norm(picked, self.final_norm, self.eps)).float()
        return list(torch.split(logits.cpu(), counts))

    def _attention(self, q, k_cache, v_cache, mask, slots, slot_tensor, kv_len, contiguous):
        """SDPA over the batch at once (default path) → ``[B, S, H * D]``."""
        batch, seq = q.shape[:2]
        if contiguous:
            keys = k_cache[slots[0] : slots[0] + batch, :kv_len]
            values = v_cache[slots[0] : slots[0] + batch, :kv_len]
        else:
            keys = k_cache[slot_tensor, :kv_len]
            values = v_cache[slot_tensor, :kv_len]
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # [B, H, S, D]
            keys.transpose(1, 2),  # [B, KVH, L, D]
            values.transpose(1, 2),
            attn_mask=mask,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return attn.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)

    def _all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum a row-parallel output ``[B, S, hidden]`` over the group (in place)."""
        if self.tp_group is not None:
            self.tp_group.allreduce([partial]).wait()
        return partial

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # freqs: [B, S, D/2] → cos/sin [B, S, 1, D] (broadcast over heads)
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, :, None], emb.sin().to(self.dtype)[:, :, None]


def check_supported(cfg, max_seq_len: int) -> None:
    """Raise UnsupportedModelError unless the runner implements ``cfg``'s architecture."""
    model_type = getattr(cfg, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by the runner "
            f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        if model_type == "mistral" and cfg.sliding_window < max_seq_len:
            raise UnsupportedModelError("sliding-window attention is not supported")
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {cfg.hidden_act!r} is not supported")
    # The forward has no o_proj / MLP bias terms (Qwen2 has q/k/v biases only).
    if getattr(cfg, "mlp_bias", False) or (model_type != "qwen2" and getattr(cfg, "attention_bias", False)):
        raise UnsupportedModelError("o_proj / MLP biases are not supported")


def check_tensor_parallel(cfg, tp_size: int) -> None:
    """Raise TensorParallelError unless every sharded dimension splits evenly over ``tp_size``."""
    if tp_size < 1:
        raise TensorParallelError(f"tensor-parallel size must be >= 1, got {tp_size}")
    dims = {
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads or cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
    }
    for name, value in dims.items():
        if value % tp_size:
            raise TensorParallelError(
                f"{name} ({value}) is not divisible by the tensor-parallel size {tp_size}: "
                "each rank must hold whole heads and an equal slice of the MLP"
            )


def shard_layer(layer: _Layer, rank: int, size: int, move=lambda t: t) -> _Layer:
    """Rank ``rank``'s slice (of ``size``) of one decoder layer's weights.

    q/k/v/gate/up are split by output rows (column-parallel: whole heads, since the
    head counts divide by ``size``; rank r's q heads use exactly its own kv heads under
    GQA), o/down by input columns (row-parallel: partial sums the caller all-reduces).
    Norm weights are replicated. ``move`` puts each slice on the rank's device/dtype;
    slices are copied so the unsharded weights can be freed.
    """

    def rows(w):
        return None if w is None else move(w.detach().chunk(size, dim=0)[rank]).clone()

    def cols(w):
        return move(w.detach().chunk(size, dim=1)[rank]).contiguous().clone()

    return _Layer(
        input_norm=move(layer.input_norm.detach()),
        q=rows(layer.q), k=rows(layer.k), v=rows(layer.v),
        q_bias=rows(layer.q_bias), k_bias=rows(layer.k_bias), v_bias=rows(layer.v_bias),
        o=cols(layer.o),
        post_norm=move(layer.post_norm.detach()),
        gate=rows(layer.gate), up=rows(layer.up), down=cols(layer.down),
    )


def _tree_structure(parents: list[int] | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth of each token ([n]) and ancestor-or-self visibility ([n, n])."""
    if parents is None:
        return torch.arange(n), torch.ones(n, n, dtype=torch.bool).tril()
    depth = torch.empty(n, dtype=torch.long)
    visible = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= i:
            raise ValueError(f"token {i}: parent {p} must come before it")
        if p < 0:
            depth[i] = 0
        else:
            depth[i] = depth[p] + 1
            visible[i] = visible[p]
        visible[i, i] = True
    return depth, visible


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same as transformers' LlamaRMSNorm: normalise in float32, cast back, then scale.
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(q, k, cos, sin):
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
