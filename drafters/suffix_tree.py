"""Suffix drafter (SuffixDecoding-style): propose continuations of the longest
suffix of the committed sequence seen before, in this request or in earlier ones.

Where it sits: the engine (in-process) or a drafter Ray actor on a plain CPU node
calls ``propose`` once per speculation round with each request's committed-token
delta, and ``observe_output`` with every finished request's full sequence; the
verifier then checks the proposals. No model, no weights: it pays off on agentic and
templated traffic where requests repeat themselves and each other.

Two tries, same structure (``_SuffixTrie``):
- one per request, over its prompt + committed tokens, updated incrementally and
  rolled back with it (``DraftRequest.position`` truncation, ``rollback``);
- one global trie over finished requests' sequences fed by ``observe_output``, bounded
  to ``max_global_tokens`` tokens: the oldest sequences are evicted first (FIFO).

To propose, each trie yields its longest match: the longest suffix of the committed
sequence that occurred before and was continued there, capped at
``max_depth - window`` tokens so the tries still count the continuation. The longer
match wins (a longer context predicts better); at equal length the one
with more observed continuations; at a full tie the request's own trie. From the
match the proposal grows best-first by path probability — the product of
child_count / continuations_of_parent along the path — taking each node's
``tree_width`` most frequent children, until ``request.num_draft_tokens`` (capped at
``max_draft_tokens``) nodes are taken or the best path probability left falls below
``min_probability``. So proposals are long on predictable continuations and short
on ambiguous ones (SuffixDecoding's adaptive speculation length); ``tree_width=1``
gives a chain.

Confidences: ``confidences[i]`` is node i's conditional probability given its
parent — the empirical child_count / continuations_of_parent — which is what the
model drafter reports (``q(token)``) and the n-gram drafter estimates, so a router
can fuse them; the probability that node i is accepted is the product along its
path. Proposals are deterministic (``draft_probs`` is None).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from specfleet.core.types import ROOT, DraftProposal, DraftRequest
from specfleet.drafters.base import Drafter


class _Node:
    """A trie node: a token path of length ``depth`` and the number of windows
    (see ``_SuffixTrie``) that pass through it.

    Materialised (``children`` is a dict) when the path occurred at least twice, or
    for the root. A *tail* (``children is None``) when it occurred exactly once:
    then ``seq[pos]`` is the token after the path in that one occurrence and the rest
    of the (unique) continuation is read from ``seq`` on demand instead of being
    stored as a chain of count-1 nodes. Most windows of real text are unique after a
    few tokens, so this keeps memory near a few nodes per token instead of one per
    token per depth level (the saving a compressed suffix tree gives). A materialised
    node keeps (seq, pos) of the occurrence that will be removed last, so they are
    exact again the moment its count falls back to 1 and it turns back into a tail.
    """

    __slots__ = ("count", "cont", "children", "top", "link", "depth", "seq", "pos")

    def __init__(self, depth: int, count: int = 0, seq: list[int] | None = None, pos: int = 0):
        self.count = count  # windows passing through this node
        self.cont = 0  # sum of the children's counts: occurrences that continued
        self.children: dict[int, _Node] | None = None
        # Materialised only: token of the most frequent child, None when unknown. Kept up
        # on increments, dropped when that child loses a count, recomputed on demand:
        # nodes near the root have thousands of children and proposing walks them every
        # round, while counts change by one token per window.
        self.top: int | None = None
        self.link: _Node | None = None  # materialised only: the node of path[1:]
        self.depth = depth
        self.seq = seq  # the sequence holding its (tail: only) occurrence
        self.pos = pos  # index in seq of the token after this path in that occurrence


class _SuffixTrie:
    """A bounded-depth suffix trie with occurrence counts.

    Holds every *window* ``seq[s : min(s + max_depth, len(seq))]`` of every sequence
    put into it; a node's count is the number of windows having its path as a prefix,
    i.e. the number of occurrences of that path (of length <= max_depth). The counts
    give empirical next-token probabilities for any context up to max_depth tokens.

    Why not a full (Ukkonen) suffix tree: it is append-only. Here a request's trie must
    also shrink (rollback of speculative or stop-cut tokens) and the global trie must
    evict whole old sequences; with a bounded depth every update is a bounded walk with
    exact per-node counts, and removal is the mirror of insertion. Count-1 subtrees are
    kept as *tails* pointing into the sequence (see ``_Node``), which buys most of a
    compressed tree's memory saving without its edge-splitting/merging bookkeeping.
    Worst case (every window repeated) is still ``tokens × max_depth`` nodes.

    Updates:
    - ``append`` extends all windows ending at the sequence end by one token. Only
      materialised suffix nodes need touching (unique ones are tails that grow by
      themselves, since they read the live sequence); they are found from the deepest
      one by suffix links, so a token costs O(length of the longest repeated suffix).
    - ``pop`` is the exact inverse of the last ``append`` (per-request rollback).
    - ``remove_sequence`` removes all windows of one sequence (global FIFO eviction).
    """

    def __init__(self, max_depth: int, fifo: bool = False):
        self.max_depth = max_depth
        # Which occurrence a materialised node remembers: the one removed last. A
        # request's trie shrinks from the end (rollback), so its oldest occurrence is
        # removed last; the global trie evicts whole sequences oldest first, so there
        # the newest one is.
        self.fifo = fifo
        self.root = _Node(0)
        self.root.children = {}
        self.num_nodes = 1  # explicit nodes, for memory accounting and tests

    def tail_length(self, node: _Node) -> int:
        """How many tokens of a tail's unique continuation lie within the depth bound."""
        end = min(node.pos - node.depth + self.max_depth, len(node.seq))
        return max(0, end - node.pos)

    # ---------------------------------------------------------------- updates

    def append(self, seq: list[int], top: _Node, token: int) -> _Node:
        """Append ``token`` to ``seq`` and add it to every window ending there.

        ``top`` is the deepest materialised node whose path is a suffix of ``seq``
        (root for an empty one); returns the same for the extended sequence.
        """
        seq.append(token)
        end = len(seq)
        u = top if top.depth < self.max_depth else top.link
        chain = []
        while u is not None:
            chain.append(u)
            u = u.link
        deepest = self.root
        # Shortest suffix first: a node materialised here takes as suffix link the
        # child of its parent's link, which this loop has already brought up to date.
        for u in reversed(chain):
            u.cont += 1
            child = u.children.get(token)
            if child is None:
                # First occurrence of this path: a tail whose continuation will be
                # whatever gets appended to seq next. (Every longer suffix is new too.)
                u.children[token] = _Node(u.depth + 1, 1, seq, end)
                if u.cont == 1:
                    u.top = token
                self.num_nodes += 1
                continue
            if child.children is None:  # a tail seen a second time: materialise it
                self._split(child)
                child.link = self.root if u is self.root else u.link.children[token]
            child.count += 1
            if u.top is not None and child.count > u.children[u.top].count:
                u.top = token
            if self.fifo:
                child.seq, child.pos = seq, end
            deepest = child
        return deepest

    def _split(self, node: _Node) -> None:
        """Turn a tail into a materialised node holding its one occurrence."""
        seq, pos = node.seq, node.pos
        node.children = {}
        node.cont = 0
        node.top = None
        if pos < min(pos - node.depth + self.max_depth, len(seq)):
            node.children[seq[pos]] = _Node(node.depth + 1, 1, seq, pos + 1)
            node.cont = 1
            node.top = seq[pos]
            self.num_nodes += 1

    def _merge(self, node: _Node) -> None:
        """Turn a materialised node whose count fell to 1 back into a tail: (seq, pos)
        already point at the remaining occurrence, whose continuation is at most the
        single (tail) child being dropped."""
        self.num_nodes -= len(node.children)
        node.children = None
        node.cont = 0
        node.link = None

    def pop(self, seq: list[int], top: _Node) -> None:
        """Undo the last ``append`` to ``seq``. ``top`` is what ``append`` was given
        then: the deepest materialised suffix node of ``seq[:-1]``."""
        token = seq[-1]
        u = top if top.depth < self.max_depth else top.link
        # Deepest first: a node merged back into a tail drops its children, and when the
        # sequence repeats the token one of them is also on this chain: settle it first.
        while u is not None:
            child = u.children[token]
            child.count -= 1
            u.cont -= 1
            if u.top == token:
                u.top = None
            if child.count == 0:
                del u.children[token]
                self.num_nodes -= 1
            elif child.count == 1 and child.children is not None:
                self._merge(child)
            u = u.link
        seq.pop()

    def remove_sequence(self, seq: list[int]) -> None:
        """Remove every window of ``seq`` (which must have been appended whole).

        Windows go in order of their start, so every path keeps at least the count of
        any path extending it on the left, as the suffix links need.
        """
        max_depth = self.max_depth
        length = len(seq)
        for start in range(length):
            stop = min(start + max_depth, length)
            path = []
            u = self.root
            for i in range(start, stop):
                token = seq[i]
                child = u.children[token]
                path.append((u, token, child))
                if child.children is None:  # a tail: the rest of the window lies in it
                    break
                u = child
            for u, token, child in path:
                child.count -= 1
                u.cont -= 1
                if u.top == token:
                    u.top = None
            for u, token, child in reversed(path):
                if child.count == 0:
                    del u.children[token]
                    self.num_nodes -= 1
                elif child.count == 1 and child.children is not None:
                    self._merge(child)

    # ---------------------------------------------------------------- queries

    def locate(self, tokens: list[int], start: int) -> tuple[_Node, int] | None:
        """The trie position of ``tokens[start:]``: (node, 0) for a materialised node,
        (tail, k) for k tokens into a tail's continuation; None if absent."""
        node = self.root
        i, end = start, len(tokens)
        while i < end:
            child = node.children.get(tokens[i])
            if child is None:
                return None
            i += 1
            if child.children is None:
                rest = end - i
                if rest > self.tail_length(child):
                    return None
                if child.seq[child.pos : child.pos + rest] != tokens[i:end]:
                    return None
                return child, rest
            node = child
        return node, 0

    def continuations(self, node: _Node, k: int) -> int:
        """How many observed occurrences continue from a position."""
        if node.children is not None:
            return node.cont
        return 1 if k < self.tail_length(node) else 0

    def next_tokens(self, node: _Node, k: int, width: int) -> list[tuple[int, float, _Node, int]]:
        """The ``width`` most frequent continuations of a position:
        (token, conditional probability, node, k) for each."""
        children = node.children
        if children is not None:
            if not node.cont:
                return []
            if width == 1:
                token = node.top
                if token is None:
                    token = node.top = max(children.items(), key=_count_of)[0]
                best = [(token, children[token])]
            else:
                best = heapq.nlargest(width, children.items(), key=_count_of)
            return [(token, child.count / node.cont, child, 0) for token, child in best]
        if k < self.tail_length(node):
            return [(node.seq[node.pos + k], 1.0, node, k + 1)]
        return []


