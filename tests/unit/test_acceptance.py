"""The lossless acceptance rule: hand-built greedy cases and statistical sampled checks.

Greedy cases build logits with a large value at the wanted argmax (vLLM style), so every
expected output is written down. Sampled cases run the rule over many seeds on a small
vocabulary and compare the emitted tokens' distribution with the target's by a
chi-square test. Every statistical check is paired with a deliberately wrong rule that
must FAIL the same check, which shows the check has the power to catch a broken rule.
All seeds are fixed, so the tests are deterministic; thresholds are ~5 sigma anyway so
that a change in how random numbers are consumed cannot make them flaky.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from specfleet.core.sampling import make_generator, processed_probs
from specfleet.core.types import ROOT, SamplingParams
from specfleet.verifiers.acceptance import (
    Acceptance,
    accept_greedy,
    accept_sampled,
    tree_children,
)

SAMPLED = SamplingParams(temperature=1.0)
TRIALS = 3000  # per statistical check: ~0.2 s each on one CPU core


# ----------------------------------------------------------------------------- helpers


def _greedy_logits(argmaxes: list[int], vocab: int = 10) -> torch.Tensor:
    """[len(argmaxes), vocab] logits: noise, plus a large value at each row's argmax."""
    logits = torch.randn(len(argmaxes), vocab, generator=torch.Generator().manual_seed(7))
    logits[torch.arange(len(argmaxes)), argmaxes] = 100.0
    return logits


def _log(probs: np.ndarray) -> torch.Tensor:
    """Logits whose softmax is exactly ``probs`` (the last axis), so expectations are exact."""
    return torch.from_numpy(np.log(probs)).float()


def _dist(rng: np.random.Generator, vocab: int, concentration: float = 1.0) -> np.ndarray:
    """A random distribution with every entry comfortably above 0 (expected counts >> 5)."""
    probs = rng.dirichlet(np.full(vocab, concentration)) + 0.03
    return probs / probs.sum()


