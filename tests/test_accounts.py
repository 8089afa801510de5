"""Accounts against a real chatterd (HTTP, hashing workers, PostgreSQL): every /auth endpoint
and status, sessions and tokens refused once revoked or expired, forged credentials, the
same-origin rule, the login throttle, --auth required and the per-caller limits."""

import asyncio
import os
import signal
import statistics
import time

from accounts.credentials import new_api_token, new_session_id
from accounts.passwords import PasswordHasher
from accounts.policy import SESSION_COOKIE, AuthPolicy
from tests.people import PASSWORD, PeopleTestCase, error, open_stream, session_of
from tests.support import chat_body, streams_finished
import jsonfmt


class SignupTest(PeopleTestCase):
    def test_signup_sets_a_session_cookie_with_every_protective_flag(self):
        response = self.call("POST", "/auth/signup", {"username": "Ada", "password": PASSWORD})
        self.assertEqual(response.code, 201)
        self.assertEqual(jsonfmt.loads(response.body), {"username": "Ada"})
        (cookie,) = response.headers.get_list("Set-Cookie")
        name_value, *flags = [part.strip() for part in cookie.split(";")]
        self.assertTrue(name_value.startswith(SESSION_COOKIE + "="))
        self.assertEqual({f.lower() for f in flags}, {"httponly", "path=/", "samesite=lax", "secure"})
        session = session_of(response)
        me = self.call("GET", "/auth/me", session=session)
        self.assertEqual(me.code, 200)
        body = jsonfmt.loads(me.body)
        self.assertEqual(body["username"], "Ada")
        self.assertRegex(body["created_at"], r"^\d{4}-\d\d-\d\dT")
        # Stored: the Argon2id hash and the session's digest, never the secrets themselves.
        (user,) = self.sql("SELECT username, username_key, password_hash FROM users")
        self.assertEqual((user["username"], user["username_key"]), ("Ada", "ada"))
        self.assertTrue(user["password_hash"].startswith("$argon2id$v=19$m=19456,t=2,p=1$"))
        (stored,) = self.sql("SELECT id_hash FROM sessions")
        self.assertNotIn(session.encode(), bytes(stored["id_hash"]))
        self.assertEqual(len(stored["id_hash"]), 32)

    def test_names_are_unique_regardless_of_case_and_normal_form(self):
        self.signup("Zoë")  # composed ë
        for same in ("zoë", "ZOË", "Zoe\u0308"):  # the last: e + combining diaeresis
            response = self.call("POST", "/auth/signup", {"username": same, "password": PASSWORD})
            self.assertEqual(response.code, 409, same)
            self.assertEqual(error(response), "this username is taken")
        self.assertEqual(self.login("ZOE\u0308").code, 200)
        self.assertEqual(len(self.sql("SELECT * FROM users")), 1)

    def test_each_broken_rule_is_422_naming_it(self):
        cases = [({"username": "", "password": PASSWORD}, "username must not be empty"),
                 ({"username": "a" * 65, "password": PASSWORD}, "longer than 64"),
                 ({"username": "two words", "password": PASSWORD}, "only letters, digits"),
                 ({"username": "semi;colon", "password": PASSWORD}, "only letters, digits"),
                 ({"username": "nul\x00", "password": PASSWORD}, "NUL"),
                 ({"username": 7, "password": PASSWORD}, "username must be a string"),
                 ({"password": PASSWORD}, "username must be a string"),
                 ({"username": "ok", "password": "1234567"}, "at least 8"),
                 ({"username": "ok", "password": "x" * 1025}, "at most 1024"),
                 ({"username": "ok"}, "password must be a string"),
                 ({"username": "ok", "password": "\ud800" * 9}, "lone surrogate")]
        for body, expected in cases:
            response = self.call("POST", "/auth/signup", body)
            self.assertEqual(response.code, 422, body)
            self.assertIn(expected, error(response))
        self.assertEqual(self.sql("SELECT * FROM users"), [])
        self.assertEqual(self.call("POST", "/auth/signup", b"[1]").code, 400)

    def test_any_unicode_password_of_8_to_1024_characters(self):
        for i, password in enumerate(("😀" * 8, "x" * 1024, "pass word\ttab", "caf\u00e9 au lait")):
            session = self.signup(f"user{i}", password)
            self.assertTrue(session)
            self.assertEqual(self.login(f"user{i}", password).code, 200)
        # NFC: the decomposed form of a password is the same password.
        self.assertEqual(self.login("user3", "cafe\u0301 au lait").code, 200)
        self.assertEqual(self.login("user3", "cafe au lait").code, 401)

    def test_signup_closed_is_403(self):
        self._app.auth = AuthPolicy(signup_open=False)
        response = self.call("POST", "/auth/signup", {"username": "ada", "password": PASSWORD})
        self.assertEqual(response.code, 403)
        self.assertIn("signup is closed", error(response))
        self.assertIsNone(session_of(response))
        self.assertEqual(self.sql("SELECT * FROM users"), [])