def _count_of(item: tuple[int, _Node]) -> int:
    return item[1].count


@dataclass
class _RequestState:
    trie: _SuffixTrie
    tokens: list[int] = field(default_factory=list)  # the committed sequence
    # tops[i]: deepest materialised node of ``trie`` whose path is a suffix of
    # tokens[: i + 1] — what ``append`` returned; ``pop`` needs tops[i - 1].
    tops: list[_Node] = field(default_factory=list)

    def top(self) -> _Node:
        return self.tops[-1] if self.tops else self.trie.root

    def append(self, token: int) -> None:
        self.tops.append(self.trie.append(self.tokens, self.top(), token))

    def truncate(self, length: int) -> None:
        while len(self.tokens) > length:
            self.tops.pop()
            self.trie.pop(self.tokens, self.top())


class SuffixTreeDrafter(Drafter):
    """SuffixDecoding-style drafter over a per-request and a global suffix trie.

    ``max_depth``: the longest context + continuation the tries count (memory grows
    with it in the worst case). ``min_probability``: stop extending once the best
    remaining path probability is below it. ``max_global_tokens``: tokens of finished
    sequences the global trie holds; the oldest sequences are evicted first, a longer
    single sequence keeps only its last ``max_global_tokens`` tokens, 0 disables the
    global trie. ``tree_width``: children considered per node (1 = chains).

    Memory: a trie node takes about 250 bytes. Measured on Python source text (word
    tokens), the global trie holds ~2.7 nodes per token (500k tokens: 1.3M nodes,
    ~320 MB); a 1000-token request's trie ~2.5k nodes. The bound is
    ``max_global_tokens × max_depth`` nodes, reached only if every window repeats.
    Not thread-safe: one actor (or engine) calls it at a time.
    """

    can_sample = False

    def __init__(
        self,
        name: str = "suffix",
        max_depth: int = 32,
        min_probability: float = 0.1,
        max_draft_tokens: int = 8,
        max_global_tokens: int = 200_000,
        tree_width: int = 1,
    ):
        if max_depth < 2:
            raise ValueError(f"max_depth: must be >= 2, got {max_depth}")
        if not 0.0 <= min_probability <= 1.0:
            raise ValueError(f"min_probability: must be in [0, 1], got {min_probability}")
        if max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens: must be >= 1, got {max_draft_tokens}")
        if max_global_tokens < 0:
            raise ValueError(f"max_global_tokens: must be >= 0, got {max_global_tokens}")
        if tree_width < 1:
            raise ValueError(f"tree_width: must be >= 1, got {tree_width}")
        self.name = name
        self.max_depth = max_depth
        self.min_probability = min_probability
        self.max_draft_tokens = max_draft_tokens
        self.max_global_tokens = max_global_tokens
        self.tree_width = tree_width
        self._requests: dict[str, _RequestState] = {}
        self._global = _SuffixTrie(max_depth, fifo=True)
        self._global_sequences: deque[list[int]] = deque()  # FIFO, oldest first
        self._global_tokens = 0

    # ------------------------------------------------------------------ Drafter API

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        proposals = []
        for req in requests:
            state = self._catch_up(req)
            window = min(req.num_draft_tokens, self.max_draft_tokens)
            tokens, parents, confidences = (
                self._draft(state, window) if window > 0 else ([], [], [])
            )
            proposals.append(
                DraftProposal(
                    request_id=req.request_id,
                    tokens=tokens,
                    parents=parents,
                    confidences=confidences,
                    draft_probs=None,
                    drafter=self.name,
                )
            )
        return proposals

    def rollback(self, request_id: str, length: int) -> None:
        if length < 0:
            raise ValueError(f"{self.name}: rollback of {request_id!r} to negative length {length}")
        state = self._requests.get(request_id)
        if state is not None:  # unknown request: nothing held, nothing to forget
            state.truncate(length)

    def release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def observe_output(self, tokens: Sequence[int]) -> None:
        if self.max_global_tokens == 0:
            return
        tokens = [int(t) for t in tokens[-self.max_global_tokens :]]
        if not tokens:
            return
        while self._global_tokens + len(tokens) > self.max_global_tokens:
            oldest = self._global_sequences.popleft()
            self._global.remove_sequence(oldest)
            self._global_tokens -= len(oldest)
        seq: list[int] = []  # grows token by token, so tails read it as it is built
        top = self._global.root
        for token in tokens:
            top = self._global.append(seq, top, token)
        self._global_sequences.append(seq)
        self._global_tokens += len(seq)

    # ------------------------------------------------------------------ stats

    def held_tokens(self, request_id: str) -> int:
        """Committed tokens held for ``request_id`` (0 if unknown)."""
        state = self._requests.get(request_id)
        return len(state.tokens) if state is not None else 0

    @property
    def global_tokens(self) -> int:
        """Tokens of finished sequences currently in the global trie."""
        return self._global_tokens

    @property
    def global_nodes(self) -> int:
        """Explicit nodes of the global trie (about 250 bytes each)."""
        return self._global.num_nodes

    # ------------------------------------------------------------------ internals

    def _catch_up(self, req: DraftRequest) -> _RequestState:
        state = self._requests.get(req.request_id)
        held = len(state.tokens) if state is not None else 0
        if req.position > held or req.position < 0:
            # The engine believes this drafter holds more than it does: proposing from
            # a wrong context would only waste verifier time and hide an engine bug.
            raise ValueError(
                f"{self.name}: request {req.request_id!r} starts at position {req.position} "
                f"but this drafter holds {held} tokens for it"
            )
        if state is None:
            state = self._requests[req.request_id] = _RequestState(_SuffixTrie(self.max_depth))
        state.truncate(req.position)
        for token in req.new_tokens:
            state.append(int(token))
        return state

    def _draft(self, state: _RequestState, window: int) -> tuple[list[int], list[int], list[float]]:
        tokens = state.tokens
        # Cap the match so that match + window fits the depth the tries count.
        max_match = max(1, self.max_depth - window)

        # The request's trie contains the current sequence itself, so a suffix that
        # occurred before has count >= 2 and is materialised: the longest one is on the
        # suffix-link chain of the last top, and (being shorter than max_depth) each of
        # its earlier occurrences was continued.
        best: tuple[int, int] = (0, 0)  # (match length, continuations)
        trie, position = state.trie, None
        node = state.top()
        while node.depth > max_match:
            node = node.link
        if node.depth > 0 and node.cont > 0:
            best, position = (node.depth, node.cont), (node, 0)

        if self._global_tokens:
            # Longest first; stop at the request's match length (a shorter one cannot win).
            for length in range(min(max_match, len(tokens)), max(best[0], 1) - 1, -1):
                found = self._global.locate(tokens, len(tokens) - length)
                if found is None:
                    continue
                cont = self._global.continuations(*found)
                if cont == 0:  # matched, but every occurrence ended there
                    continue
                if (length, cont) > best:
                    best, trie, position = (length, cont), self._global, found
                break
        if position is None:
            return [], [], []
        return self._grow(trie, position, window)

    def _grow(
        self, trie: _SuffixTrie, position: tuple[_Node, int], budget: int
    ) -> tuple[list[int], list[int], list[float]]:
        """Best-first by path probability from the matched position. Path probability
        never increases going down, so parents are taken before their children and the
        first candidate below ``min_probability`` ends the search."""
        out_tokens: list[int] = []
        parents: list[int] = []
        confidences: list[float] = []
        order = 0  # heap tie-break: equal probabilities in discovery order
        heap: list[tuple[float, int, int, int, float, _Node, int]] = []
        for token, prob, node, k in trie.next_tokens(*position, self.tree_width):
            heapq.heappush(heap, (-prob, order, ROOT, token, prob, node, k))
            order += 1
        while heap and len(out_tokens) < budget:
            neg_path, _, parent, token, prob, node, k = heapq.heappop(heap)
            if -neg_path < self.min_probability:
                break
            index = len(out_tokens)
            out_tokens.append(token)
            parents.append(parent)
            confidences.append(prob)
            for token2, prob2, node2, k2 in trie.next_tokens(node, k, self.tree_width):
                heapq.heappush(heap, (neg_path * prob2, order, index, token2, prob2, node2, k2))
                order += 1
        return out_tokens, parents, confidences