def _chi2(counts: np.ndarray, expected_probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; any count in a zero cell is infinite."""
    counts, expected_probs = counts.ravel(), expected_probs.ravel()
    support = expected_probs > 0
    if counts[~support].sum() > 0:
        return math.inf, int(support.sum()) - 1
    expected = counts.sum() * expected_probs[support]
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def _chi2_threshold(dof: int, z: float = 5.0) -> float:
    """Wilson-Hilferty quantile of chi-square(dof) at ~z sigma (p ~ 3e-7 for z = 5)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def _matches(counts: np.ndarray, expected_probs: np.ndarray) -> bool:
    stat, dof = _chi2(counts, expected_probs)
    return stat < _chi2_threshold(dof)


def _counts(values: list[int] | list[tuple[int, int]], shape: tuple[int, ...]) -> np.ndarray:
    counts = np.zeros(shape)
    for value in values:
        counts[value] += 1
    return counts


def _first_tokens(
    target_logits: torch.Tensor,
    propose: Callable[[np.random.Generator], tuple[list[int], list[int], object]],
    sampling: SamplingParams = SAMPLED,
    trials: int = TRIALS,
) -> list[int]:
    """The first emitted token over ``trials`` seeds; ``propose`` draws each trial's draft."""
    rng = np.random.default_rng(2024)  # the drafters' randomness, independent of the verifier's
    firsts = []
    for seed in range(trials):
        tokens, parents, draft_probs = propose(rng)
        result = accept_sampled(
            target_logits, tokens, parents, sampling, make_generator(seed), draft_probs
        )
        firsts.append(result.emitted[0])
    return firsts


# ----------------------------------------------------------------------------- tree / validation


def test_tree_children_indexes_like_logits_rows() -> None:
    assert tree_children([]) == [[]]
    assert tree_children([ROOT, 0, 1]) == [[0], [1], [2], []]
    assert tree_children([ROOT, ROOT, 0, 1, 3]) == [[0, 1], [2], [3], [], [4], []]


@pytest.mark.parametrize("parents", [[0], [ROOT, 1], [ROOT, 2, 0], [-2]])
def test_bad_parents_raise(parents: list[int]) -> None:
    with pytest.raises(ValueError, match="parents"):
        tree_children(parents)


def test_malformed_inputs_raise() -> None:
    logits = _greedy_logits([1, 2, 3])  # [3, 10]
    with pytest.raises(ValueError, match="target_logits"):
        accept_greedy(logits, [1], [ROOT])
    with pytest.raises(ValueError, match="parents"):
        accept_greedy(logits, [1, 2], [ROOT])
    with pytest.raises(ValueError, match="vocabulary"):
        accept_greedy(logits, [1, 10], [ROOT, 0])
    generator = make_generator(0)
    with pytest.raises(ValueError, match="accept_greedy"):
        accept_sampled(logits, [1, 2], [ROOT, 0], SamplingParams(), generator)
    with pytest.raises(ValueError, match="draft_probs"):
        accept_sampled(logits, [1, 2], [ROOT, 0], SAMPLED, generator, torch.ones(1, 10))
    with pytest.raises(ValueError, match="draft_probs"):
        accept_sampled(logits, [1, 2], [ROOT, 0], SAMPLED, generator, [None])
    with pytest.raises(ValueError, match=r"draft_probs\[1\]"):
        accept_sampled(logits, [1, 2], [ROOT, 0], SAMPLED, generator, [None, torch.ones(9)])


def test_token_the_drafter_could_not_have_sampled_raises() -> None:
    q = torch.full((10,), 0.1)
    q[1] = 0.0
    logits = _greedy_logits([1, 2])
    with pytest.raises(ValueError, match="could not have sampled"):
        accept_sampled(logits, [1], [ROOT], SAMPLED, make_generator(0), q[None])


def test_all_nan_row_marks_a_deterministic_node_like_none() -> None:
    # DraftProposal.draft_probs is one [N, V] array, so a fused tree marks its
    # deterministic nodes with all-NaN rows; that must mean exactly what None means.
    rng = np.random.default_rng(12)
    target = np.stack([_dist(rng, 6) for _ in range(4)])  # [4, 6]
    logits = _log(target)
    q = torch.from_numpy(np.stack([_dist(rng, 6) for _ in range(3)])).float()  # [3, 6]
    as_array = q.clone()
    as_array[1] = math.nan
    # Node 0 drafts the token the target likes least relative to q, so it is often
    # rejected; node 1 the residual's favourite, so it is then often accepted.
    first = int(np.argmax(q[0].numpy() / target[0]))
    second = int(np.argmax(np.maximum(0.0, target[0] - q[0].numpy())))
    tokens, parents = [first, second, 1], [ROOT, ROOT, 0]
    outcomes = set()
    for seed in range(30):
        listed = accept_sampled(
            logits, tokens, parents, SAMPLED, make_generator(seed), [q[0], None, q[2]]
        )
        arrayed = accept_sampled(logits, tokens, parents, SAMPLED, make_generator(seed), as_array)
        assert listed == arrayed
        outcomes.add(tuple(listed.accepted_nodes))
    assert (1,) in outcomes  # the deterministic node was really tested (and accepted)
    partly = q.clone()
    partly[2, 4] = math.nan
    with pytest.raises(ValueError, match=r"draft_probs\[2\].*NaN"):
        accept_sampled(logits, tokens, parents, SAMPLED, make_generator(0), partly)


# ----------------------------------------------------------------------------- greedy


def test_greedy_perfect_match_accepts_all_plus_bonus() -> None:
    logits = _greedy_logits([1, 2, 3, 4])
    assert accept_greedy(logits, [1, 2, 3], [ROOT, 0, 1]) == Acceptance([0, 1, 2], [1, 2, 3, 4])


def test_greedy_first_token_mismatch_emits_the_targets_token() -> None:
    logits = _greedy_logits([5, 2, 3, 4])
    assert accept_greedy(logits, [1, 2, 3], [ROOT, 0, 1]) == Acceptance([], [5])


def test_greedy_mismatch_in_the_middle() -> None:
    logits = _greedy_logits([1, 2, 9, 4])
    assert accept_greedy(logits, [1, 2, 3], [ROOT, 0, 1]) == Acceptance([0, 1], [1, 2, 9])


def test_greedy_empty_draft_emits_the_targets_next_token() -> None:
    assert accept_greedy(_greedy_logits([6]), [], []) == Acceptance([], [6])


def test_greedy_second_candidate_matches() -> None:
    # Two candidates at the root; the target wants the second one's token.
    logits = _greedy_logits([5, 0, 8])
    assert accept_greedy(logits, [3, 5], [ROOT, ROOT]) == Acceptance([1], [5, 8])


def test_greedy_deep_branch_matches() -> None:
    #        root
    #       /    \
    #   0:tok1  1:tok2
    #     |       |
    #   2:tok3  3:tok4
    #             |
    #           4:tok5
    tokens, parents = [1, 2, 3, 4, 5], [ROOT, ROOT, 0, 1, 3]
    # rows: root -> 2 (node 1), node0 -> 3, node1 -> 4 (node 3), node2 -> 0, node3 -> 5
    # (node 4), node4 -> 7 (bonus)
    logits = _greedy_logits([2, 3, 4, 0, 5, 7])
    assert accept_greedy(logits, tokens, parents) == Acceptance([1, 3, 4], [2, 4, 5, 7])


def test_greedy_duplicate_siblings_take_the_first() -> None:
    logits = _greedy_logits([4, 0, 6])
    assert accept_greedy(logits, [4, 4], [ROOT, ROOT]) == Acceptance([0], [4, 0])


def test_greedy_argmax_ties_go_to_the_lowest_token_id() -> None:
    logits = torch.zeros(2, 6)
    logits[0, [2, 4]] = 50.0  # a tie: torch.argmax returns the first maximal index
    assert accept_greedy(logits, [4], [ROOT]) == Acceptance([], [2])
    assert accept_greedy(logits, [2], [ROOT]).accepted_nodes == [0]


# ----------------------------------------------------------------------------- sampled: exact cases


def test_drafter_equal_to_the_target_is_always_accepted() -> None:
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))  # [N+1, V]
    q = processed_probs(logits[:3], 0.9, top_k=4, top_p=0.9)  # [N, V], same processing
    sampling = SamplingParams(temperature=0.9, top_k=4, top_p=0.9)
    for seed in range(30):
        # Draft the chain from q itself, as a sampling drafter with the target's weights would.
        generator = make_generator(1000 + seed)
        x0 = int(torch.multinomial(q[0], 1, generator=generator))
        x1 = int(torch.multinomial(q[1], 1, generator=generator))
        x2 = int(torch.multinomial(q[2], 1, generator=generator))
        result = accept_sampled(
            logits, [x0, x1, x2], [ROOT, 0, 1], sampling, make_generator(seed), q
        )
        assert result.accepted_nodes == [0, 1, 2]


