"""The chat page's files and how chatterd serves them (handlers/web.py), over real HTTP:
types, the security headers, caching, what is not served; and rules the files themselves
keep so the Content-Security-Policy holds (no inline script or style, nothing from
elsewhere, no HTML built from strings in app.js), and the vendored libraries are the
versions web/vendor/README.md lists.  No database, no browser: a fast module."""

import hashlib
import re
from html.parser import HTMLParser

import tornado.web
from tornado.testing import AsyncHTTPTestCase

from handlers.web import CONTENT_SECURITY_POLICY, WEB_ROOT, ChatRedirectHandler, WebPageHandler


class PageOnly(tornado.web.Application):
    """The two web routes of chatterd.ROUTES with what BaseHandler asks of the app."""

    draining = False

    def __init__(self) -> None:
        super().__init__([(r"/chat", ChatRedirectHandler), (r"/chat/(.*)", WebPageHandler)])

    def request_started(self, handler) -> None:
        pass

    def request_done(self, handler) -> None:
        pass


class ServingTest(AsyncHTTPTestCase):
    def get_app(self) -> tornado.web.Application:
        return PageOnly()

    def get(self, path: str, **kwargs):
        return self.fetch(path, raise_error=False, follow_redirects=False, **kwargs)

    def test_the_page_and_its_files_with_their_types(self):
        for path, kind in [("/chat/", "text/html; charset=utf-8"),
                           ("/chat/index.html", "text/html; charset=utf-8"),
                           ("/chat/c/web-0123abcd", "text/html; charset=utf-8"),
                           ("/chat/c/some%2Fthing%20odd", "text/html; charset=utf-8"),
                           ("/chat/app.js", "text/javascript; charset=utf-8"),
                           ("/chat/markdown.js", "text/javascript; charset=utf-8"),
                           ("/chat/sse.js", "text/javascript; charset=utf-8"),
                           ("/chat/app.css", "text/css; charset=utf-8"),
                           ("/chat/icon.svg", "image/svg+xml"),
                           ("/chat/vendor/markdown-it-15.0.3.min.js", "text/javascript; charset=utf-8"),
                           ("/chat/vendor/dompurify-3.4.18.min.js", "text/javascript; charset=utf-8")]:
            with self.subTest(path=path):
                response = self.get(path)
                self.assertEqual(response.code, 200)
                self.assertEqual(response.headers["Content-Type"], kind)
        index = (WEB_ROOT / "index.html").read_bytes()
        self.assertEqual(self.get("/chat/c/anything").body, index)
        self.assertEqual(self.get("/chat/app.js").body, (WEB_ROOT / "app.js").read_bytes())

    def test_security_headers_on_every_answer(self):
        for path in ("/chat/", "/chat/app.js", "/chat/vendor/dompurify-3.4.18.min.js",
                     "/chat/no-such-file.js"):
            with self.subTest(path=path):
                headers = self.get(path).headers
                self.assertEqual(headers["Content-Security-Policy"], CONTENT_SECURITY_POLICY)
                self.assertEqual(headers["X-Content-Type-Options"], "nosniff")
                self.assertEqual(headers["Referrer-Policy"], "no-referrer")
                self.assertEqual(headers["X-Frame-Options"], "DENY")
        policy = dict(part.split(" ", 1) for part in CONTENT_SECURITY_POLICY.split("; "))
        self.assertEqual(policy["script-src"], "'self'")  # no 'unsafe-inline', no 'unsafe-eval'
        self.assertEqual(policy["style-src"], "'self'")
        self.assertEqual(policy["frame-ancestors"], "'none'")
        self.assertEqual(policy["base-uri"], "'none'")

    def test_caching(self):
        own = self.get("/chat/app.js")
        self.assertEqual(own.headers["Cache-Control"], "no-cache")
        again = self.get("/chat/app.js", headers={"If-None-Match": own.headers["Etag"]})
        self.assertEqual(again.code, 304)
        vendored = self.get("/chat/vendor/markdown-it-15.0.3.min.js")
        self.assertEqual(vendored.headers["Cache-Control"], "public, max-age=31536000, immutable")
        self.assertNotIn("Expires", vendored.headers)

    def test_what_is_not_served(self):
        for path in ("/chat/vendor/README.md", "/chat/vendor/markdown-it.LICENSE",
                     "/chat/no-such-file.js", "/chat/vendor/", "/chat/../chatterd.py",
                     "/chat/%2e%2e/chatterd.py", "/chat/..%2fchatterd.py",
                     "/chat/..%2f..%2fetc%2fpasswd", "/chat/%2e%2e/handlers/web.py"):
            with self.subTest(path=path):
                response = self.get(path)
                self.assertIn(response.code, (403, 404), response.body)
                self.assertEqual(response.headers["Content-Type"], "application/json")
                self.assertNotIn(b"import", response.body)
        self.assertEqual(self.fetch("/chat/", method="POST", body=b"{}", raise_error=False).code, 405)

    def test_credentials_are_not_looked_at(self):
        # A stale session cookie or a bad token must not keep the page (and its login form)
        # away; this app has no database, so a lookup would fail the request.
        for headers in ({"Cookie": "__Host-chatterd_session=stale-or-forged"},
                        {"Authorization": "Bearer chd_not_a_real_token"}):
            with self.subTest(headers=headers):
                self.assertEqual(self.get("/chat/", headers=headers).code, 200)
                self.assertEqual(self.get("/chat/app.js", headers=headers).code, 200)
        self.assertTrue(WebPageHandler.public)

    def test_chat_without_the_slash_moves_to_it(self):
        response = self.get("/chat")
        self.assertEqual(response.code, 301)
        self.assertEqual(response.headers["Location"], "/chat/")


