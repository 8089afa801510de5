"""accounts/credentials.py: session ids and API tokens, their form and their digests."""

import base64
import hashlib

from accounts.credentials import (credential_hash, looks_like_session_id, looks_like_token, new_api_token,
                                  new_session_id)


def decoded_bits(text: str) -> int:
    return len(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))) * 8


def test_session_ids_are_urlsafe_random_and_at_least_128_bits() -> None:
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000
    for session_id in ids:
        assert decoded_bits(session_id) >= 128
        assert set(session_id) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        assert looks_like_session_id(session_id)
        assert not looks_like_token(session_id)


def test_tokens_start_with_chd_and_carry_at_least_160_random_bits() -> None:
    tokens = {new_api_token() for _ in range(1000)}
    assert len(tokens) == 1000
    for token in tokens:
        assert token.startswith("chd_")
        assert decoded_bits(token[4:]) >= 160
        assert looks_like_token(token)
        assert not looks_like_session_id(token)


def test_looks_like_token_refuses_other_bearer_values() -> None:
    token = new_api_token()
    for value in ["sk-none", "", "chd_", token[:-1], token + "A", token.replace("chd_", "CHD_"),
                  token[:10] + "+" + token[11:], token[:10] + "=" + token[11:], " " + token, token + "\n",
                  "chd_" + "é" * (len(token) - 4), None, 42, token.encode()]:
        assert not looks_like_token(value), value
    for value in ["", new_session_id()[:-1], new_session_id() + "x", "=" * 43, None, b"x" * 43]:
        assert not looks_like_session_id(value), value


def test_credential_hash_is_sha256_of_the_utf8_text() -> None:
    assert credential_hash("abc") == bytes.fromhex(
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    token = new_api_token()
    assert credential_hash(token) == hashlib.sha256(token.encode()).digest()
    assert credential_hash(token) == credential_hash(token.encode())
    assert len(credential_hash(token)) == 32
    assert credential_hash(token) != credential_hash(new_api_token())
    credential_hash("\ud800")  # whatever a client sends can be looked up (and found nowhere)
