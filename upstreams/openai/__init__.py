"""The OpenAI-compatible dialect (llama.cpp's server, vLLM, LM Studio, hosted APIs), both ways.

Upstream side (chatterd is the client): `OpenAIClient.post("/api/chat", body, on_lines)`
takes an Ollama /api/chat (or /api/generate) body, sends the equivalent
POST {base}/chat/completions with `stream: true` and `stream_options.include_usage`, and
hands `on_lines` Ollama-shaped NDJSON lines, so handlers cannot tell which dialect served
them.  `OpenAICall` has UpstreamCall's interface (it is one, with another body parser):

* each `data: {chunk}` becomes one Ollama line (`message.content`, `message.thinking` from
  `reasoning_content`/`reasoning`); tool-call deltas are accumulated by `index` (id and
  name once, arguments in fragments; an id/name repeated in every fragment is not
  concatenated) and delivered whole in one line, as Ollama does;
* `finish_reason` and the usage chunk become the final `done: true` line (`done_reason`
  "length" stays, anything else is "stop"; `prompt_eval_count`/`eval_count` from usage),
  sent at `data: [DONE]`, or at the end of a stream that had its finish but no [DONE];
* `data: {"error": ...}` (or llama.cpp's old `error:` field) becomes Ollama's `{"error"}`
  line; a stream that ends with neither finish nor [DONE] is an error; `:` comments
  (keepalives) and `event:`/`id:` lines are skipped;
* with on_lines None (`"stream": false`), `body` is one Ollama JSON object, as Ollama's.

The client-facing side of the dialect (chatterd as an OpenAI server) lives beside its
handler: handlers/openai_format.py.

Modules: `client` (OpenAIClient, OpenAICall, the --upstreams URL form) and `translate`
(requests one way, streams the other).
"""


from upstreams.openai.client import OpenAICall, OpenAIClient, display_url, parse_openai_url
from upstreams.openai.translate import ChunkTranslator, ollama_to_openai_request

__all__ = ["ChunkTranslator", "OpenAICall", "OpenAIClient", "display_url",
           "ollama_to_openai_request", "parse_openai_url"]
