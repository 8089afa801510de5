"""Tornado IOStreams that cost less memory per open connection (re-check on every Tornado
upgrade; tests/test_lean_streams.py covers it).

Each IOStream holds two collections.deque (its pending write futures, its write buffer's
pieces).  A deque allocates a 64-slot block when created, about 600 bytes, and a stream's
queues hold 0-2 items almost always: four per chat stream (the client's connection and
the upstream's) were a tenth of what an open stream costs (bench/scale.py).  A list with
popleft() does the same job for queues that short.
"""

from tornado.iostream import IOStream


class ShortQueue(list):
    """The part of collections.deque's interface IOStream uses, for queues of a few items
    (popleft is O(n))."""

    __slots__ = ()

    def popleft(self):  # type: ignore[no-untyped-def]
        return self.pop(0)


def lighten(stream: IOStream) -> IOStream:
    """Swap *stream*'s deques for ShortQueues; call it before the stream is written to."""
    if not stream._write_futures and not stream._write_buffer._buffers:  # type: ignore[attr-defined]
        stream._write_futures = ShortQueue()  # type: ignore[attr-defined]
        stream._write_buffer._buffers = ShortQueue()  # type: ignore[attr-defined]
    return stream
