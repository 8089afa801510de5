"""accounts/redact.py: credentials never reach a log line, whoever writes it."""

import logging

from accounts.credentials import new_api_token, new_session_id
from accounts.policy import SESSION_COOKIE
from accounts.redact import RedactCredentials, redact


def test_tornados_refused_header_values_tokens_cookies_and_header_dicts_are_redacted():
    token, session = new_api_token(), new_session_id()
    lines = [f"Malformed HTTP message from 1.2.3.4: Invalid header value 'Bearer {token}\\x01'",
             "Malformed HTTP message from 1.2.3.4: Invalid header value 'Basic c2VjcmV0\\x01'",
             f"something quoted {token}, and more",
             f"Cookie header was {SESSION_COOKIE}={session}; theme=dark",
             f"headers: {{'Authorization': 'Basic c2VjcmV0', 'Cookie': 'a={session}'}}"]
    for line in lines:
        clean = redact(line)
        for secret in (token, session, "c2VjcmV0"):
            assert secret not in clean, clean
        assert "redacted" in clean or "not logged" in clean


def test_ordinary_lines_pass_unchanged_and_unrebuilt():
    for line in ("200 127.0.0.1 POST /llmchat 12.0ms appID='edu.umich.demo' tokens=42",
                 "401 127.0.0.1 GET /auth/me 1.0ms error='not logged in: log in (POST /auth/login) or "
                 "send Authorization: Bearer chd_...'"):
        assert redact(line) == line
    plain = "200 127.0.0.1 GET / 0.1ms"
    assert redact(plain) is plain


def test_the_filter_cleans_arguments_and_tracebacks():
    token = new_api_token()
    record = logging.LogRecord("tornado.general", logging.INFO, __file__, 1, "got %s", (token,), None)
    assert RedactCredentials().filter(record)
    assert token not in record.getMessage()
    try:
        raise ValueError(f"bad value {token}")
    except ValueError as e:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, (ValueError, e, e.__traceback__))
    RedactCredentials().filter(record)
    text = logging.Formatter().format(record)
    assert "ValueError: bad value chd_[redacted]" in text
    assert token not in text
