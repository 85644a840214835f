"""Test rigs shipped with the package: tiny configs and random checkpoints, fake
drafter/verifier factories for Ray tests, a throwaway loopback sshd for ``ray up``.

Where it sits: outside every request's path. Tests, the overhead benchmark and
local deployment rehearsals import it; nothing in the serving path does.
"""
