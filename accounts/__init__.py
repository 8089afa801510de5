"""People: password hashing, session ids and API tokens (the owners of conversations)."""
