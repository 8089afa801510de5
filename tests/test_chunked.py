"""upstreams/chunked.py: the chunked transfer coding decoded a buffer at a time."""

import random

import pytest
from tornado.httputil import HTTPInputError

from upstreams.chunked import ChunkDecoder


def chunked(pieces: list[bytes], extension: bytes = b"") -> bytes:
    return b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in pieces) + b"0\r\n\r\n"


def decode(data: bytes, cuts: list[int], max_size: int = 1 << 20) -> tuple[bytes, ChunkDecoder]:
    decoder = ChunkDecoder(max_size)
    out, last = [], 0
    for cut in cuts + [len(data)]:
        out.append(decoder.feed(data[last:cut]))
        last = cut
    return b"".join(out), decoder


def test_every_split_gives_the_same_body_and_its_end():
    rng = random.Random(3)
    pieces = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))) for _ in range(30)]
    data = chunked(pieces, b";ext=1")
    for cuts in ([], list(range(1, len(data))), sorted(rng.sample(range(1, len(data)), 25))):
        body, decoder = decode(data, cuts)
        assert body == b"".join(pieces)
        assert decoder.ended and not decoder.stray


def test_what_a_feed_carries_is_handed_over_at_once():
    decoder = ChunkDecoder(100)
    assert decoder.feed(b"5\r\nab") == b"ab"  # part of a chunk: its bytes now
    assert decoder.feed(b"cde\r") == b"cde"
    assert decoder.feed(b"\n3\r\nxyz\r\n2\r\n") == b"xyz"
    assert not decoder.ended
    assert decoder.feed(b"") == b""


def test_the_end_and_bytes_after_it():
    body, decoder = decode(chunked([b"a"]) + b"HTTP/1.1 200", [])
    assert (body, decoder.ended, decoder.stray) == (b"a", True, True)
    body, decoder = decode(chunked([b"a"]), [len(chunked([b"a"])) - 1])  # "0\r\n\r" then "\n"
    assert (body, decoder.ended, decoder.stray) == (b"a", True, False)


@pytest.mark.parametrize("bad, message", [
    (b"zz\r\nabc\r\n", "invalid chunk size"),
    (b"3\r\nabcXY", "improperly terminated chunk"),
    (b"1" * 70, "invalid chunk size"),
    (b"0\r\nXY", "improperly terminated chunked request"),
    (b"-1\r\n", "invalid chunk size"),
    (b"0x10\r\n", "invalid chunk size"),
])
def test_bad_framing_is_an_error(bad, message):
    with pytest.raises(HTTPInputError, match=message):
        decode(bad, [])


def test_a_body_past_the_limit_is_refused_before_it_is_read():
    decoder = ChunkDecoder(10)
    assert decoder.feed(b"8\r\n12345678\r\n") == b"12345678"
    with pytest.raises(HTTPInputError, match="too large"):
        decoder.feed(b"3\r\n")