class LoginTest(PeopleTestCase):
    def test_every_login_makes_a_new_session_and_ends_the_one_it_came_with(self):
        first = self.signup("ada")
        second = session_of(self.login("ada"))
        third = session_of(self.login("ada", session=first))
        self.assertEqual(len({first, second, third}), 3)
        self.assertEqual(self.call("GET", "/auth/me", session=first).code, 401)  # rotated away
        for live in (second, third):
            self.assertEqual(self.call("GET", "/auth/me", session=live).code, 200)

    def test_unknown_user_and_wrong_password_get_the_same_answer_in_about_the_same_time(self):
        self.signup("ada")
        unknown, wrong = [], []
        for i in range(5):
            for name, password, times in (("nobody", PASSWORD, unknown), ("ada", "wrong password", wrong)):
                started = time.perf_counter()
                response = self.login(name, password, headers={"X-Try": str(i)})
                times.append(time.perf_counter() - started)
                self.assertEqual(response.code, 401)
                self.assertEqual(jsonfmt.loads(response.body), {"error": "wrong username or password"})
                self.assertIsNone(session_of(response))
            self.sql("DELETE FROM login_throttle")  # this test is about timing, not the throttle
        u, w = statistics.median(unknown), statistics.median(wrong)
        print(f"login refused: unknown user {u * 1000:.1f} ms, wrong password {w * 1000:.1f} ms (medians)")
        self.assertLess(max(u, w) / min(u, w), 2.0)
        # Both paid for a hash: neither is a quick database miss.
        self.assertGreater(min(u, w), 0.015)

    def test_a_name_no_account_can_have_and_bad_fields(self):
        self.assertEqual(self.login("two words").code, 401)
        self.assertEqual(self.login("ada", "short").code, 401)
        for body in ({"username": "ada"}, {"username": 1, "password": PASSWORD}, {}):
            response = self.call("POST", "/auth/login", body)
            self.assertEqual(response.code, 422, body)
        self.assertEqual(self.call("POST", "/auth/login", b"not json").code, 400)

    def test_login_rehashes_when_the_parameters_have_grown(self):
        async def weak_hash() -> str:
            async with PasswordHasher(workers=1, memory_cost=8192, time_cost=1) as weak:
                return await weak.hash(PASSWORD)

        weak = self.io_loop.run_sync(weak_hash, timeout=60)
        self.sql("INSERT INTO users (username, username_key, password_hash) VALUES ('old', 'old', $1)", weak)
        self.assertEqual(self.login("old").code, 200)
        (row,) = self.sql("SELECT password_hash FROM users")
        self.assertTrue(row["password_hash"].startswith("$argon2id$v=19$m=19456,t=2,p=1$"))
        self.assertEqual(self.login("old").code, 200)
        self.assertEqual(self.login("old", "not the password").code, 401)

    def test_no_hasher_or_a_full_queue_is_503_with_retry_after(self):
        self.signup("ada")
        self._app.hasher = None
        response = self.login("ada")
        self.assertEqual(response.code, 503)
        self.assertIn("accounts are not available", error(response))

        async def crowd() -> tuple[list, int]:
            async with PasswordHasher(workers=1, max_waiting=0) as one:
                self._app.hasher = one
                [worker] = one.pids
                os.kill(worker, signal.SIGSTOP)  # the one worker stays busy with the next hash
                try:
                    hashing = asyncio.ensure_future(one.hash("keeps the one worker busy"))
                    while one._idle:  # until that hash has the worker
                        await asyncio.sleep(0)
                    responses = await asyncio.gather(*(self.http_client.fetch(
                        self.get_url("/auth/login"), method="POST", raise_error=False,
                        body=jsonfmt.dumps({"username": "ada", "password": PASSWORD})) for _ in range(3)))
                finally:
                    os.kill(worker, signal.SIGCONT)
                await hashing
                after = await self.http_client.fetch(
                    self.get_url("/auth/login"), method="POST", raise_error=False,
                    body=jsonfmt.dumps({"username": "ada", "password": PASSWORD}))
                return responses, after.code

        responses, after = self.io_loop.run_sync(crowd, timeout=60)
        self.assertEqual([r.code for r in responses], [503] * 3)
        self.assertEqual({r.headers["Retry-After"] for r in responses}, {"1"})
        self.assertIn("too many password checks", error(responses[0]))
        self.assertEqual(after, 200)

    def test_a_stored_hash_argon2_cannot_read_matches_nothing(self):
        self.sql("INSERT INTO users (username, username_key, password_hash) VALUES ('odd', 'odd', 'plain')")
        self.assertEqual(self.login("odd", "plain-text-password").code, 401)


