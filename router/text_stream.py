"""Incremental detokenization for streamed responses: emit only text that is final.

Where it sits: the gRPC servicer (``servicer.py``) feeds every chunk of committed
tokens to one ``TextStream`` per request and sends back what ``push`` returns; the
unary Generate uses the same object, so a stream's concatenated text always equals
the unary text for the same tokens.

Two things make naive per-chunk decoding wrong:

- A character can span several tokens (byte-level BPE splits "é" or an emoji into
  byte tokens). Decoding a prefix then ends in U+FFFD; such text is held back until
  the character is complete. Segments are decoded from a *prefix offset* (TGI/vLLM
  style) so tokenizers that treat a segment's first token specially (SentencePiece's
  leading space) produce the same text as decoding everything at once.
- A stop sequence must never reach the client, even partly: text that could be the
  beginning of a stop string is held back until it is known not to be one, and the
  visible text is cut before the first stop string (``StopChecker.visible_text``'s
  rule; the backend has already cut the *token* stream after the stop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 sequence produces


class TextStream:
    """``push(tokens) -> new stable text``; ``finish() -> the rest``. One per request."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix = 0  # decoding restarts here (a boundary of already-final text)
        self._read = 0  # ids[:_read] are rendered in _text
        self._text = ""  # final text of ids[:_read]
        self._emitted = 0  # characters of visible text handed out
        self._stopped = False  # a stop string was found: nothing after it is visible

    @property
    def text(self) -> str:
        """Everything handed out so far."""
        return self._visible()[: self._emitted]

    def push(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self._text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The request ended: flush everything, incomplete characters included."""
        if self._read < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix : self._read])
            new_text = self._decode(self._ids[self._prefix :])
            self._text += new_text[len(prefix_text) :]
            self._prefix = self._read = len(self._ids)
        return self._release(final=True)

    def _visible(self) -> str:
        cuts = [i for i in (self._text.find(s) for s in self._stop) if i >= 0]
        if cuts:
            self._stopped = True
            return self._text[: min(cuts)]
        return self._text

    def _release(self, final: bool) -> str:
        visible = self._visible()
        end = len(visible)
        if not final and not self._stopped:
            end -= self._pending_stop_prefix(visible)
        if end <= self._emitted:
            return ""
        delta = visible[self._emitted : end]
        self._emitted = end
        return delta

    def _pending_stop_prefix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            # Candidates start where the stop's first character occurs in the last
            # len(stop)-1 characters; the earliest match is the longest (found with
            # str.find, so a long stop list costs microseconds per chunk on the loop).
            window = text[len(text) - min(len(stop) - 1, len(text)):]
            i = window.find(stop[0])
            while 0 <= i < len(window) - longest:
                if stop.startswith(window[i:]):
                    longest = len(window) - i
                    break
                i = window.find(stop[0], i + 1)
        return longest
