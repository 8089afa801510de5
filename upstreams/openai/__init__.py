"""The OpenAI-compatible dialect (llama.cpp's server, vLLM, LM Studio, hosted APIs), both ways.

Upstream side (chatterd is the client): `OpenAIClient.post("/api/chat", body, on_lines)`
takes an Ollama /api/chat (or /api/generate) body, sends the equivalent
POST {base}/chat/completions with `stream: true` and `stream_options.include_usage`, and
hands `on_lines` Ollama-shaped NDJSON lines, so handlers cannot tell which dialect served
them.  `OpenAICall` has OllamaCall's interface (it is one, with another body parser):

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

Client side (chatterd is the server, handlers/openai_api.py): `OllamaToOpenAI` translates
the other way.

Modules: `client` (OpenAIClient, OpenAICall, the --upstreams URL form), `translate`
(requests one way, streams the other) and `chunks` (Ollama lines as OpenAI chunks).
"""


from upstreams.openai.chunks import OllamaToOpenAI, error_object, usage_of
from upstreams.openai.client import OpenAICall, OpenAIClient, display_url, parse_openai_url
from upstreams.openai.translate import ChunkTranslator, encode_line, ollama_to_openai_request

__all__ = ["ChunkTranslator", "OllamaToOpenAI", "OpenAICall", "OpenAIClient", "display_url",
           "encode_line", "error_object", "ollama_to_openai_request", "parse_openai_url",
           "usage_of"]
