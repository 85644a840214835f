"""Streamed text: only stable text is emitted, never part of a stop sequence, and the
pieces always join to exactly the text of the whole token sequence."""

from __future__ import annotations

import random

import pytest

from specfleet.router.text_stream import TextStream

TEXT = "naïve café → 東京 😀 ok\n\nend é"


def byte_decode(ids, skip_special_tokens=True):
    return bytes(ids).decode("utf-8", errors="replace")


def chunkings(ids, seed):
    rng = random.Random(seed)
    i = 0
    while i < len(ids):
        n = rng.randint(1, 4)
        yield ids[i : i + n]
        i += n


def run(stream: TextStream, chunks) -> list[str]:
    return [stream.push(c) for c in chunks] + [stream.finish()]


@pytest.mark.parametrize("seed", range(5))
def test_multibyte_characters_are_emitted_whole(seed):
    ids = list(TEXT.encode())
    pieces = run(TextStream(byte_decode), chunkings(ids, seed))
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)


def test_single_byte_tokens_hold_back_until_the_character_completes():
    s = TextStream(byte_decode)
    emoji = list("😀".encode())
    assert [s.push([b]) for b in emoji] == ["", "", "", "😀"]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("stop", ["\n\n", "東京", "😀 o", "end"])
def test_stop_text_never_emitted(seed, stop):
    ids = list(TEXT.encode())
    pieces = run(TextStream(byte_decode, [stop, "absent"]), chunkings(ids, seed))
    assert "".join(pieces) == TEXT[: TEXT.index(stop)]


def test_partial_stop_prefix_is_released_when_it_diverges():
    s = TextStream(byte_decode, ["abc"])
    assert s.push(list(b"xab")) == "x"  # "ab" might start "abc"
    assert s.push(list(b"d")) == "abd"
    assert s.finish() == ""


def test_incomplete_tail_is_flushed_at_the_end():
    s = TextStream(byte_decode)
    assert s.push(list("é".encode())[:1]) == ""
    assert s.finish() == "\ufffd"


def test_bpe_tokenizer_round_trip():
    """A real byte-level BPE: random token sequences (invalid UTF-8 included) stream to
    exactly what decoding them at once gives."""
    pytest.importorskip("tokenizers")
    from specfleet.zoo.tokenizer import train_tokenizer

    tok = train_tokenizer([TEXT * 20, "def f(x):\n    return x * 2\n" * 20], vocab_size=300)

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=True)

    rng = random.Random(0)
    for seed in range(20):
        ids = tok.encode(TEXT) if seed == 0 else [rng.randrange(len(tok)) for _ in range(40)]
        pieces = run(TextStream(decode), chunkings(ids, seed))
        assert "".join(pieces) == decode(ids)


def test_held_back_stop_prefix_equals_the_brute_force_rule():
    """The held-back suffix (found with str.find) is the longest suffix of the text
    that begins some stop string, as checking every length would find."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    def brute(text, stops):
        return max((n for s in stops for n in range(1, min(len(s) - 1, len(text)) + 1)
                    if s.startswith(text[-n:])), default=0)

    alphabet = st.sampled_from("abc")

    @settings(max_examples=300, derandomize=True, deadline=None)
    @given(st.text(alphabet, max_size=12), st.lists(st.text(alphabet, min_size=1, max_size=6), max_size=4))
    def check(text, stops):
        stream = TextStream(lambda ids: "", stops)
        assert stream._pending_stop_prefix(text) == brute(text, stream._stop)

    check()
