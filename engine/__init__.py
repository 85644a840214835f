"""The in-process speculative engine: the draft → verify → accept loop over a batch.

The distributed runtime drives the same mechanism through actor handles; policy
(which drafter, how long a window) lives in ``specfleet.policy`` and is swappable."""
