"""POST /llmprep: start an appID's conversation over with a system prompt."""

import jsonfmt
from tests.support import ChatterdTestCase, chat_body


def prep(app_id, *contents):
    return {"appID": app_id, "model": "llama3.2", "stream": False,
            "messages": [{"role": "system", "content": c} for c in contents]}


class LLMPrepTest(ChatterdTestCase):
    def test_replaces_the_conversation(self):
        self.post_json("/llmchat", chat_body("p", "before"))
        self.assertEqual(len(self.rows("p")), 2)
        response = self.post_json("/llmprep", prep("p", "You are  a pirate.\n"))
        self.assertEqual((response.code, jsonfmt.loads(response.body)), (200, {}))
        self.assertEqual([(r["role"], r["content"]) for r in self.rows("p")],
                         [("system", "You are  a pirate.\n")])
        self.assertEqual(len(self.double.chat_requests()), 1)

    def test_other_app_ids_are_untouched(self):
        self.post_json("/llmprep", prep("a", "A"))
        self.post_json("/llmprep", prep("b", "B"))
        self.post_json("/llmprep", prep("a", "A2"))
        self.assertEqual([r["content"] for r in self.rows("b")], ["B"])
        self.assertEqual([r["content"] for r in self.rows("a")], ["A2"])

    def test_invalid_prep_changes_nothing(self):
        self.post_json("/llmprep", prep("k", "keep me"))
        bad = prep("k", "x")
        bad["messages"].append({"role": "wizard", "content": "y"})
        response = self.post_json("/llmprep/", bad)
        self.assertEqual(response.code, 422)
        self.assertIn("messages[1].role", jsonfmt.loads(response.body)["error"])
        self.assertEqual([r["content"] for r in self.rows("k")], ["keep me"])

    def test_empty_messages_clears(self):
        self.post_json("/llmprep", prep("e", "sys"))
        self.assertEqual(self.post_json("/llmprep", prep("e")).code, 200)
        self.assertEqual(self.rows("e"), [])