def test_fixed_seed_reproduces_and_different_seeds_differ() -> None:
    rng = np.random.default_rng(5)
    logits = _log(np.stack([_dist(rng, 6) for _ in range(5)]))  # [5, 6]
    q = torch.from_numpy(np.stack([_dist(rng, 6) for _ in range(4)])).float()  # [4, 6]
    tokens, parents = [0, 1, 2, 3], [ROOT, ROOT, 0, 1]

    def run(seed: int) -> Acceptance:
        return accept_sampled(logits, tokens, parents, SAMPLED, make_generator(seed), q)

    assert run(11) == run(11)
    assert len({tuple(run(seed).emitted) for seed in range(30)}) > 3


def test_sampled_uses_only_the_requests_generator() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    accept_sampled(logits, [1, 2], [ROOT, 0], SAMPLED, make_generator(4))
    assert torch.equal(before, torch.get_rng_state())


def test_rejection_with_no_residual_mass_falls_back_to_p() -> None:
    # q agrees with p everywhere except q(x) > p(x) at the drafted token (a caller bug,
    # or float rounding in the real case): max(0, p - q) has no mass, yet rejections
    # happen about half the time. Nothing may divide by zero or emit NaN-driven garbage.
    p = np.array([0.1, 0.2, 0.3, 0.4])
    logits = _log(np.stack([p, p]))  # [2, 4]
    q = torch.from_numpy(p).float()
    q[3] = 0.8
    results = [
        accept_sampled(logits, [3], [ROOT], SAMPLED, make_generator(seed), q[None])
        for seed in range(40)
    ]
    assert any(not r.accepted_nodes for r in results)  # some rejections happened
    assert all(0 <= r.emitted[-1] < 4 for r in results)


# ----------------------------------------------------------------------------- sampled: statistical


def test_single_sampled_position_matches_the_target() -> None:
    rng = np.random.default_rng(0)
    vocab = 6
    p = _dist(rng, vocab)
    q = _dist(rng, vocab, concentration=0.5)
    assert 0.5 * np.abs(p - q).sum() > 0.2  # a drafter that really differs
    logits = _log(np.stack([p, p]))  # [2, V]: the root row and a bonus row
    q_t = torch.from_numpy(q).float()

    drafted: list[int] = []

    def propose(rng: np.random.Generator) -> tuple[list[int], list[int], object]:
        x = int(rng.choice(vocab, p=q))
        drafted.append(x)
        return [x], [ROOT], q_t[None]

    firsts = _first_tokens(logits, propose)
    assert _matches(_counts(firsts, (vocab,)), p)
    # Wrong rule 1: accept every draft. Its output is the drafter's distribution.
    assert not _matches(_counts(drafted, (vocab,)), p)
    # Wrong rule 2 (the classic bug): on rejection resample from p instead of the residual.
    wrong_rng = np.random.default_rng(1)
    accept = np.minimum(1.0, p / q)
    wrong = [
        x if wrong_rng.random() < accept[x] else int(wrong_rng.choice(vocab, p=p)) for x in drafted
    ]
    assert not _matches(_counts(wrong, (vocab,)), p)


