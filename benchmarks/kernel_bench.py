"""``specfleet bench kernels``: the runner's linears per kernel path, against this machine's roofline.

Where it sits: offline, outside any request path; it backs the choice of
``verifier.kernel`` (models/kernels.py) documented in docs/benchmarks.md, "Verify
kernels on this CPU (issue 21)". One process measures, in one run:

- the stream bandwidth (a large fp32 tensor's ``sum``: read; ``copy_``: read + write)
  and a cache-resident matmul's FLOP/s, per thread count;
- every distinct linear shape of ``target-xl`` (the small zoo) and SmolLM2-135M
  (random weights of their shapes, nothing downloaded), for tokens per request
  1, 2, 3, 5, 9, 17 x batch 1 (4, 8 without ``--quick``) x paths x threads 1 and 2.
  Weights are cold as in a real step: each call uses the next of enough copies to
  exceed the L3 cache three times over. Paths are interleaved call by call; medians.
  The roofline of a case is max(bytes moved / read bandwidth, FLOPs / fp32 matmul peak)
  (without AVX-512 bf16 arithmetic is fp32 FMAs, so the fp32 peak bounds bf16 too);
- the full forward of ``target-xl`` through ``LlamaRunner`` (the zoo's weights if
  built, else random weights of its shape) for 1 and 5 tokens after a 96-token
  prompt, per path: ``verify5_over_decode``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specfleet.models import kernels

# name -> (hidden, intermediate, vocab, layers, heads, kv_heads, head_dim, tied)
MODELS = {
    "target-xl": (768, 2560, 4096, 24, 12, 12, 64, False),
    "smollm2-135m": (576, 1536, 49152, 30, 9, 3, 64, True),
}
PATHS = ("fp32-default", "fp32-mkldnn", "fp32-mkldnn-utils", "bf16-default")
TOKENS = (1, 2, 3, 5, 9, 17)
L3_BYTES = 32 << 20


@dataclass
class KernelSettings:
    quick: bool = False
    threads: tuple[int, ...] = (1, 2)
    reps: int = 40
    forward_reps: int = 15

    @property
    def batches(self) -> tuple[int, ...]:
        return (1,) if self.quick else (1, 4, 8)


def linear_shapes(model: str) -> dict[str, tuple[int, int, int]]:
    """name -> (out_features, in_features, uses per step) for one model's linears."""
    h, inter, vocab, layers, heads, kv, hd, _tied = MODELS[model]
    if kv == heads:  # q, k, v and o are one shape
        shapes = {"q|k|v|o": (heads * hd, h, 4 * layers)}
    else:
        shapes = {"q|o": (heads * hd, h, 2 * layers), "k|v": (kv * hd, h, 2 * layers)}
    shapes.update({"gate|up": (inter, h, 2 * layers), "down": (h, inter, layers), "lm_head": (vocab, h, 1)})
    return shapes


def _path_fn(path: str, w: torch.Tensor):
    """(callable, input dtype) for one weight on one path; None where unavailable."""
    if path == "fp32-default":
        return (lambda x, w=w: F.linear(x, w)), torch.float32
    if path == "fp32-mkldnn":
        return kernels.MkldnnLinear(w, None), torch.float32
    if path == "fp32-mkldnn-utils":  # torch.utils.mkldnn.MkldnnLinear's calls
        wm = w.to_mkldnn()

        def f(x, wm=wm):
            shape = x.shape
            y = torch._C._nn.mkldnn_linear(x.reshape(-1, shape[-1]).to_mkldnn(), wm, None).to_dense()
            return y.view(*shape[:-1], y.shape[-1])
        return f, torch.float32
    if path == "bf16-default":
        wb = w.to(torch.bfloat16)
        return (lambda x, wb=wb: F.linear(x, wb)), torch.bfloat16
    raise ValueError(path)


