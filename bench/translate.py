"""Micro-benchmark: the cost of the dialect translation per event, in µs.

* OpenAI chunk -> Ollama line: upstreams.openai.ChunkTranslator.feed on the SSE lines a
  llama.cpp server sends (one content token per chunk), what /llmchat pays per token with
  an OpenAI-compatible upstream (on top of the relay itself).
* Ollama line -> OpenAI chunk: upstreams.openai.OllamaToOpenAI.events, what
  /v1/chat/completions pays per token.

    .venv/bin/python bench/translate.py [--events 200000]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jsonfmt  # noqa: E402
from handlers.openai_format import OllamaToOpenAI  # noqa: E402
from upstreams.openai import ChunkTranslator  # noqa: E402

CHUNK = (b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" token"}}],'
         b'"created":1795627277,"id":"chatcmpl-NAMxhzmgp10lsFZPx83Ffx4CiXr6Mw4O",'
         b'"model":"smollm2","system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}')
LINE = (b'{"model":"smollm2","created_at":"2026-11-25T17:31:20.554739767Z",'
        b'"message":{"role":"assistant","content":" token"},"done":false}')


def best_of(runs: int, fn) -> float:
    return min(fn() for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--per-chunk", type=int, default=1, help="SSE events per upstream read")
    args = parser.parse_args()
    batch = [CHUNK] * args.per_chunk
    lines = [LINE] * args.per_chunk
    rounds = args.events // args.per_chunk

    def to_ollama() -> float:
        t = ChunkTranslator("smollm2")
        start = time.perf_counter()
        for _ in range(rounds):
            t.feed(batch)
        return (time.perf_counter() - start) / (rounds * args.per_chunk) * 1e6

    def to_openai() -> float:
        t = OllamaToOpenAI("smollm2")
        start = time.perf_counter()
        for _ in range(rounds):
            t.events(lines)
        return (time.perf_counter() - start) / (rounds * args.per_chunk) * 1e6

    def baseline() -> float:  # one decode + one encode of the same chunk, for scale
        start = time.perf_counter()
        for _ in range(rounds * args.per_chunk):
            jsonfmt.dumpb(jsonfmt.loads(CHUNK[6:]))
        return (time.perf_counter() - start) / (rounds * args.per_chunk) * 1e6

    print(f"OpenAI chunk -> Ollama line : {best_of(3, to_ollama):6.2f} µs/event")
    print(f"Ollama line -> OpenAI chunk : {best_of(3, to_openai):6.2f} µs/event")
    print(f"(ujson loads+dumps of a chunk: {best_of(3, baseline):6.2f} µs)")


if __name__ == "__main__":
    main()
