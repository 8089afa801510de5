"""A reply as it streams in from the upstream, and the token counts its done line carries."""

from typing import Any, Optional

import jsonfmt


class ReplyText:
    """A reply's text as it streams in.

    The hot path appends each token to `recent`; `compact()`, once per upstream chunk,
    joins every 8 of them into a block, since a str per token costs ~50 bytes of overhead
    (an open stream's largest item, bench/scale.py).  A block is merged with the blocks
    before it that are no longer than it, as a binary counter carries: a few dozen blocks
    for any reply, and each character copied a few times, not once per block.
    """

    __slots__ = ("recent", "blocks", "pieces")

    def __init__(self) -> None:
        self.recent: list[str] = []
        self.blocks: list[str] = []  # longest first
        self.pieces = 0  # tokens in blocks

    def compact(self) -> None:
        if len(self.recent) >= 8:
            self.pieces += len(self.recent)
            block = "".join(self.recent)
            self.recent.clear()
            blocks = self.blocks
            while blocks and len(blocks[-1]) <= len(block):
                block = blocks.pop() + block
            blocks.append(block)

    def __len__(self) -> int:
        return self.pieces + len(self.recent)

    def __str__(self) -> str:
        return "".join(self.blocks) + "".join(self.recent)


def token_count(value: Any) -> Optional[int]:
    """Ollama's eval_count if it is a sane count; an upstream's odd value is ignored."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value
    return None


def prompt_count(done_line: Optional[bytes]) -> Optional[int]:
    """The prompt_eval_count of Ollama's final line, if it holds a sane one."""
    try:
        done = jsonfmt.loads(done_line) if done_line else None
    except ValueError:
        return None
    return token_count(done.get("prompt_eval_count")) if isinstance(done, dict) else None