def _two_token_joint(
    p1: np.ndarray,
    p2: np.ndarray,
    q2: np.ndarray,
    propose: Callable[[np.random.Generator], tuple[list[int], list[int], object]],
    accept_all: bool = False,
) -> np.ndarray:
    """Counts [V, V] of the first two emitted tokens over TRIALS two-round decodes.

    The target's row for a child of a depth-1 node with token x is p2[x]; rows further
    down are bonus rows whose content does not matter here. When round 1 emits only one
    token (its first position was rejected), round 2 drafts from q2 and verifies again,
    exactly as the engine would.
    """
    vocab = len(p1)
    rng = np.random.default_rng(99)
    uniform = np.full(vocab, 1.0 / vocab)
    pairs = []
    for seed in range(TRIALS):
        tokens, parents, draft_probs = propose(rng)
        if accept_all:  # the wrong rule: take the first path as drafted
            pairs.append((tokens[0], tokens[1]))
            continue
        rows = [p1] + [p2[tokens[i]] if parents[i] == ROOT else uniform for i in range(len(tokens))]
        generator = make_generator(seed)
        first = accept_sampled(
            _log(np.stack(rows)), tokens, parents, SAMPLED, generator, draft_probs
        )
        if len(first.emitted) >= 2:
            pairs.append((first.emitted[0], first.emitted[1]))
            continue
        y1 = first.emitted[0]
        x2 = int(rng.choice(vocab, p=q2[y1]))
        second = accept_sampled(
            _log(np.stack([p2[y1], uniform])),
            [x2],
            [ROOT],
            SAMPLED,
            generator,
            torch.from_numpy(q2[y1]).float()[None],
        )
        pairs.append((y1, second.emitted[0]))
    return _counts(pairs, (vocab, vocab))


