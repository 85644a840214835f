"""A verifier group given up (past its restart budget) fails nobody while another
group is available: its requests move, exactly, and the group comes back when its
executor says so. Scripted workers (``testing/fake_workers.py``) on a ManualClock,
the real scheduler, driver and (for the last tests) engine thread; no model, no Ray.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specfleet.core.serving import ErrorCode, GenerationRequest
from specfleet.core.types import FinishReason, SamplingParams
from specfleet.core.workers import WorkerUnavailable
from specfleet.engine.backend import EngineBackend
from tests.unit.test_scheduler import PROMPTS, expected, make_rig, run_all

PROMPTS6 = [*PROMPTS, [11, 12], [13]]
SAMPLING = SamplingParams(max_new_tokens=20)


def first_calls_only(calls, ids) -> bool:
    """True if no request of ``ids`` was ever re-sent from position 0 after its first call."""
    seen = set()
    for call in (c for batch in calls for c in batch):
        if call.request_id in ids:
            if call.request_id in seen and call.position == 0:
                return False
            seen.add(call.request_id)
    return True


def test_a_given_up_group_moves_its_requests_exactly_and_fails_nobody():
    base = make_rig(groups=2, batch=4)
    base_ids = [base.driver.submit(p, SAMPLING, drafter="d") for p in PROMPTS6]
    baseline = run_all(base.driver)

    rig = make_rig(groups=2, batch=4)
    ids = [rig.driver.submit(p, SAMPLING, drafter="d") for p in PROMPTS6]
    rig.driver.step()
    groups = [rig.driver.group_of(r) for r in ids]
    assert groups == [0, 1, 0, 1, 0, 1]
    rig.executor.given_up.add(1)
    done = {o.request_id: o for o in rig.driver.step()}  # group 1 gives up in this step
    assert rig.scheduler.unavailable_groups == [1] and rig.scheduler.available_groups == [0]
    on0 = {r for r, g in zip(ids, groups) if g == 0}
    on1 = set(ids) - on0
    assert all(rig.driver.group_of(r) is None for r in on1)  # waiting again, at the front
    assert rig.scheduler.request_ids[:3] == [r for r in ids if r in on1]
    assert rig.scheduler.load().groups[1].capacity == 0
    done.update(run_all(rig.driver))
    assert [done[r].token_ids for r in ids] == [expected(p, SAMPLING) for p in PROMPTS6]
    assert all(done[r].finish_reason == FinishReason.LENGTH for r in ids)
    assert all(done[r].stats.verifier_group == 0 for r in ids)  # all served on group 0 in the end
    # Group 0's round of the failing step was kept: its requests were never re-sent whole,
    # and took the rounds of an undisturbed run.
    assert first_calls_only(rig.verifiers[0].calls, on0)
    for rid, bid in zip(ids, base_ids):
        if rid in on0:
            assert done[rid].stats.rounds == baseline[bid].stats.rounds
    # The moved requests were re-prefilled on group 0 from position 0 with every committed token.
    moved_first = {}
    for call in (c for batch in rig.verifiers[0].calls for c in batch):
        moved_first.setdefault(call.request_id, call)
    for rid, prompt in zip(ids, PROMPTS6):
        if rid in on1:
            first = moved_first[rid]
            assert first.position == 0 and len(first.new_tokens) > len(prompt)
            assert first.new_tokens[: len(prompt)] == prompt
    assert rig.scheduler.stats.verify_failures[1] == 1
    assert [p.group for p in rig.executor.plans[:4]] == [0, 1, 0, 1]  # step 2: group 1 gave up
    assert all(p.group == 0 for p in rig.executor.plans[4:])  # no round sent to it since


def test_an_evicted_group_is_restored_when_its_executor_says_it_is_back():
    rig = make_rig(groups=2, batch=4)
    ids = [rig.driver.submit(p, SAMPLING, drafter="d") for p in PROMPTS]
    rig.driver.step()
    rig.executor.given_up.add(1)
    rig.driver.step()
    assert rig.scheduler.unavailable_groups == [1]
    rig.driver.step()
    assert rig.scheduler.unavailable_groups == [1]  # still given up: stays evicted
    rig.executor.given_up.discard(1)  # the budget's window passed, a new worker loaded
    late = [rig.driver.submit(p, SAMPLING, drafter="d") for p in ([21, 22], [23])]
    done = {o.request_id: o for o in rig.driver.step()}
    assert rig.scheduler.unavailable_groups == []
    assert [rig.driver.group_of(r) for r in late] == [1, 1]  # least loaded again
    done.update(run_all(rig.driver))
    prompts = [*PROMPTS, [21, 22], [23]]
    assert [done[r].token_ids for r in [*ids, *late]] == [expected(p, SAMPLING) for p in prompts]
    assert [done[r].stats.verifier_group for r in ids] == [0, 0, 0, 0]


def test_with_no_group_left_the_error_is_raised_and_nothing_is_lost():
    rig = make_rig(groups=2, batch=4)
    ids = [rig.driver.submit(p, SAMPLING, drafter="d") for p in PROMPTS]
    rig.driver.step()
    rig.executor.given_up.update({0, 1})  # both give up in the same step
    rig.driver.step()  # group 0 is evicted; group 1's failure is a value, its requests resume
    assert rig.scheduler.unavailable_groups == [0]
    with pytest.raises(WorkerUnavailable) as err:
        rig.driver.step()  # group 1, the last one, gives up: nothing to move the requests to
    assert err.value.group == 1 and "verifier group 1" in str(err.value)
    assert rig.scheduler.unavailable_groups == [0]  # the last group is never evicted
    assert sorted(rig.scheduler.request_ids) == sorted(ids)
    rig.executor.given_up.clear()  # a caller that goes on (servers fail the requests instead)
    done = run_all(rig.driver)
    assert [done[r].token_ids for r in ids] == [expected(p, SAMPLING) for p in PROMPTS]


def test_one_group_given_up_raises_as_before():
    rig = make_rig(groups=1, batch=4)
    rig.driver.submit(PROMPTS[0], SAMPLING, drafter="d")
    rig.driver.step()
    rig.executor.given_up.add(0)
    with pytest.raises(WorkerUnavailable):
        rig.driver.step()
    assert rig.scheduler.unavailable_groups == []


def test_evict_drops_a_round_in_flight_and_frees_the_group():
    rig = make_rig(groups=2, batch=4)
    ids = [rig.driver.submit(p, SAMPLING, drafter="d") for p in PROMPTS]
    rig.driver.step()
    sched, now = rig.scheduler, rig.clock.now_ns()
    plans = sched.next_rounds(now)
    outcomes = rig.executor.run_rounds(plans)
    on1 = sched.evict_group(1, now)  # while group 1's round is in flight
    assert on1 == [ids[1], ids[3]]
    before = {r: sched.generated(r) for r in on1}
    for outcome in outcomes:
        sched.on_round_done(outcome, now)  # group 1's late reply is ignored
    assert {r: sched.generated(r) for r in on1} == before
    with pytest.raises(ValueError, match="last one"):
        sched.evict_group(0, now)
    assert sched.evict_group(1, now) == []  # already evicted
    assert sched.cancel(ids[3], now)  # a moved request waiting again: released everywhere
    cancelled = sched.drain_finished()
    assert [(o.request_id, o.finish_reason) for o in cancelled] == [(ids[3], FinishReason.CANCELLED)]
    work = sched.take_housekeeping()
    assert sorted(work.verifier_releases[1]) == sorted(on1)  # group 1 may still hold them
    assert work.drafter_releases == {"d": [ids[3]]}
    rig.executor.housekeeping(work)
    done = run_all(rig.driver)
    assert [done[r].token_ids for r in ids if r != ids[3]] == [
        expected(p, SAMPLING) for r, p in zip(ids, PROMPTS) if r != ids[3]]
    assert ids[1] in rig.verifiers[1].released


# ---- the engine thread -----------------------------------------------------------------------
async def _collect(backend, rid, prompt):
    tokens, last = [], None
    async for chunk in backend.stream(GenerationRequest(rid, prompt, SAMPLING, drafter="d")):
        tokens += chunk.token_ids
        last = chunk
    return tokens, last


def _serve(rig, prompts, give_up):
    """Stream ``prompts`` from an EngineBackend over the rig; ``give_up`` groups give up
    after the first step."""
    real_step, steps = rig.driver.step, []

    def step():
        steps.append(1)
        if len(steps) == 2:
            rig.executor.given_up.update(give_up)
        return real_step()

    rig.driver.step = step
    backend = EngineBackend(rig.driver, None)

    async def main():
        try:
            return await asyncio.gather(*(_collect(backend, f"r{i}", p) for i, p in enumerate(prompts)))
        finally:
            await backend.close()

    return asyncio.run(main())


def test_the_server_keeps_serving_when_one_group_gives_up():
    rig = make_rig(groups=2, batch=4)
    results = _serve(rig, PROMPTS6, give_up={1})
    for (tokens, last), prompt in zip(results, PROMPTS6):
        assert last.error is None and last.finish_reason == FinishReason.LENGTH
        assert tokens == expected(prompt, SAMPLING)
    assert rig.scheduler.unavailable_groups == [1]


def test_the_server_fails_requests_unavailable_only_with_no_group_left():
    rig = make_rig(groups=2, batch=4)
    results = _serve(rig, PROMPTS, give_up={0, 1})
    for _tokens, last in results:
        assert last.error is not None and last.error.code == ErrorCode.UNAVAILABLE
        assert "is unavailable" in last.error.message and len(last.error.message) < 200


# ---- exactness under any eviction schedule ------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 49), min_size=1, max_size=6), min_size=1, max_size=6),
    budgets=st.lists(st.integers(1, 25), min_size=6, max_size=6),
    groups=st.integers(2, 3),
    batch=st.integers(1, 4),
    events=st.lists(st.tuples(st.integers(0, 20), st.sets(st.integers(0, 2))), max_size=4),
)
def test_output_is_plain_decoding_whatever_groups_give_up(prompts, budgets, groups, batch, events):
    rig = make_rig(groups=groups, batch=batch)
    samplings = [SamplingParams(max_new_tokens=b) for b in budgets[: len(prompts)]]
    ids = [rig.driver.submit(p, s, drafter="d") for p, s in zip(prompts, samplings)]
    done, step = {}, 0
    while rig.driver.has_work:
        for at, down in events:
            if at == step:  # these groups are given up from now on (one always works)
                rig.executor.given_up = {g for g in down if g < groups} - {step % groups}
        done.update((o.request_id, o) for o in rig.driver.step())
        step += 1
        assert step < 500
    assert [done[r].token_ids for r in ids] == [expected(p, s) for p, s in zip(prompts, samplings)]
    assert all(done[r].finish_reason == FinishReason.LENGTH for r in ids)


# ---- real workers: lockstep and pipelined ------------------------------------------------------
class _GivesUp:
    """A group's worker past its restart budget from its ``after``-th call on."""

    def __init__(self, worker, group: int, after: int = 2):
        self.worker, self.group, self.after, self.calls = worker, group, after, 0

    def verify(self, calls, drafts):
        self.calls += 1
        if self.calls >= self.after:
            raise WorkerUnavailable(f"verifier group {self.group} is unavailable", group=self.group)
        return self.worker.verify(calls, drafts)

    def release(self, request_ids):
        self.worker.release(request_ids)


