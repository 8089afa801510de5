"""The shape check of the message lists sent upstream (tests/message_shape.py) tells a well
formed list from each way of breaking it."""

from tests.message_shape import shape_problems

S = {"role": "system", "content": "be brief"}
U1, U2, U3 = ({"role": "user", "content": f"u{i}"} for i in (1, 2, 3))
A1, A2 = ({"role": "assistant", "content": f"a{i}"} for i in (1, 2))
CALL = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}
T1, T2 = ({"role": "tool", "content": f"r{i}"} for i in (1, 2))


def test_well_formed_lists():
    for messages in ([U1], [S, U1], [S, S, U1, A1, U2], [U1, CALL, T1, A1, U2],
                     [U1, CALL, T1, T2], [U1, CALL, T1, T2, A1, U2, CALL, T1],
                     [S, U1, CALL, T1, CALL, T2, A1, U2]):
        assert shape_problems(messages) == [], messages


def test_each_break_is_found():
    assert shape_problems([]) == ["the list is empty"]
    assert shape_problems([S]) == ["the list holds only system messages"]
    [p] = shape_problems([S, U1, U2])
    assert p.startswith("'user' followed by 'user' at 1-2")
    [p] = shape_problems([U1, A1, A2, U2])
    assert p.startswith("'assistant' followed by 'assistant' at 1-2")
    [p] = shape_problems([U1, A1, S, U2])
    assert p.startswith("a system message at 2")
    [p] = shape_problems([A1, U1])
    assert p.startswith("the first message after the system messages is 'assistant'")
    [p] = shape_problems([U1, A1])
    assert p.startswith("the list ends with a 'assistant' message")
    [p] = shape_problems([U1, CALL, U2])
    assert p.startswith("'assistant' followed by 'user' at 1-2")
    [p] = shape_problems([U1, CALL, T1, U2])
    assert p.startswith("'tool' followed by 'user' at 2-3")
    [p] = shape_problems([U1, T1])
    assert p.startswith("'user' followed by 'tool' at 0-1")


def test_only_the_pairs_a_client_made_may_break_it():
    sent_together = [(U1, U2)]

    def client_pair(a, b):
        return (a, b) in sent_together

    assert shape_problems([U1, U2], client_pair) == []
    assert shape_problems([U1, U2, A1, U3], client_pair) == []
    # The same words again as a later request (a failed turn's resend) are not that pair.
    [p] = shape_problems([U1, U2, U3], client_pair)
    assert p.startswith("'user' followed by 'user' at 1-2")
    assert shape_problems([A1, U1], lambda a, b: a is None and b is A1) == []
