"""A password hashing worker:

    python -m accounts.hash_worker --time-cost T --memory-cost M --parallelism P [--nice N]

Started and spoken to by accounts.passwords.PasswordHasher.  It reads one JSON request per line
on standard input and answers each with one JSON line on standard output, one at a time:

    {"id": 7, "op": "hash", "password": <base64 of UTF-8>}         -> {"id": 7, "hash": "$argon2id$..."}
    {"id": 8, "op": "verify", "password": ..., "hash": "$argon2id$..."}
                                                                    -> {"id": 8, "ok": true, "new_hash": null}
    {"id": 9, "op": "dummy", "password": ...}                       -> {"id": 9, "ok": false}

Every answer also carries "pid", "started" and "finished" (time.monotonic(), which is one clock
for every process of the machine).  Failures answer {"id": ..., "error": CODE} with a fixed code
and never any part of the request.  Before the first request the worker writes one line
{"ready": true, "pid": ..., "parameters": ...}.  It exits at the end of its input, so it never
outlives the process that holds the other end of its pipe.
"""

import argparse
import base64
import json
import os
import secrets
import signal
import sys
import time

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError




def answer(hasher: PasswordHasher, dummy_hash: str, line: bytes) -> dict:
    started = time.monotonic()
    request_id = None
    try:
        request = json.loads(line)
        request_id = request["id"]
        op = request["op"]
        password = base64.b64decode(request["password"], validate=True)
        if op == "hash":
            reply = {"hash": hasher.hash(password)}
        elif op == "verify":
            reply = verify(hasher, request["hash"], password)
        elif op == "dummy":
            # The same work as checking a wrong password against a real hash of these parameters.
            verify(hasher, dummy_hash, password)
            reply = {"ok": False}
        else:
            reply = {"error": "bad_request"}
    except (ValueError, KeyError, TypeError):
        reply = {"error": "bad_request"}
    except Exception as e:  # the name only: a message could quote the request
        reply = {"error": "internal", "type": type(e).__name__}
    reply.update(id=request_id, pid=os.getpid(), started=started, finished=time.monotonic())
    return reply


def verify(hasher: PasswordHasher, stored_hash: str, password: bytes) -> dict:
    if not isinstance(stored_hash, str):
        return {"error": "invalid_hash"}
    try:
        hasher.verify(stored_hash, password)
    except VerifyMismatchError:
        return {"ok": False, "new_hash": None}
    except (VerificationError, InvalidHashError):
        return {"error": "invalid_hash"}
    new_hash = hasher.hash(password) if hasher.check_needs_rehash(stored_hash) else None
    return {"ok": True, "new_hash": new_hash}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m accounts.hash_worker")
    parser.add_argument("--time-cost", type=int, required=True)
    parser.add_argument("--memory-cost", type=int, required=True, help="KiB")
    parser.add_argument("--parallelism", type=int, required=True)
    parser.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority by N steps")
    args = parser.parse_args()
    # Ctrl-C in a terminal reaches the whole process group; the server decides when workers end
    # (it closes their input or kills them), and an interrupted worker would only print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A hash can wait a few milliseconds; a relayed token should not.  At a lower priority the
    # kernel runs the server's event loop first whenever both want a core, so a burst of logins
    # takes its CPU from idle time rather than from the streams.
    if args.nice:
        os.nice(args.nice)
    hasher = PasswordHasher(time_cost=args.time_cost, memory_cost=args.memory_cost,
                            parallelism=args.parallelism, type=Type.ID)
    # dummy_verify checks against this: a real hash of the same parameters, of a secret nobody knows.
    dummy_hash = hasher.hash(secrets.token_bytes(32))
    out = sys.stdout.buffer

    def write(message: dict) -> None:
        out.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        out.flush()

    write({"ready": True, "pid": os.getpid(), "parameters": dummy_hash.rsplit("$", 2)[0]})
    for line in sys.stdin.buffer:
        write(answer(hasher, dummy_hash, line))


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # the server went away while we answered: nothing left to do
        sys.exit(0)