@pytest.mark.parametrize("pipelined", [False, True])
def test_tiny_llama_two_groups_one_given_up_stays_exact(pipelined):
    import torch

    from specfleet.engine.engine import SpecEngine
    from specfleet.models.llama_runner import LlamaRunner
    from specfleet.policy.draft_length import FixedDraftLength
    from specfleet.verifiers.verifier import Verifier
    from tests.unit.test_engine_exact import PROMPTS as LLAMA_PROMPTS
    from tests.unit.test_engine_exact import hf_greedy, model_drafter, tiny_llama

    torch.set_num_threads(1)
    target, new = tiny_llama(0), 14
    verifiers = [Verifier(LlamaRunner(target, max_slots=8, max_seq_len=200)) for _ in range(2)]
    # The target drafting for itself: every window is accepted, so pipelined rounds hit.
    engine = SpecEngine(verifiers, {"d": model_drafter(target, "d")},
                        draft_policy=FixedDraftLength(3), max_batch_size=8, pipelined=pipelined)
    victim = _GivesUp(engine.executor.verifiers[1], 1, after=3)
    engine.executor.verifiers[1] = victim
    outs = engine.generate(LLAMA_PROMPTS, SamplingParams(max_new_tokens=new, ignore_eos=True), drafter="d")
    assert [o.token_ids for o in outs] == [hf_greedy(target, p, new) for p in LLAMA_PROMPTS]
    assert all(o.finish_reason == FinishReason.LENGTH for o in outs)
    assert victim.calls == 3 and engine.scheduler.unavailable_groups == [1]
    assert [o.stats.verifier_group for o in outs] == [0, 0, 0, 0]
    assert verifiers[0].active == []  # every slot freed; group 1's released on eviction
    assert verifiers[1].active == []
    assert not any(engine.stats.draft_failures.values())  # the drafter's position contract held
    if pipelined:
        assert engine.scheduler.pipeline_hits > 0  # windows were drafted ahead
