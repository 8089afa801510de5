"""handlers/reply_text.py: a reply's text as it streams in, kept in few strings."""

from handlers.reply_text import ReplyText, prompt_count, token_count


def test_the_text_and_count_survive_every_compaction():
    text = ReplyText()
    tokens = [f"t{i} " for i in range(1000)]
    for i, token in enumerate(tokens):
        text.recent.append(token)
        if i % 3 == 0:  # compact() runs once per upstream chunk, which may hold several
            text.compact()
        assert len(text) == i + 1
    assert str(text) == "".join(tokens)
    text.compact()
    assert len(text.recent) < 8 and len(text.blocks) < 12  # few strings, not one per token
    assert str(text) == "".join(tokens)


def test_a_long_reply_is_not_copied_again_with_every_block():
    text = ReplyText()
    copied = 0
    for i in range(40_000):  # a 40k-token reply, a token per upstream chunk
        text.recent.append("tok ")
        before = [id(b) for b in text.blocks]
        text.compact()
        copied += sum(len(b) for b in text.blocks if id(b) not in before)  # blocks made now
    assert str(text) == "tok " * 40_000
    assert len(text.blocks) <= 16
    assert copied < 20 * 4 * 40_000  # about log2(n) copies of each character, not n / 8


def test_counts_from_an_upstream_are_taken_only_when_sane():
    assert token_count(12) == 12
    for odd in (-1, True, 2**31, "12", 1.5, None):
        assert token_count(odd) is None
    assert prompt_count(b'{"done":true,"prompt_eval_count":33}') == 33
    assert prompt_count(b'not json') is None
    assert prompt_count(b'[1]') is None
    assert prompt_count(None) is None
