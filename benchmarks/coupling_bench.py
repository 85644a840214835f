"""How often a sampling drafter picks the target's token under two keyed couplings.

``python -m specfleet.benchmarks.coupling_bench``

Why it exists: ``core/sampling.py`` draws every sampled token with noise keyed by
(seed, position), and drafters draw with the same noise, so a draft is accepted iff
both picks agree. Two ways to turn shared noise into a pick: an exponential race
(Gumbel-max: one keyed exponential per vocabulary entry) or the inverse CDF of one
keyed uniform (cheaper). This measures, on synthetic (p, q) pairs at several
temperatures and drafter qualities, the match probability of each, next to the
optimal coupling (1 − TV) and the drafter-invariant bound (1 − TV) / (1 + TV).
"""

from __future__ import annotations

import argparse

import torch


def match_rates(p: torch.Tensor, q: torch.Tensor, trials: int) -> tuple[float, float]:
    vocab = p.shape[0]
    exponentials = -torch.log1p(-torch.rand(trials, vocab, dtype=torch.float64))  # [T, V]
    race = ((p / exponentials).argmax(1) == (q / exponentials).argmax(1)).double().mean().item()
    u = torch.rand(trials, 1, dtype=torch.float64)  # [T, 1]
    cdf_p = p.cumsum(0).expand(trials, vocab).contiguous()
    cdf_q = q.cumsum(0).expand(trials, vocab).contiguous()
    inverse = (torch.searchsorted(cdf_p, u) == torch.searchsorted(cdf_q, u)).double().mean().item()
    return race, inverse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--trials", type=int, default=4000)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print("| T | drafter noise | TV(p,q) | exponential race | inverse CDF | 1-TV | (1-TV)/(1+TV) |")
    print("|---|---|---|---|---|---|---|")
    for temperature in (0.7, 1.0):
        for noise in (0.1, 0.3, 0.6):
            logits = torch.randn(args.vocab) * 3
            p = torch.softmax(logits / temperature, 0).double()
            q = torch.softmax((logits + noise * torch.randn(args.vocab) * 3) / temperature, 0).double()
            tv = 0.5 * (p - q).abs().sum().item()
            race, inverse = match_rates(p, q, args.trials)
            print(f"| {temperature} | {noise} | {tv:.3f} | {race:.3f} | {inverse:.3f} | {1 - tv:.3f} | "
                  f"{(1 - tv) / (1 + tv):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