class ThrottleTest(PeopleTestCase):
    xheaders = True  # the client address comes from X-Real-IP, so one test can be two places

    def test_repeated_failures_get_429_with_retry_after_and_another_address_still_logs_in(self):
        self.signup("ada")
        here = {"X-Real-IP": "192.0.2.1"}
        for _ in range(5):
            self.assertEqual(self.login("ada", "wrong guess", headers=here).code, 401)
        for password in ("wrong guess", PASSWORD):  # the right password too: no oracle
            response = self.login("ada", password, headers=here)
            self.assertEqual(response.code, 429)
            self.assertIn("too many attempts", error(response))
            retry = int(response.headers["Retry-After"])
            self.assertTrue(1 <= retry <= 301, retry)
        # No lockout: the owner, elsewhere, logs in; and other usernames from here are not held.
        self.assertEqual(self.login("ada", headers={"X-Real-IP": "198.51.100.7"}).code, 200)
        self.signup("bob")
        self.assertEqual(self.login("bob", headers=here).code, 200)

    def test_concurrent_guesses_are_all_counted(self):
        self.signup("ada")

        async def storm() -> list[int]:
            responses = await asyncio.gather(*(self.http_client.fetch(
                self.get_url("/auth/login"), method="POST", raise_error=False,
                headers={"X-Real-IP": "192.0.2.9"},
                body=jsonfmt.dumps({"username": "ada", "password": f"guess {i}"})) for i in range(10)))
            return sorted(r.code for r in responses)

        self.assertEqual(self.io_loop.run_sync(storm, timeout=60), [401] * 5 + [429] * 5)

    def test_a_window_that_ended_starts_afresh(self):
        self.signup("ada")
        here = {"X-Real-IP": "192.0.2.3"}
        for _ in range(6):
            self.login("ada", "wrong guess", headers=here)
        self.assertEqual(self.login("ada", headers=here).code, 429)
        self.sql("UPDATE login_throttle SET window_start = now() - interval '301 seconds'")
        self.assertEqual(self.login("ada", headers=here).code, 200)
        self.assertEqual(self.sql("SELECT * FROM login_throttle"), [])  # a success clears it