def _two_token_setup(seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    vocab = 4
    p1 = _dist(rng, vocab)
    p2 = np.stack([_dist(rng, vocab) for _ in range(vocab)])  # [V, V]: p2[x1] = p(x2 | x1)
    q1 = _dist(rng, vocab, concentration=0.5)
    q2 = np.stack([_dist(rng, vocab, concentration=0.5) for _ in range(vocab)])
    return p1, p2, q1, q2


def test_sampled_chain_of_two_matches_the_joint_target_distribution() -> None:
    p1, p2, q1, q2 = _two_token_setup(3)
    vocab = len(p1)
    joint = p1[:, None] * p2  # [V, V]: p(x1) p(x2 | x1)

    def propose(rng: np.random.Generator) -> tuple[list[int], list[int], object]:
        x1 = int(rng.choice(vocab, p=q1))
        x2 = int(rng.choice(vocab, p=q2[x1]))
        return [x1, x2], [ROOT, 0], torch.from_numpy(np.stack([q1, q2[x1]])).float()

    assert _matches(_two_token_joint(p1, p2, q2, propose), joint)
    assert not _matches(_two_token_joint(p1, p2, q2, propose, accept_all=True), joint)


def test_mixed_tree_of_sampled_and_deterministic_branches_matches_the_joint() -> None:
    # root -> 0: a ~ q1 (sampled)         -> 2: a' ~ q2[a] (sampled)
    #      -> 1: token 2 (deterministic)  -> 3: argmax of q2[2] (deterministic)
    p1, p2, q1, q2 = _two_token_setup(4)
    vocab = len(p1)
    joint = p1[:, None] * p2
    q1_t, q2_t = torch.from_numpy(q1).float(), torch.from_numpy(q2).float()

    def propose(rng: np.random.Generator) -> tuple[list[int], list[int], object]:
        a = int(rng.choice(vocab, p=q1))
        a_child = int(rng.choice(vocab, p=q2[a]))
        b_child = int(q2[2].argmax())
        return [a, 2, a_child, b_child], [ROOT, ROOT, 0, 1], [q1_t, None, q2_t[a], None]

    assert _matches(_two_token_joint(p1, p2, q2, propose), joint)
    assert not _matches(_two_token_joint(p1, p2, q2, propose, accept_all=True), joint)


def test_deterministic_candidates_at_the_root_match_the_target() -> None:
    rng = np.random.default_rng(6)
    vocab = 6
    p = _dist(rng, vocab)
    candidates = [int(np.argsort(p)[-1]), int(np.argsort(p)[-2]), int(np.argsort(p)[0])]
    logits = _log(np.stack([p] * 4))  # [4, V]

    firsts = _first_tokens(logits, lambda rng: (candidates, [ROOT] * 3, None))
    assert _matches(_counts(firsts, (vocab,)), p)

    # Wrong rule: test each candidate against the *unmodified* p (no zeroing after a
    # rejection), then sample from p.
    wrong_probs = np.zeros(vocab)
    remaining = 1.0
    for c in candidates:
        wrong_probs[c] += remaining * p[c]
        remaining *= 1.0 - p[c]
    wrong_probs += remaining * p
    wrong = np.random.default_rng(7).multinomial(TRIALS, wrong_probs)
    assert not _matches(wrong, p)


@pytest.mark.parametrize("same_drafter", [False, True], ids=["two-drafters", "iid-one-drafter"])
def test_sampled_candidates_from_several_drafters_match_the_target(same_drafter: bool) -> None:
    rng = np.random.default_rng(8)
    vocab = 6
    p = _dist(rng, vocab)
    qa = np.array([0.6, 0.1, 0.1, 0.1, 0.05, 0.05])
    qb = qa if same_drafter else qa[::-1].copy()
    qa_t, qb_t = torch.from_numpy(qa).float(), torch.from_numpy(qb).float()
    mean_t = (qa_t + qb_t) / 2
    logits = _log(np.stack([p] * 4))  # [4, V]: root + one bonus row per candidate
    deterministic = int(np.argmax(p))

    def propose(rng: np.random.Generator) -> tuple[list[int], list[int], object]:
        a, b = int(rng.choice(vocab, p=qa)), int(rng.choice(vocab, p=qb))
        return [a, b, deterministic], [ROOT] * 3, [qa_t, qb_t, None]

    assert _matches(_counts(_first_tokens(logits, propose), (vocab,)), p)

    # Wrong rules that must fail: accept the first candidate always; and (two drafters)
    # pass a fused/averaged q instead of each candidate's own drafter's q.
    draws = np.random.default_rng(2024)
    always = [int(draws.choice(vocab, p=qa)) for _ in range(TRIALS)]
    assert not _matches(_counts(always, (vocab,)), p)
    if not same_drafter:

        def propose_fused(rng: np.random.Generator) -> tuple[list[int], list[int], object]:
            tokens, parents, _ = propose(rng)
            return tokens, parents, [mean_t, mean_t, None]

        fused = _first_tokens(logits, propose_fused)
        assert not _matches(_counts(fused, (vocab,)), p)


@pytest.mark.parametrize(
    ("processing", "forgotten"),
    [
        ((0.5, 0, 1.0), (1.0, 0, 1.0)),
        ((1.0, 3, 1.0), (1.0, 0, 1.0)),
        ((1.0, 0, 0.7), (1.0, 0, 1.0)),
        ((0.7, 5, 0.8), (1.0, 0, 1.0)),
    ],
    ids=["temperature", "top_k", "top_p", "all-three"],
)
def test_temperature_top_k_top_p_are_applied_to_the_target(
    processing: tuple[float, int, float], forgotten: tuple[float, int, float]
) -> None:
    rng = np.random.default_rng(16)
    vocab = 6
    target_logits = torch.from_numpy(rng.normal(0, 0.8, size=(2, vocab))).float()  # [2, V]
    draft_logits = torch.from_numpy(rng.normal(0, 0.8, size=vocab)).float()  # [V]
    temperature, top_k, top_p = processing
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    p = processed_probs(target_logits[0], *processing).double().numpy()
    q_t = processed_probs(draft_logits, *processing)  # the drafter processes identically
    q = q_t.double().numpy()
    unprocessed = processed_probs(target_logits[0], *forgotten).double().numpy()

    def propose(rng: np.random.Generator) -> tuple[list[int], list[int], object]:
        return [int(rng.choice(vocab, p=q / q.sum()))], [ROOT], q_t[None]

    counts = _counts(_first_tokens(target_logits, propose, sampling), (vocab,))
    assert _matches(counts, p)
    # Wrong rule: the same draws verified against the target without this processing.
    assert not _matches(counts, unprocessed)
