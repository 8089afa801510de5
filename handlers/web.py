"""The chat page at /chat/: the static files in web/, with the headers that keep it safe.

The page is plain files (no template, no build step): index.html, app.css, app.js and the
pinned libraries in web/vendor/.  Every path under /chat/c/ is the same index.html (a
conversation's own URL; app.js reads which one), so a reload or a shared link opens it.

The Content-Security-Policy is the second wall behind the page's sanitizing markdown
pipeline (docs/web.md): even HTML that slipped through could load nothing from elsewhere,
run no inline script and send nothing to another origin.
"""

from pathlib import Path
from typing import Any

from tornado.web import RedirectHandler, StaticFileHandler

from handlers.base import BaseHandler
from handlers.validation import ClientError

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "form-action 'self'",
])

# Only these kinds of file are served; anything else in web/ (READMEs, licences) is not.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

# The vendored libraries carry their version in their file name, so a cached copy is never
# stale; the page's own files are revalidated (ETag) on every load, so a new version shows.
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"


class ChatRedirectHandler(RedirectHandler):
    """/chat -> /chat/ (the page's relative paths need the slash)."""

    def initialize(self, url: str = "/chat/", permanent: bool = True) -> None:
        super().initialize(url=url, permanent=permanent)


class WebPageHandler(BaseHandler, StaticFileHandler):
    """GET/HEAD /chat/<path>: a file of web/, or index.html for / and /c/<appID>."""

    metric_route = "/chat/"
    public = True  # the page is how a person logs in, --auth required or not

    def identify(self) -> None:
        # The same files for everyone: no credential is looked up, so a page load costs no
        # query, and a stale session cookie cannot keep the page (and its login form) away.
        return None

    def initialize(self, path: str = str(WEB_ROOT)) -> None:  # type: ignore[override]
        StaticFileHandler.initialize(self, path=path)

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Cross-Origin-Opener-Policy", "same-origin")

    def parse_url_path(self, url_path: str) -> str:
        if url_path in ("", "index.html") or url_path.startswith("c/"):
            return "index.html"
        if Path(url_path).suffix not in CONTENT_TYPES:
            raise ClientError(404, f"no such file: /chat/{url_path}")
        return super().parse_url_path(url_path)

    def get_content_type(self) -> str:
        return CONTENT_TYPES[Path(self.absolute_path).suffix]

    def get_cache_time(self, path: str, modified: Any, mime_type: str) -> int:
        return 0  # Cache-Control is set below; no Expires header

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", IMMUTABLE if path.startswith("vendor/") else REVALIDATE)