def _median_time(fn, reps: int, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine_limits(threads: int, mb: int = 256) -> dict:
    """Read/copy bandwidth (GB/s) and fp32/bf16 matmul peak (GFLOP/s) with ``threads``."""
    torch.set_num_threads(threads)
    a = torch.ones(mb << 18)  # mb MiB of fp32
    b = torch.empty_like(a)
    nbytes = a.numel() * 4
    read = nbytes / _median_time(lambda: a.sum(), 9) / 1e9
    copy = 2 * nbytes / _median_time(lambda: b.copy_(a), 9) / 1e9
    out = {"threads": threads, "read_gb_s": read, "copy_gb_s": copy}
    for dt in (torch.float32, torch.bfloat16):
        m = torch.randn(768, 768).to(dt)
        out[f"peak_gflop_s_{str(dt).split('.')[-1]}"] = 2 * 768**3 / _median_time(lambda m=m: m @ m, 7) / 1e9
    return out


def time_linears(settings: KernelSettings, limits: dict[int, dict], progress=None) -> list[dict]:
    """One row per (model, shape, threads, batch, tokens, path): median seconds and roofline."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for model in MODELS:
        for name, (out_f, in_f, uses) in linear_shapes(model).items():
            copies = max(2, -(-3 * L3_BYTES // (out_f * in_f * 4)))
            weights = [torch.randn(out_f, in_f, generator=gen) / in_f**0.5 for _ in range(copies)]
            fns = {p: [_path_fn(p, w) for w in weights] for p in PATHS}
            for threads in settings.threads:
                torch.set_num_threads(threads)
                lim = limits[threads]
                for batch in settings.batches:
                    for tokens in TOKENS:
                        x32 = torch.randn(batch, tokens, in_f, generator=gen)
                        xs = {torch.float32: x32, torch.bfloat16: x32.to(torch.bfloat16)}
                        samples = {p: [] for p in PATHS}
                        for rep in range(settings.reps + 2):
                            for p in PATHS:
                                fn, dt = fns[p][rep % copies]
                                t = time.perf_counter()
                                fn(xs[dt])
                                if rep >= 2:
                                    samples[p].append(time.perf_counter() - t)
                        for p in PATHS:
                            elem = 2 if p.startswith("bf16") else 4
                            m = batch * tokens
                            nbytes = elem * (out_f * in_f + m * (in_f + out_f))
                            flops = 2 * m * out_f * in_f
                            # AVX2 has no bf16 arithmetic: bf16 runs as fp32 FMAs, so the fp32
                            # FMA peak bounds both dtypes' compute.
                            peak = lim["peak_gflop_s_float32"]
                            roof = max(nbytes / (lim["read_gb_s"] * 1e9), flops / (peak * 1e9))
                            sec = statistics.median(samples[p])
                            rows.append({"model": model, "linear": name, "out": out_f, "in": in_f,
                                         "uses_per_step": uses, "threads": threads, "batch": batch,
                                         "tokens": tokens, "path": p, "seconds": sec,
                                         "roofline_seconds": roof, "over_roofline": sec / roof})
                        if progress is not None:
                            progress.update(1)
            del weights, fns
    return rows


def step_linears(rows: list[dict]) -> list[dict]:
    """Per (model, threads, batch, tokens, path): the whole step's linear time (sum of uses x time)."""
    acc: dict[tuple, list[float]] = {}
    for r in rows:
        key = (r["model"], r["threads"], r["batch"], r["tokens"], r["path"])
        s = acc.setdefault(key, [0.0, 0.0])
        s[0] += r["uses_per_step"] * r["seconds"]
        s[1] += r["uses_per_step"] * r["roofline_seconds"]
    out = []
    for (model, threads, batch, tokens, path), (sec, roof) in acc.items():
        out.append({"model": model, "threads": threads, "batch": batch, "tokens": tokens, "path": path,
                    "seconds": sec, "roofline_seconds": roof, "over_roofline": sec / roof})
    for r in out:  # time relative to the same path's 1-token step
        base = next(b for b in out if b["model"] == r["model"] and b["threads"] == r["threads"]
                    and b["batch"] == r["batch"] and b["tokens"] == 1 and b["path"] == r["path"])
        r["over_one_token"] = r["seconds"] / base["seconds"]
    return out


def full_forward(settings: KernelSettings, context: int = 96) -> list[dict]:
    """target-xl through LlamaRunner: decode (1 token) and verify (5) per path and thread count."""
    from specfleet.models.llama_runner import ForwardItem, LlamaRunner

    model, source = _target_xl()
    arms = [("fp32-default", "float32", "default"), ("fp32-mkldnn", "float32", "mkldnn"),
            ("bf16-default", "bfloat16", "default")]
    runners = {}
    for label, dtype, kernel in arms:
        m = model if dtype == "float32" else _copy_in(model, torch.bfloat16)
        runners[label] = LlamaRunner(m, max_slots=1, max_seq_len=context + 32, dtype=dtype, kernel=kernel)
    # Packed linears with the default batched SDPA (not a configurable path: it shows what
    # the mkldnn path's row-at-a-time attention costs).
    hybrid = LlamaRunner(model, max_slots=1, max_seq_len=context + 32, kernel="mkldnn")
    hybrid.kernel = "default"  # forward() then takes the batched SDPA; linears stay packed
    runners["fp32-mkldnn-linears+sdpa"] = hybrid
    prompt = torch.randint(0, model.config.vocab_size, (context,), generator=torch.Generator().manual_seed(1))
    out = []
    for threads in settings.threads:
        torch.set_num_threads(threads)
        samples = {(label, n): [] for label in runners for n in (1, 5)}
        for r in runners.values():
            r.allocate("t")
            r.forward([ForwardItem("t", prompt.tolist(), logit_rows=[])])
        for rep in range(settings.forward_reps + 2):
            for label, r in runners.items():
                for n in (1, 5):
                    t = time.perf_counter()
                    r.forward([ForwardItem("t", list(range(7, 7 + n)))])
                    dt = time.perf_counter() - t
                    r.truncate("t", context)
                    if rep >= 2:
                        samples[(label, n)].append(dt)
        for r in runners.values():
            r.free("t")
        for label in runners:
            d, v = statistics.median(samples[(label, 1)]), statistics.median(samples[(label, 5)])
            out.append({"model": f"target-xl ({source})", "threads": threads, "path": label,
                        "decode_s": d, "verify5_s": v, "verify5_over_decode": v / d,
                        "decode_runs_s": samples[(label, 1)], "verify5_runs_s": samples[(label, 5)]})
    return out


def _copy_in(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def _target_xl():
    """The built zoo's target-xl, else random weights of its shape (timing only)."""
    from specfleet.models.loading import load_causal_lm, resolve_model_path

    try:
        resolve_model_path("zoo:small/target-xl", build=False)
        return load_causal_lm("zoo:small/target-xl"), "zoo:small/target-xl"
    except Exception:  # not built: the same shape, random weights
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        h, inter, vocab, layers, heads, kv, _hd, _ = MODELS["target-xl"]
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512)
        return LlamaForCausalLM(cfg).eval(), "random weights, target-xl shape"


def run(settings: KernelSettings) -> dict:
    from tqdm import tqdm

    from specfleet.benchmarks.engine_bench import machine_description

    limits = {t: machine_limits(t) for t in settings.threads}
    invariant = {}
    for path in ("fp32-default", "fp32-mkldnn", "fp32-mkldnn-utils"):
        fn, _ = _path_fn(path, torch.randn(2560, 768) / 768**0.5)
        invariant[path] = kernels.batch_invariant(fn, 768)
    total = sum(len(linear_shapes(m)) for m in MODELS) * len(settings.threads) * len(settings.batches) * len(TOKENS)
    with tqdm(total=total, desc="linears", leave=False) as bar:
        rows = time_linears(settings, limits, bar)
    torch.set_num_threads(settings.threads[0])
    return {"machine": machine_description(), "settings": {"quick": settings.quick, "reps": settings.reps,
            "threads": list(settings.threads), "batches": list(settings.batches), "tokens": list(TOKENS),
            "paths": list(PATHS)},
            "limits": list(limits.values()), "batch_invariant_rows": invariant,
            "linears": rows, "step_linears": step_linears(rows), "full_forward": full_forward(settings)}


def format_table(report: dict) -> str:
    lines = ["limits: " + "; ".join(
        f"{lim['threads']} thr: read {lim['read_gb_s']:.1f} GB/s, copy {lim['copy_gb_s']:.1f} GB/s, "
        f"fp32 {lim['peak_gflop_s_float32']:.0f} GFLOP/s, bf16 {lim['peak_gflop_s_bfloat16']:.0f} GFLOP/s"
        for lim in report["limits"])]
    lines.append("row-batch-invariant (bit for bit): " + ", ".join(
        f"{p}={v}" for p, v in report["batch_invariant_rows"].items()))
    lines.append("\nwhole-step linears (batch 1): ms [x roofline] (x its own 1-token step)")
    steps = [r for r in report["step_linears"] if r["batch"] == 1]
    for model in MODELS:
        for threads in report["settings"]["threads"]:
            lines.append(f"{model}, {threads} thread(s)   " + "  ".join(f"{t:>19}" for t in TOKENS))
            for path in PATHS:
                cells = []
                for t in TOKENS:
                    r = next(s for s in steps if s["model"] == model and s["threads"] == threads
                             and s["tokens"] == t and s["path"] == path)
                    cells.append(f"{r['seconds'] * 1e3:6.2f} [{r['over_roofline']:4.2f}]({r['over_one_token']:4.2f})")
                lines.append(f"  {path:<19}" + "  ".join(f"{c:>19}" for c in cells))
    lines.append("\nfull forward, LlamaRunner, 96-token context, batch 1: decode ms / verify-5 ms / ratio")
    for r in report["full_forward"]:
        lines.append(f"  {r['model']}, {r['threads']} thr, {r['path']:<25} {r['decode_s'] * 1e3:7.2f} "
                     f"{r['verify5_s'] * 1e3:7.2f}  {r['verify5_over_decode']:.2f}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = report["settings"]["threads"]
    fig, axes = plt.subplots(len(MODELS), len(threads), figsize=(5.5 * len(threads), 4 * len(MODELS)),
                             squeeze=False)
    for i, model in enumerate(MODELS):
        for j, th in enumerate(threads):
            ax = axes[i][j]
            rows = [r for r in report["step_linears"] if r["model"] == model and r["threads"] == th
                    and r["batch"] == 1]
            for kernel_path in PATHS:
                pts = sorted((r["tokens"], r["seconds"] * 1e3) for r in rows if r["path"] == kernel_path)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kernel_path)
            for elem, style in (("fp32", "--"), ("bf16", ":")):
                pts = sorted((r["tokens"], r["roofline_seconds"] * 1e3) for r in rows
                             if r["path"] == f"{elem}-default")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "k" + style, label=f"{elem} roofline")
            ax.set_title(f"{model}: all linears of one step, batch 1, {th} thread(s)")
            ax.set_xlabel("tokens per request")
            ax.set_ylabel("ms")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
