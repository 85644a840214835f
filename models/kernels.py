"""Kernel paths for the runner's linear layers: plain ``F.linear`` or oneDNN-packed weights.

Where it sits: ``models/llama_runner.py`` wraps every linear weight (q/k/v/o, gate/up/
down, LM head) through ``pack_linear`` once at load and calls the wrapper in every
forward pass, so the verifier, the early-exit drafter and model drafters all run the
path ``verifier.kernel`` names. The HF checkpoint and the HF model's own tensors are
never modified: packing makes a new tensor.

Paths (measured on this repo's CPU machine by ``specfleet bench kernels``, see
docs/benchmarks.md, "Verify kernels on this CPU (issue 21)"):

- ``default``: ``torch.nn.functional.linear`` on the dense weight (MKL on CPU, cuBLAS
  on CUDA) and one batched SDPA call per layer. Both block their GEMMs by the number of
  rows (MKL even picks another kernel for one row than for several), so the logits of
  a token verified inside a k-token chain differ in the last bits from the same token
  decoded alone (~1e-6 relative): exact greedy output then rests on no near-tie of the
  top two logits falling inside that noise.
- ``mkldnn``: fp32/bf16 on CPU through oneDNN, batch-invariant end to end: each
  weight is reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``, the op torch.compile's CPU backend
  packs with) and applied with ``torch.ops.mkldnn._linear_pointwise``. Packed for a
  batch hint >= 2 that kernel computes every row with the same reduction order
  whatever the number of rows (checked bit for bit by ``batch_invariant``); attention
  runs one query row at a time over exactly its visible keys (``row_attention``). So a
  token's logits are the same bits whether it is decoded alone, verified in a chain or
  a tree, or batched with other requests (tests/unit/test_kernels.py): speculative
  greedy output equals our own non-speculative greedy output without relying on the
  absence of near-ties, for as long as the kernels stay row-invariant (the tests check
  it on each build). The cost: B x S small attention calls per layer (prefill
  of a long prompt pays most). Private torch ops: ``available()`` says whether this
  build has them; bf16 needs AVX-512 (or AVX-NE-CONVERT) in oneDNN.
- ``auto``: ``resolve_kernel`` picks ``mkldnn`` where it is available for the dtype and
  device (CPU), else ``default``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

KERNELS = ("default", "mkldnn", "auto")
# oneDNN's batch hint for the reorder. 1 keeps a layout whose one-row kernel differs
# from the multi-row one (not batch-invariant, measured); any value >= 2 gives the
# blocked layout. 16 ~ a verify of a few requests' chains.
PACK_BATCH_HINT = 16

Linear = Callable[[torch.Tensor], torch.Tensor]


class KernelUnavailableError(ValueError):
    """The requested kernel path does not exist for this torch build, device or dtype."""


def available(kernel: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> bool:
    """Whether ``kernel`` can run for ``dtype`` on ``device`` in this process."""
    if kernel == "default":
        return True
    if kernel != "mkldnn":
        return False
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:  # bf16 reorder refuses CPUs without native bf16 conversion (AVX2-only here)
        w = torch.zeros(8, 8, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 8, dtype=dtype), packed, None, "none", [], "")
    except (RuntimeError, NotImplementedError):
        return False
    return True


def resolve_kernel(kernel: str, dtype: torch.dtype, device: str | torch.device) -> str:
    """The concrete path (``default`` or ``mkldnn``) for a configured ``kernel``."""
    if kernel not in KERNELS:
        raise KernelUnavailableError(f"kernel {kernel!r}: must be one of {', '.join(KERNELS)}")
    if kernel == "auto":
        return "mkldnn" if available("mkldnn", dtype, device) else "default"
    if not available(kernel, dtype, device):
        raise KernelUnavailableError(
            f"kernel {kernel!r} is not available for {dtype} on {torch.device(device)} in this "
            "torch build (use 'default' or 'auto')"
        )
    return kernel


class DenseLinear:
    """``default``: F.linear on the tensors as they are (shared with the HF model)."""

    __slots__ = ("weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MkldnnLinear:
    """``mkldnn``: the weight reordered once for oneDNN; input and output stay dense."""

    __slots__ = ("weight", "bias", "out_features", "in_features")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        w = weight.detach().contiguous()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT)
        self.bias = None if bias is None else bias.detach().clone()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None, kernel: str) -> Linear:
    """A callable ``x -> x @ weight.T + bias`` on the resolved ``kernel`` path."""
    if kernel == "mkldnn":
        return MkldnnLinear(weight, bias)
    if kernel == "default":
        return DenseLinear(weight, bias)
    raise KernelUnavailableError(f"kernel {kernel!r} is not a resolved path (default or mkldnn)")


def batch_invariant(linear: Linear, in_features: int, dtype=torch.float32, rows=(2, 3, 5, 9, 17)) -> bool:
    """Whether each row of a multi-row call equals, bit for bit, the same row called alone."""
    gen = torch.Generator().manual_seed(0)
    for m in rows:
        x = torch.randn(m, in_features, generator=gen).to(dtype)
        full = linear(x)
        for r in range(m):
            if not torch.equal(full[r : r + 1], linear(x[r : r + 1])):
                return False
    return True


# ---- batch-invariant attention (the mkldnn path) -------------------------------------
# torch's SDPA computes a query row differently depending on how many rows it is given
# (its q@k^T is a GEMM blocked by the query count), so the ``mkldnn`` path attends one
# query row at a time over exactly the keys it sees: the same call, on the same values,
# as when that token is decoded alone. A row's keys are a view of the cache for a chain
# (positions [0, length)), or a gather of the prefix and its tree ancestors.
RowKeys = tuple[int, int, int, "int | torch.Tensor"]  # (batch row, token index, slot, length or positions)


def row_keys(b: int, slot: int, base: int, visible: torch.Tensor) -> list[RowKeys]:
    """The keys each of one request's ``n`` new tokens attends to (``visible``: [n, n])."""
    out: list[RowKeys] = []
    for i in range(visible.shape[0]):
        ancestors = visible[i, : i + 1].nonzero().flatten()
        if len(ancestors) == i + 1:  # a chain so far: a contiguous prefix of the cache
            out.append((b, i, slot, base + i + 1))
        else:
            out.append((b, i, slot, torch.cat((torch.arange(base), ancestors + base))))
    return out


def row_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: list[RowKeys],
                  enable_gqa: bool) -> torch.Tensor:
    """Attention output ``[B, S, H, D]`` for ``q`` ``[B, S, H, D]``, one query row per call;
    rows not listed (padding) are zero."""
    out = torch.zeros_like(q)
    for b, i, slot, keys in rows:
        if isinstance(keys, int):
            k, v = k_cache[slot : slot + 1, :keys], v_cache[slot : slot + 1, :keys]
        else:
            k, v = k_cache[slot, keys][None], v_cache[slot, keys][None]
        o = F.scaled_dot_product_attention(q[b : b + 1, i : i + 1].transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), enable_gqa=enable_gqa)
        out[b, i] = o[0, :, 0]
    return out
