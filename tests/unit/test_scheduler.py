"""The scheduler on a ManualClock with scripted workers: no model, no Ray.

Every test runs the real ``Scheduler`` (usually through the real ``EngineDriver``)
against ``testing/fake_workers.py``, whose workers check the position contract; the
outputs are compared with plain greedy decoding of the same toy target.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specfleet.core.clock import ManualClock
from specfleet.core.types import FinishReason, SamplingParams
from specfleet.core.workers import FailureKind
from specfleet.engine.driver import EngineDriver
from specfleet.engine.scheduler import Scheduler
from specfleet.policy.draft_length import FixedDraftLength
from specfleet.testing.fake_workers import (
    ScriptedDrafter,
    ScriptedExecutor,
    ScriptedVerifier,
    reference_output,
    toy_target,
)

TARGET = toy_target()
PROMPTS = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]


def every_third_wrong(request_id: str, k: int) -> bool:
    return k % 3 == 2


def letters(ids) -> str:
    return "".join(chr(97 + t % 26) for t in ids)


def make_rig(*, groups=1, batch=4, window=3, wrong_at=every_third_wrong, eos=(), decode=None,
             drafters=("d",)):
    clock = ManualClock()
    workers = {n: ScriptedDrafter(n, TARGET, wrong_at) for n in drafters}
    verifiers = [ScriptedVerifier(TARGET) for _ in range(groups)]
    executor = ScriptedExecutor(workers, verifiers, clock)
    scheduler = Scheduler(drafters=list(drafters), draft_length=FixedDraftLength(window), groups=groups,
                          max_batch_size=batch, eos_token_ids=eos, decode=decode)
    driver = EngineDriver(scheduler, executor, clock=clock)
    return SimpleNamespace(clock=clock, drafters=workers, verifiers=verifiers, executor=executor,
                           scheduler=scheduler, driver=driver)


def run_all(driver) -> dict:
    done = {}
    while driver.has_work:
        done.update((o.request_id, o) for o in driver.step())
    return done


def expected(prompt, sampling, **kw):
    return reference_output(TARGET, prompt, sampling, **kw)


# ---- lockstep ----------------------------------------------------------------------------
def test_lockstep_output_equals_plain_decoding():
    rig = make_rig()
    sampling = [SamplingParams(max_new_tokens=n) for n in (5, 17, 1, 30)]
    ids = [rig.driver.submit(p, s, drafter="d") for p, s in zip(PROMPTS, sampling)]
    done = run_all(rig.driver)
    for rid, prompt, s in zip(ids, PROMPTS, sampling):
        assert done[rid].token_ids == expected(prompt, s)
        assert done[rid].finish_reason == FinishReason.LENGTH
    stats = done[ids[3]].stats
    # Window 3 with the third guess wrong: 2 accepted + 1 recovered per round for 9
    # rounds (27 tokens); the last window is capped at 2 (3 left) and fully accepted.
    assert (stats.rounds, stats.drafted, stats.accepted, stats.emitted) == (10, 29, 20, 30)
    assert stats.position_drafted == [10, 10, 9] and stats.position_accepted == [10, 10, 0]
    per_drafter = rig.scheduler.stats.per_drafter
    assert per_drafter["d"].emitted == 5 + 17 + 30 and per_drafter[""].emitted == 1  # window 0: undrafted
    # Finished requests are released everywhere and offered to learning drafters.
    assert sorted(rig.verifiers[0].released) == sorted(ids)
    assert sorted(rig.drafters["d"].released) == sorted(ids[:2] + ids[3:])  # ids[2] never drafted
    assert len(rig.drafters["d"].observed) == 4


# ---- admission and batching ----------------------------------------------------------------
def test_admission_fills_the_batch_and_queues_the_rest():
    rig = make_rig(batch=2)
    short, long_, late = (rig.driver.submit(p, SamplingParams(max_new_tokens=n), drafter="d")
                          for p, n in ((PROMPTS[0], 2), (PROMPTS[1], 12), (PROMPTS[2], 4)))
    first = rig.scheduler.next_rounds(rig.clock.now_ns())
    assert [c.request_id for c in first[0].verify] == [short, long_]
    assert rig.scheduler.load().waiting == 1 and rig.scheduler.group_of(late) is None
    rig.scheduler.on_round_done(rig.executor.run_rounds(first)[0], rig.clock.now_ns())
    finished = rig.scheduler.drain_finished()
    assert [o.request_id for o in finished] == [short]  # 2 tokens in one round (1 draft + bonus)
    admitted_at = rig.clock.now_ns()
    second = rig.scheduler.next_rounds(admitted_at)
    assert [c.request_id for c in second[0].verify] == [long_, late]
    rig.scheduler.on_round_done(rig.executor.run_rounds(second)[0], rig.clock.now_ns())
    done = run_all(rig.driver)
    assert done[late].stats.queue_ns == admitted_at > 0
    assert done[late].token_ids == expected(PROMPTS[2], SamplingParams(max_new_tokens=4))


# ---- windows --------------------------------------------------------------------------------
def test_windows_follow_policy_budget_and_client_cap():
    rig = make_rig(window=5, batch=5)
    a = rig.driver.submit([1, 2], SamplingParams(max_new_tokens=30), drafter="d")
    b = rig.driver.submit([3, 4], SamplingParams(max_new_tokens=3), drafter="d")  # budget: 2 drafts
    c = rig.driver.submit([5, 6], SamplingParams(max_new_tokens=30), drafter="d", max_draft_length=1)
    d = rig.driver.submit([7, 8], SamplingParams(max_new_tokens=30), drafter="d", max_draft_length=0)
    e = rig.driver.submit([9, 10], SamplingParams(max_new_tokens=30))  # no drafter: plain decoding
    plan = rig.scheduler.next_rounds(0)[0]
    windows = {call.request_id: call.num_draft_tokens for call in plan.drafts["d"]}
    assert windows == {a: 5, b: 2, c: 1}
    undrafted = {call.request_id for call in plan.verify if call.proposal is not None}
    assert undrafted == {d, e}
    # The first call carries the whole prompt, from position 0.
    assert all(call.position == 0 and call.new_tokens == rig.scheduler._by_id[call.request_id].prompt
               for call in plan.drafts["d"])


# ---- the stop rule ---------------------------------------------------------------------------
def test_stop_string_inside_an_accepted_window_cuts_it_there():
    free = expected([1, 2, 3], SamplingParams(max_new_tokens=20))
    stop = letters(free[3:5])  # completes at generated token 4 (or earlier), mid-window
    sampling = SamplingParams(max_new_tokens=20, stop=(stop,))
    want = expected([1, 2, 3], sampling, decode=letters)
    assert len(want) < 20
    rig = make_rig(window=8, wrong_at=lambda rid, k: False, decode=letters)
    rid = rig.driver.submit([1, 2, 3], sampling, drafter="d")
    done = run_all(rig.driver)
    assert done[rid].finish_reason == FinishReason.STOP
    assert done[rid].token_ids == want
    # The verifier emitted the whole accepted window; the scheduler committed up to the stop.
    assert done[rid].stats.emitted == len(want) < 9


def test_eos_inside_a_window_ends_the_request():
    free = expected([4, 5], SamplingParams(max_new_tokens=20))
    eos = free[6]
    want = expected([4, 5], SamplingParams(max_new_tokens=20), eos_token_ids=[eos])
    rig = make_rig(window=4, wrong_at=lambda rid, k: False, eos=[eos])
    rid = rig.driver.submit([4, 5], SamplingParams(max_new_tokens=20), drafter="d")
    done = run_all(rig.driver)
    assert done[rid].token_ids == want and want[-1] == eos
    assert done[rid].finish_reason == FinishReason.EOS


# ---- cancel ----------------------------------------------------------------------------------
def test_cancel_mid_round_drops_its_reply_and_spares_the_others():
    rig = make_rig()
    a = rig.driver.submit(PROMPTS[0], SamplingParams(max_new_tokens=20), drafter="d")
    b = rig.driver.submit(PROMPTS[1], SamplingParams(max_new_tokens=20), drafter="d")
    rig.driver.step()
    before = rig.scheduler.generated(a)
    plans = rig.scheduler.next_rounds(rig.clock.now_ns())
    outcomes = rig.executor.run_rounds(plans)  # the round is in flight...
    assert rig.scheduler.cancel(a, rig.clock.now_ns())  # ...when the client goes away
    rig.scheduler.on_round_done(outcomes[0], rig.clock.now_ns())
    cancelled = rig.scheduler.drain_finished()
    assert [(o.request_id, o.finish_reason) for o in cancelled] == [(a, FinishReason.CANCELLED)]
    assert cancelled[0].token_ids == before  # nothing of the in-flight round
    work = rig.scheduler.take_housekeeping()
    assert work.verifier_releases == {0: [a]} and work.drafter_releases == {"d": [a]}
    assert work.observed == []  # a cancelled output teaches drafters nothing
    rig.executor.housekeeping(work)
    done = run_all(rig.driver)
    assert done[b].token_ids == expected(PROMPTS[1], SamplingParams(max_new_tokens=20))
    assert not rig.scheduler.cancel(a, rig.clock.now_ns())  # already gone


def test_cancel_of_a_queued_request_never_reaches_a_worker():
    rig = make_rig(batch=1)
    a = rig.driver.submit(PROMPTS[0], SamplingParams(max_new_tokens=5), drafter="d")
    b = rig.driver.submit(PROMPTS[1], SamplingParams(max_new_tokens=5), drafter="d")
    assert rig.driver.cancel(b)
    done = run_all(rig.driver)
    assert list(done) == [a]
    assert all(call.request_id != b for plan in rig.executor.plans for call in plan.verify)


# ---- failures --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(FailureKind))
def test_failed_draft_call_verifies_without_drafts_then_resends_whole(kind):
    rig = make_rig(wrong_at=lambda rid, k: False)
    ids = [rig.driver.submit(p, SamplingParams(max_new_tokens=16), drafter="d") for p in PROMPTS[:2]]
    rig.driver.step()
    rig.executor.fail_draft["d"] = kind
    rounds_before = {rid: rig.scheduler._by_id[rid].stats.rounds for rid in ids}
    emitted_before = {rid: len(rig.scheduler.generated(rid)) for rid in ids}
    rig.driver.step()
    for rid in ids:  # the round went on: one plain step each
        assert rig.scheduler._by_id[rid].stats.rounds == rounds_before[rid] + 1
        assert len(rig.scheduler.generated(rid)) == emitted_before[rid] + 1
    rig.driver.step()
    for call in rig.drafters["d"].calls[-1]:  # re-sent whole, as of the round before
        req = rig.scheduler._by_id[call.request_id]
        assert call.position == 0
        assert call.new_tokens == req.prompt + req.generated[: emitted_before[call.request_id] + 1]
    done = run_all(rig.driver)
    assert [done[r].token_ids for r in ids] == [expected(p, SamplingParams(max_new_tokens=16))
                                                for p in PROMPTS[:2]]
    assert rig.scheduler.stats.draft_failures["d"] == 1


def test_drafter_that_lost_state_silently_is_resynced_by_its_unknown_reply():
    rig = make_rig(wrong_at=lambda rid, k: False)
    rid = rig.driver.submit(PROMPTS[3], SamplingParams(max_new_tokens=24), drafter="d")
    rig.driver.step()
    rig.drafters["d"].lose_state()  # restarted behind the scheduler's back
    done = run_all(rig.driver)
    assert done[rid].token_ids == expected(PROMPTS[3], SamplingParams(max_new_tokens=24))
    positions = [call.position for calls in rig.drafters["d"].calls for call in calls]
    assert positions[1] > 0 and positions[2] == 0  # unknown → re-sent whole


@pytest.mark.parametrize("kind", list(FailureKind))
def test_failed_verify_commits_nothing_and_resumes_from_committed_tokens(kind):
    rig = make_rig()
    sampling = SamplingParams(max_new_tokens=20)
    ids = [rig.driver.submit(p, sampling, drafter="d") for p in PROMPTS]
    rig.driver.step()
    rig.driver.step()
    committed = {rid: rig.scheduler.generated(rid) for rid in ids}
    rig.executor.fail_verify[0] = kind
    assert rig.driver.step() == []
    assert {rid: rig.scheduler.generated(rid) for rid in ids} == committed
    rig.driver.step()
    for call in rig.verifiers[0].calls[-1]:  # re-sent whole: prompt + every committed token
        req = rig.scheduler._by_id[call.request_id]
        assert call.position == 0 and call.new_tokens == req.prompt + committed[call.request_id]
    done = run_all(rig.driver)
    assert [done[r].token_ids for r in ids] == [expected(p, sampling) for p in PROMPTS]
    assert rig.scheduler.stats.verify_failures[0] == 1


# ---- verifier groups ----------------------------------------------------------------------------
def test_requests_spread_over_groups_least_loaded_and_a_failure_stays_in_its_group():
    rig = make_rig(groups=2, batch=2)
    sampling = SamplingParams(max_new_tokens=20)
    ids = [rig.driver.submit(p, sampling, drafter="d") for p in PROMPTS]
    rig.driver.step()
    assert [rig.driver.group_of(r) for r in ids] == [0, 1, 0, 1]
    assert sorted(p.group for p in rig.executor.plans) == [0, 1]  # both groups ran a round
    rig.executor.fail_verify[1] = FailureKind.LOST
    rig.driver.step()
    rig.driver.step()
    group0 = rig.verifiers[0].calls[-1]
    group1 = rig.verifiers[1].calls[-1]
    assert all(call.position > 0 for call in group0)  # untouched
    assert all(call.position == 0 for call in group1)  # resumed from committed tokens
    done = run_all(rig.driver)
    assert [done[r].token_ids for r in ids] == [expected(p, sampling) for p in PROMPTS]
    assert [done[r].stats.verifier_group for r in ids] == [0, 1, 0, 1]
    per_group = rig.scheduler.stats.per_group
    assert per_group[0].emitted == per_group[1].emitted == 40
    load = rig.scheduler.load()
    assert [g.running for g in load.groups] == [0, 0]


def test_a_new_request_goes_to_the_least_loaded_group():
    rig = make_rig(groups=2, batch=4)
    long_ = [rig.driver.submit(p, SamplingParams(max_new_tokens=40), drafter="d") for p in PROMPTS[:3]]
    rig.driver.step()
    assert [rig.driver.group_of(r) for r in long_] == [0, 1, 0]
    late = rig.driver.submit([11, 12], SamplingParams(max_new_tokens=4), drafter="d")
    rig.driver.step()
    assert rig.driver.group_of(late) == 1


# ---- time -----------------------------------------------------------------------------------------
def test_time_comes_from_the_clock_it_is_given():
    rig = make_rig()
    rig.clock.advance(5_000)
    rid = rig.driver.submit([1, 2], SamplingParams(max_new_tokens=8), drafter="d")
    rig.clock.advance(2_000)  # queued for 2 µs
    done = run_all(rig.driver)
    stats = done[rid].stats
    assert stats.queue_ns == 2_000
    # The first round drafted 3 tokens (1 µs each) and verified (10 µs).
    assert stats.first_token_ns == 2_000 + 3 * 1_000 + 10_000


# ---- exactness under any schedule -----------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 49), min_size=1, max_size=6), min_size=1, max_size=6),
    budgets=st.lists(st.integers(1, 25), min_size=6, max_size=6),
    window=st.integers(0, 6),
    groups=st.integers(1, 3),
    batch=st.integers(1, 4),
    wrong=st.sets(st.integers(0, 5)),
    failures=st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["draft", "verify"]),
                                st.sampled_from(list(FailureKind))), max_size=4),
)
def test_output_is_plain_decoding_whatever_the_schedule(prompts, budgets, window, groups, batch, wrong,
                                                         failures):
    rig = make_rig(groups=groups, batch=batch, window=window, wrong_at=lambda rid, k: k in wrong)
    samplings = [SamplingParams(max_new_tokens=b) for b in budgets[: len(prompts)]]
    ids = [rig.driver.submit(p, s, drafter="d" if i % 2 == 0 else None)
           for i, (p, s) in enumerate(zip(prompts, samplings))]
    done, step = {}, 0
    while rig.driver.has_work:
        for at, where, kind in failures:
            if at == step:
                if where == "draft":
                    rig.executor.fail_draft["d"] = kind
                else:
                    rig.executor.fail_verify[step % groups] = kind
        done.update((o.request_id, o) for o in rig.driver.step())
        step += 1
        assert step < 500
    assert [done[r].token_ids for r in ids] == [expected(p, s) for p, s in zip(prompts, samplings)]
