"""The messages of conversations this process has read, so begin_turn need not read them
again (begin_turn's p_cached, db/functions/begin_turn.sql).

A conversation is (owner_id, appID), here as in every key (db/conversations.py): the same
appID under two owners is two entries, and one owner's turns are never offered as
another's.  An ended turn's sent messages never change (only their token counts are
learned later, and the history sent upstream carries none), and a turn id is never
reused, so a cached turn is valid for as long as its conversation exists; /llmprep
(replace) and DELETE /conversations/{appID} forget the conversation.  (A conversation
deleted by another process leaves turns here that no window of a later conversation
holds: its next assemble drops them.)  Per conversation only the turns of its latest
window are kept, and only the most recently used `size` conversations.  The cached
message dicts are shared by every turn that sends them: read them, never change them.

    cache = HistoryCache(1000)
    known = cache.snapshot(owner_id, app_id)        # list(known) -> begin_turn's p_cached
    history = cache.assemble(owner_id, app_id, known, history, history_turns, window_turns)
"""

from collections import OrderedDict


class HistoryCache:
    def __init__(self, size: int) -> None:
        self.size = size
        self._apps: OrderedDict[tuple[int, str], dict[int, tuple]] = OrderedDict()

    def snapshot(self, owner_id: int, app_id: str) -> dict[int, tuple]:
        """The conversation's cached turns, as begin_turn is told about them.  assemble()
        must get this same mapping: the conversation may be evicted or forgotten meanwhile
        (never changed in place), and a turn the database was told not to send must still
        be found."""
        return self._apps.get((owner_id, app_id)) or {}

    def forget(self, owner_id: int, app_id: str) -> None:
        self._apps.pop((owner_id, app_id), None)

    def assemble(self, owner_id: int, app_id: str, known: dict[int, tuple], fetched: list[dict],
                 fetched_turns: list[int], window: list[int]) -> list[dict]:
        """The history begin_turn means: its system prompts (fetched always), then each
        window turn's messages in turn order, from *fetched* (with the turn of each in
        *fetched_turns*) or from the cache; the cache then holds the window's turns."""
        history: list[dict] = []
        new: dict[int, list[dict]] = {}
        for message, turn in zip(fetched, fetched_turns):
            if message["role"] == "system":
                history.append(message)
            else:
                new.setdefault(turn, []).append(message)
        key = (owner_id, app_id)
        self._apps.pop(key, None)
        kept: dict[int, tuple] = {}
        for turn in sorted(window):
            # A window turn neither fetched nor cached has no message to send (say, an
            # interrupted reply that never got any text).
            messages = known.get(turn) if turn not in new else tuple(new[turn])
            kept[turn] = messages if messages is not None else ()
            history.extend(kept[turn])
        if self.size > 0:
            self._apps[key] = kept
            while len(self._apps) > self.size:
                self._apps.popitem(last=False)
        return history
