"""Decisions, apart from mechanism: which drafter serves a request, how long a window.

Where it sits: the engine (``engine/engine.py``, also under the Ray runtime) calls
these policies at admission and after every round, passing the time (``now_ns``) and
a ``core.load.LoadSnapshot``; nothing here reads the wall clock or holds a worker, so
the same code runs against real actors, scripted fakes and a simulated clock. This
package imports only ``core/``. ``factory.build_policies`` is the one place a config
becomes policies, for every composition root.
"""