class PageRules(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []
        self.stylesheets: list[str] = []
        self.inline: list[str] = []
        self.tag = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tag = tag
        for name, _ in attrs:
            if name.startswith("on") or name == "style":
                self.inline.append(f"<{tag} {name}=...>")
        if tag == "script":
            self.scripts.append(a.get("src") or "")
        if tag == "link" and a.get("rel") == "stylesheet":
            self.stylesheets.append(a.get("href") or "")
        if tag == "style":
            self.inline.append("<style>")

    def handle_data(self, data):
        if self.tag == "script" and data.strip():
            self.inline.append("inline <script>")


def test_index_html_keeps_to_the_policy():
    rules = PageRules()
    rules.feed((WEB_ROOT / "index.html").read_text())
    assert rules.inline == []
    assert rules.scripts == ["/chat/vendor/markdown-it-15.0.3.min.js",
                             "/chat/vendor/dompurify-3.4.18.min.js", "/chat/markdown.js",
                             "/chat/sse.js", "/chat/app.js"]
    assert rules.stylesheets == ["/chat/app.css"]
    for src in rules.scripts + rules.stylesheets:
        assert (WEB_ROOT / src.removeprefix("/chat/")).is_file(), src


def test_the_page_builds_no_html_from_strings_and_stores_no_secret():
    own = sorted(WEB_ROOT.glob("*.js"))
    assert [p.name for p in own] == ["app.js", "markdown.js", "sse.js"]
    for path in own:
        code = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                     "new Function", "localStorage", "setTimeout(\"",
                     "srcdoc", "DOMParser"):
            assert sink not in code, (path.name, sink)
        # sessionStorage holds one thing, the running turn (docs/web.md), under one key.
        uses = re.findall(r"sessionStorage\.\w+\([^,)]*", code)
        assert all(u.endswith("(RUNNING_KEY") for u in uses), (path.name, uses)
        assert len(uses) == (3 if path.name == "app.js" else 0), (path.name, uses)
    markdown = (WEB_ROOT / "markdown.js").read_text()
    assert "html: false" in markdown  # markdown-it with raw HTML off
    assert "DOMPurify.sanitize" in markdown and "RETURN_DOM_FRAGMENT: true" in markdown


def test_vendored_files_are_the_listed_versions():
    listed = (WEB_ROOT / "vendor" / "README.md").read_text()
    rows = dict(re.findall(r"\| `([^`]+\.js)` \|.*\| `([0-9a-f]{64})` \|", listed))
    files = {p.name for p in (WEB_ROOT / "vendor").glob("*.js")}
    assert set(rows) == files
    for name, digest in rows.items():
        assert hashlib.sha256((WEB_ROOT / "vendor" / name).read_bytes()).hexdigest() == digest, name
        assert (WEB_ROOT / "vendor" / f"{name.rsplit('-', 1)[0]}.LICENSE").is_file(), name
