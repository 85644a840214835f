"""Capacity planning: SpecFleet's own scheduler and policies on a simulated clock.

Where it sits: outside any request path. ``simulator.Simulator`` is a heapq event
loop that drives the real ``engine/scheduler.py`` ``Scheduler`` (and through it the
real ``policy/`` router and window policies), telling it the simulated time with
every event. Rounds run on simulated workers (``workers.py``) that answer the same
contracts as real ones (``core/workers.py``); how long a call takes comes from a
step-time model (``step_time.py``: fitted from ``specfleet profile`` or a GPU
roofline), how many drafts are accepted from acceptance curves (``acceptance.py``).
This package imports ``engine/scheduler.py``, ``policy/`` and ``core/`` only —
never torch, Ray, ``cluster/`` or ``router/`` (tests/unit/test_import_direction.py).
"""