class SessionTest(PeopleTestCase):
    def test_logout_ends_the_session_server_side(self):
        session = self.signup("ada")
        other = session_of(self.login("ada"))
        response = self.call("POST", "/auth/logout", session=session)
        self.assertEqual(response.code, 204)
        self.assertEqual(session_of(response), "")  # cleared in the browser too
        response = self.call("GET", "/auth/me", session=session)
        self.assertEqual(response.code, 401)
        self.assertEqual(session_of(response), "")
        self.assertEqual(self.call("GET", "/auth/me", session=other).code, 200)  # only that one

    def test_a_stale_cookie_does_not_stand_in_the_way_of_logging_in_again_or_out(self):
        stale = self.signup("ada")
        self.assertEqual(self.call("POST", "/auth/logout", session=stale).code, 204)
        response = self.login("ada", session=stale)
        self.assertEqual(response.code, 200)
        self.assertNotIn(session_of(response), ("", stale))
        response = self.call("POST", "/auth/logout", session=stale)
        self.assertEqual((response.code, session_of(response)), (204, ""))
        response = self.call("POST", "/auth/signup", {"username": "bob", "password": PASSWORD}, session=stale)
        self.assertEqual(response.code, 201)
        # A stale cookie from another site is still refused first.
        self.assertEqual(self.login("ada", session=stale, site="cross-site").code, 403)

    def test_me_without_credentials_is_401(self):
        response = self.call("GET", "/auth/me")
        self.assertEqual(response.code, 401)
        self.assertIn("not logged in", error(response))

    def test_idle_and_absolute_expiry(self):
        idle = self.signup("ada")
        old = session_of(self.login("ada"))
        self.sql("UPDATE sessions SET last_seen_at = now() - interval '86401 seconds'"
                 " WHERE id_hash = sha256($1::bytea)", idle.encode())
        self.sql("UPDATE sessions SET expires_at = now() - interval '1 second'"
                 " WHERE id_hash = sha256($1::bytea)", old.encode())
        for session in (idle, old):
            response = self.call("GET", "/auth/me", session=session)
            self.assertEqual(response.code, 401)
            self.assertIn("expired or unknown", error(response))
            self.assertEqual(session_of(response), "")

    def test_use_keeps_a_session_alive(self):
        session = self.signup("ada")
        self.sql("UPDATE sessions SET last_seen_at = now() - interval '3600 seconds'")
        self.assertEqual(self.call("GET", "/auth/me", session=session).code, 200)
        (row,) = self.sql("SELECT now() - last_seen_at < interval '10 seconds' AS fresh FROM sessions")
        self.assertTrue(row["fresh"])

    def test_forged_and_malformed_cookies_are_401_and_cleared(self):
        self.signup("ada")
        for forged in (new_session_id(), "1", "x" * 500, "%00", "ada"):
            response = self.call("GET", "/auth/me", session=forged)
            self.assertEqual(response.code, 401, forged)
            self.assertEqual(session_of(response), "")
            # And on the hot path of the course: never a silent fall-back to anonymous.
            response = self.call("POST", "/postchatt", {"name": "n", "message": "m"}, session=forged)
            self.assertEqual(response.code, 401)
        self.assertEqual(self.sql("SELECT * FROM chatts"), [])

    def test_password_change_ends_every_other_session_and_rotates_this_one(self):
        session = self.signup("ada")
        other = session_of(self.login("ada"))
        token = self.new_token(session)["token"]
        response = self.call("POST", "/auth/password", {"password": "wrong one", "new_password": "a new password"},
                             session=session)
        self.assertEqual((response.code, error(response)), (403, "wrong password"))
        response = self.call("POST", "/auth/password", {"password": PASSWORD, "new_password": "short"},
                             session=session)
        self.assertEqual(response.code, 422)
        self.assertIn("new_password must be at least 8", error(response))
        response = self.call("POST", "/auth/password", {"password": PASSWORD, "new_password": "a new password"},
                             session=session)
        self.assertEqual(response.code, 204)
        renewed = session_of(response)
        self.assertTrue(renewed and renewed != session)
        for ended in (session, other):
            self.assertEqual(self.call("GET", "/auth/me", session=ended).code, 401)
        self.assertEqual(self.call("GET", "/auth/me", session=renewed).code, 200)
        self.assertEqual(self.call("GET", "/auth/me", token=token).code, 200)  # tokens stay
        self.assertEqual(self.login("ada").code, 401)
        self.assertEqual(self.login("ada", "a new password").code, 200)
        self.assertEqual(self.call("POST", "/auth/password", {"password": PASSWORD}).code, 401)

    def test_delete_me_deletes_the_user_their_sessions_and_tokens(self):
        session = self.signup("ada")
        token = self.new_token(session)["token"]
        self.call("POST", "/postchatt", {"name": "ada", "message": "hello"}, session=session)
        response = self.call("DELETE", "/auth/me", {"password": "wrong one"}, session=session)
        self.assertEqual(response.code, 403)
        self.assertEqual(self.call("DELETE", "/auth/me", {}, session=session).code, 422)
        response = self.call("DELETE", "/auth/me", {"password": PASSWORD}, session=session)
        self.assertEqual(response.code, 204)
        self.assertEqual(session_of(response), "")
        self.assertEqual(self.call("GET", "/auth/me", session=session).code, 401)
        self.assertEqual(self.call("GET", "/auth/me", token=token).code, 401)
        for table in ("users", "sessions", "api_tokens"):
            self.assertEqual(self.sql(f"SELECT * FROM {table}"), [], table)
        (post,) = self.sql("SELECT name, user_id FROM chatts")  # the board keeps the post, unattributed
        self.assertEqual((post["name"], post["user_id"]), ("ada", None))
        self.assertEqual(self.login("ada").code, 401)
        self.signup("ada")  # the name is free again


