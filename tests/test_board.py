"""GET /, POST /postchatt, GET /getchatts and the JSON error conventions."""

import jsonfmt
from tests.support import ChatterdTestCase


class BoardTest(ChatterdTestCase):
    def test_top_identifies_the_server(self):
        response = self.fetch("/")
        self.assertEqual(response.code, 200)
        self.assertEqual(jsonfmt.loads(response.body), "EECS Reactive chatterd")

    def test_post_then_get_oldest_first(self):
        for i in range(5):
            response = self.post_json("/postchatt", {"name": f"u{i}", "message": f"m{i} / \n é"})
            self.assertEqual((response.code, jsonfmt.loads(response.body)), (200, {}))
        rows = jsonfmt.loads(self.fetch("/getchatts").body)
        self.assertEqual([(r[0], r[1]) for r in rows], [(f"u{i}", f"m{i} / \n é") for i in range(5)])
        name, message, chatt_id, time = rows[0]
        self.assertEqual(len(chatt_id), 36)
        self.assertRegex(time, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00$")
        self.assertNotIn(b"\\/", self.fetch("/getchatts").body)  # standard JSON, not ujson's default

    def test_username_is_accepted_and_trailing_slashes_work(self):
        self.assertEqual(self.post_json("/postchatt/", {"username": "old", "message": "hi"}).code, 200)
        self.assertEqual(jsonfmt.loads(self.fetch("/getchatts/").body)[0][0], "old")

    def test_bad_bodies(self):
        cases = [(b"nope", 400, "not valid JSON"), (b"[]", 400, "JSON object"),
                 ({"message": "x"}, 422, "name"), ({"name": "", "message": "x"}, 422, "name"),
                 ({"name": "a"}, 422, "message"), ({"name": "a", "message": 3}, 422, "message"),
                 ({"name": "n" * 65, "message": "x"}, 422, "longer than 64"),
                 ({"name": "a", "message": "\u0000"}, 422, "NUL")]
        for body, code, fragment in cases:
            with self.subTest(body=body):
                response = self.post_json("/postchatt", body)
                self.assertEqual(response.code, code)
                self.assertIn(fragment, jsonfmt.loads(response.body)["error"])
        self.assertEqual(jsonfmt.loads(self.fetch("/getchatts").body), [])

    def test_oversized_body_is_413_with_json(self):
        too_long = "x" * (self.config.max_body_size + 10)
        response = self.post_json("/postchatt", {"name": "a", "message": too_long})
        self.assertEqual(response.code, 413)
        self.assertIn("limit", jsonfmt.loads(response.body)["error"])

    def test_unknown_path_and_method(self):
        response = self.fetch("/nowhere", raise_error=False)
        self.assertEqual(response.code, 404)
        self.assertIn("/nowhere", jsonfmt.loads(response.body)["error"])
        response = self.fetch("/getchatts", method="DELETE", raise_error=False)
        self.assertEqual(response.code, 405)
        self.assertIn("error", jsonfmt.loads(response.body))