class TokenTest(PeopleTestCase):
    def test_a_token_is_shown_once_and_acts_for_its_user(self):
        session = self.signup("ada")
        made = self.new_token(session, "my script")
        self.assertEqual(set(made), {"id", "name", "token", "created_at", "last_used_at", "expires_at"})
        self.assertRegex(made["token"], r"^chd_[A-Za-z0-9_-]{43}$")
        self.assertIsNone(made["expires_at"])
        me = self.call("GET", "/auth/me", token=made["token"])
        self.assertEqual(jsonfmt.loads(me.body)["username"], "ada")
        listed = self.call("GET", "/auth/tokens", session=session)
        self.assertEqual(listed.code, 200)
        self.assertNotIn(made["token"].encode(), listed.body)
        (item,) = jsonfmt.loads(listed.body)
        self.assertEqual(set(item), {"id", "name", "created_at", "last_used_at", "expires_at"})
        self.assertEqual((item["id"], item["name"]), (made["id"], "my script"))
        self.assertIsNotNone(item["last_used_at"])
        (row,) = self.sql("SELECT token_hash FROM api_tokens")
        self.assertNotIn(made["token"][4:].encode(), bytes(row["token_hash"]))
        # Works on the course's endpoints, and records who posted.
        response = self.call("POST", "/postchatt", {"name": "ada", "message": "hi"}, token=made["token"])
        self.assertEqual(response.code, 200)
        (post,) = self.sql("SELECT c.user_id = u.id AS theirs FROM chatts c, users u")
        self.assertTrue(post["theirs"])

    def test_revoked_unknown_forged_malformed_and_expired_tokens_are_401_invalid_token(self):
        session = self.signup("ada")
        revoked = self.new_token(session, "revoked")
        expired = self.new_token(session, "expired", expires_in_days=1)
        self.assertRegex(expired["expires_at"], r"^\d{4}-")
        self.assertEqual(self.call("DELETE", f"/auth/tokens/{revoked['id']}", session=session).code, 204)
        self.assertEqual(self.call("DELETE", f"/auth/tokens/{revoked['id']}", session=session).code, 404)
        self.sql("UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE name = 'expired'")
        for bad in (revoked["token"], expired["token"], new_api_token(), "chd_", "chd_short",
                    revoked["token"] + "x", "chd_" + "\u00e9" * 43):
            for path, method, body in (("/auth/me", "GET", None), ("/getchatts", "GET", None),
                                       ("/postchatt", "POST", {"name": "x", "message": "y"})):
                response = self.call(method, path, body, headers={"Authorization": f"Bearer {bad}"})
                self.assertEqual(response.code, 401, (bad, path))
                self.assertEqual(response.headers["WWW-Authenticate"], 'Bearer error="invalid_token"')
                self.assertIn("invalid API token", error(response))
        # A chd_ value in another scheme is refused too, not ignored.
        good = self.new_token(session)["token"]
        for header in (f"Basic {good}", good, f"Token {good}"):
            self.assertEqual(self.call("GET", "/auth/me", headers={"Authorization": header}).code, 401, header)
        self.assertEqual(self.call("GET", "/auth/me", headers={"Authorization": f"bearer  {good}"}).code, 200)
        self.assertEqual(self.sql("SELECT * FROM chatts"), [])

    def test_other_authorization_values_are_not_chatterd_credentials(self):
        for header in ("Bearer sk-none", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer sk-proj-abc", "x"):
            response = self.call("POST", "/postchatt", {"name": "sdk", "message": header},
                                 headers={"Authorization": header})
            self.assertEqual(response.code, 200, header)
            self.assertEqual(self.call("GET", "/auth/me", headers={"Authorization": header}).code, 401)
        self.assertEqual({r["user_id"] for r in self.sql("SELECT user_id FROM chatts")}, {None})

    def test_token_management_rules(self):
        session = self.signup("ada")
        token = self.new_token(session)["token"]
        response = self.call("POST", "/auth/tokens", {"name": "more"}, token=token)
        self.assertEqual(response.code, 403)
        self.assertIn("login session", error(response))
        self.assertEqual(self.call("GET", "/auth/tokens", token=token).code, 200)
        for body in ({}, {"name": ""}, {"name": "  "}, {"name": 5}, {"name": "x" * 101},
                     {"name": "n", "expires_in_days": 0}, {"name": "n", "expires_in_days": 1.5},
                     {"name": "n", "expires_in_days": True}, {"name": "n", "expires_in_days": 3651}):
            self.assertEqual(self.call("POST", "/auth/tokens", body, session=session).code, 422, body)
        self.assertEqual(self.call("POST", "/auth/tokens", {"name": "x"}).code, 401)
        self.assertEqual(self.call("GET", "/auth/tokens").code, 401)
        self.assertEqual(self.call("DELETE", "/auth/tokens/1").code, 401)
        self.assertEqual(self.call("DELETE", "/auth/tokens/999999999999", session=session).code, 404)
        self.assertEqual(self.call("DELETE", "/auth/tokens/abc", session=session).code, 404)

    def test_nobody_revokes_or_lists_another_users_token(self):
        ada = self.signup("ada")
        bob = self.signup("bob")
        adas = self.new_token(ada)
        self.assertEqual(self.call("DELETE", f"/auth/tokens/{adas['id']}", session=bob).code, 404)
        self.assertEqual(jsonfmt.loads(self.call("GET", "/auth/tokens", session=bob).body), [])
        self.assertEqual(self.call("GET", "/auth/me", token=adas["token"]).code, 200)

    def test_at_most_100_live_tokens(self):
        session = self.signup("ada")
        self.sql("INSERT INTO api_tokens (user_id, name, token_hash)"
                 " SELECT u.id, 't' || i, sha256(int4send(i)) FROM users u, generate_series(1, 100) i")
        response = self.call("POST", "/auth/tokens", {"name": "one more"}, session=session)
        self.assertEqual(response.code, 409)
        self.sql("UPDATE api_tokens SET revoked_at = now() WHERE name = 't1'")
        self.new_token(session, "one more")


class CrossSiteTest(PeopleTestCase):
    def test_a_cookie_write_from_another_site_is_403_and_stores_nothing(self):
        session = self.signup("ada")
        chatt = {"name": "ada", "message": "forged"}
        host = f"127.0.0.1:{self.get_http_port()}"
        refused = [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                   {"Origin": "http://evil.example"}, {"Origin": "null"},
                   {"Origin": f"https://{host}"},  # another scheme is another origin
                   {"Origin": f"http://{host}/path"}, {}]
        for headers in refused:
            for method, path, body in (("POST", "/postchatt", chatt), ("POST", "/auth/tokens", {"name": "x"}),
                                       ("POST", "/auth/logout", None), ("DELETE", "/auth/me", {"password": PASSWORD}),
                                       ("POST", "/llmprep", {"appID": "a", "model": "llama3.2",
                                                             "messages": [{"role": "system", "content": "s"}]})):
                response = self.call(method, path, body, session=session, site=None, headers=headers)
                self.assertEqual(response.code, 403, (headers, path))
                self.assertIn("cross-site", error(response))
        self.assertEqual(self.sql("SELECT * FROM chatts"), [])
        self.assertEqual(self.sql("SELECT * FROM api_tokens"), [])
        self.assertEqual(self.sql("SELECT * FROM turns"), [])
        self.assertEqual(self.call("GET", "/auth/me", session=session).code, 200)  # still logged in
        # Reads are not state changes; same-origin writes pass.
        self.assertEqual(self.call("GET", "/getchatts", session=session, site="cross-site").code, 200)
        for headers in ({"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"},
                        {"Origin": f"http://{host}"}, {"Origin": f"HTTP://{host.upper()}"}):
            response = self.call("POST", "/postchatt", chatt, session=session, site=None, headers=headers)
            self.assertEqual(response.code, 200, headers)

    def test_tokens_and_anonymous_requests_are_not_affected(self):
        session = self.signup("ada")
        token = self.new_token(session)["token"]
        evil = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
        self.assertEqual(self.call("POST", "/postchatt", {"name": "a", "message": "tok"}, token=token,
                                   headers=evil).code, 200)
        self.assertEqual(self.call("POST", "/postchatt", {"name": "a", "message": "anon"},
                                   headers=evil).code, 200)

    def test_no_cross_site_login_or_signup(self):
        self.signup("ada")
        for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.example"}):
            self.assertEqual(self.login("ada", headers=headers).code, 403)
            response = self.call("POST", "/auth/signup", {"username": "eve", "password": PASSWORD},
                                 headers=headers)
            self.assertEqual(response.code, 403)
        self.assertEqual(len(self.sql("SELECT * FROM users")), 1)
        self.assertEqual(self.login("ada").code, 200)  # curl: no browser headers at all


class BehindNginxTest(PeopleTestCase):
    xheaders = True

    def test_the_origin_scheme_comes_from_x_forwarded_proto(self):
        session = self.signup("ada")
        host = f"127.0.0.1:{self.get_http_port()}"
        chatt = {"name": "ada", "message": "via nginx"}
        proxied = {"X-Forwarded-Proto": "https", "Origin": f"https://{host}"}
        self.assertEqual(self.call("POST", "/postchatt", chatt, session=session, site=None, headers=proxied).code, 200)
        proxied["Origin"] = f"http://{host}"
        self.assertEqual(self.call("POST", "/postchatt", chatt, session=session, site=None, headers=proxied).code, 403)
        chatt = {"name": "ada", "message": "default port"}
        headers = {"X-Forwarded-Proto": "https", "Host": "chat.example", "Origin": "https://chat.example:443"}
        self.assertEqual(self.call("POST", "/postchatt", chatt, session=session, site=None, headers=headers).code, 200)


class AnonymousCostsNoQueryTest(PeopleTestCase):
    def test_a_request_without_chatterd_credentials_never_touches_the_database(self):
        class NoPool:
            def acquire(self, *args, **kwargs):
                raise AssertionError("the database was used")

        real = self._app.pool
        self._app.pool = NoPool()
        try:
            for headers in ({}, {"Cookie": "theme=dark; other=1"}, {"Authorization": "Bearer sk-none"},
                            {"Cookie": f"{SESSION_COOKIE}="}):
                response = self.call("GET", "/", headers=headers)
                self.assertEqual(response.code, 200, headers)
            with self.assertLogs(level="ERROR"):  # the check can fail: our cookie is looked up
                response = self.call("GET", "/", session=new_session_id())
            self.assertEqual(response.code, 500)
        finally:
            self._app.pool = real


class RequiredModeTest(PeopleTestCase):
    auth = AuthPolicy(required=True)

    def test_only_the_public_endpoints_answer_without_a_user(self):
        for path in ("/", "/healthz", "/readyz"):
            self.assertIn(self.call("GET", path).code, (200, 503), path)
        for method, path, body in (("GET", "/getchatts", None), ("POST", "/postchatt", {"name": "a", "message": "b"}),
                                   ("POST", "/llmchat", chat_body("a", "hi")), ("POST", "/llmprompt", {}),
                                   ("POST", "/llmprep", chat_body("a", "hi")), ("POST", "/llmtools", chat_body("a", "hi")),
                                   ("POST", "/v1/chat/completions", {}), ("GET", "/v1/models", None),
                                   ("GET", "/metrics", None), ("GET", "/auth/me", None), ("GET", "/auth/tokens", None)):
            response = self.call(method, path, body)
            self.assertEqual(response.code, 401, path)
            self.assertIn("WWW-Authenticate", response.headers)
        self.assertEqual(self.sql("SELECT * FROM chatts"), [])
        self.assertEqual(self.double.chat_requests(), [])

    def test_a_user_uses_everything_and_the_board_records_who_posted(self):
        session = self.signup("ada")  # signup and login stay open
        self.assertEqual(self.login("ada").code, 200)
        token = self.new_token(session)["token"]
        self.assertEqual(self.call("POST", "/postchatt", {"name": "ada", "message": "hi"}, token=token).code, 200)
        self.assertEqual(self.call("GET", "/getchatts", session=session).code, 200)
        response = self.call("POST", "/llmchat", chat_body("app", "hello"), token=token)
        self.assertEqual(response.code, 200)
        self.assertIn(b"data: ", response.body)
        (post,) = self.sql("SELECT u.username FROM chatts c JOIN users u ON u.id = c.user_id")
        self.assertEqual(post["username"], "ada")


class CallerLimitsTest(PeopleTestCase):
    user_streams = 1

    def test_one_stream_per_user_and_other_users_are_not_affected(self):
        self.double.behave("llama3.2", token_delay=0.2)
        ada = self.new_token(self.signup("ada"))["token"]
        bob = self.new_token(self.signup("bob"))["token"]
        port = self.get_http_port()

        async def scenario() -> None:
            _, first, seen = await open_stream(port, chat_body("a1", "hi"), {"Authorization": f"Bearer {ada}"})
            self.assertIn(b"HTTP/1.1 200", seen)
            _, second, seen = await open_stream(port, chat_body("a2", "hi"), {"Authorization": f"Bearer {ada}"})
            self.assertIn(b"HTTP/1.1 429", seen)
            self.assertIn(b"Retry-After: 1", seen)
            self.assertIn(b"too many concurrent streams", seen)
            second.close()
            _, other, seen = await open_stream(port, chat_body("b1", "hi"), {"Authorization": f"Bearer {bob}"})
            self.assertIn(b"HTTP/1.1 200", seen)  # bob streams while ada is at her limit
            _, anon, seen = await open_stream(port, chat_body("n1", "hi"), {})
            self.assertIn(b"HTTP/1.1 200", seen)  # anonymous: counted by address, apart
            _, anon2, seen = await open_stream(port, chat_body("n2", "hi"), {})
            self.assertIn(b"HTTP/1.1 429", seen)
            for writer in (first, other, anon, anon2):
                writer.transport.abort()
            await streams_finished(self._app)
            _, again, seen = await open_stream(port, chat_body("a3", "hi"), {"Authorization": f"Bearer {ada}"})
            self.assertIn(b"HTTP/1.1 200", seen)  # the slot came back when her stream ended
            again.transport.abort()
            await streams_finished(self._app)

        self.io_loop.run_sync(scenario, timeout=60)
        self.assertEqual(self._app.caller_limits.running, {})
        # The refused request reached neither the model nor the conversation.
        self.assertNotIn("a2", {t["appid"] for t in self.sql("SELECT appid FROM turns")})


class CallerRateTest(PeopleTestCase):
    user_rate = 2

    def test_requests_per_minute_per_user(self):
        ada = self.new_token(self.signup("ada"))["token"]
        bob = self.new_token(self.signup("bob"))["token"]
        for i in range(2):
            self.assertEqual(self.call("POST", "/llmchat", chat_body(f"a{i}", "hi"), token=ada).code, 200)
        response = self.call("POST", "/llmchat", chat_body("a9", "hi"), token=ada)
        self.assertEqual(response.code, 429)
        self.assertIn("per minute", error(response))
        self.assertTrue(1 <= int(response.headers["Retry-After"]) <= 30)
        self.assertEqual(self.call("POST", "/llmchat", chat_body("b0", "hi"), token=bob).code, 200)
        self.assertEqual(self.call("GET", "/auth/me", token=ada).code, 200)  # only model requests count
        self.assertEqual(len(self.double.chat_requests()), 3)
