"""Upstream LLM servers: one module per dialect (ollama, openai) and the router that picks one.

Handlers call `app.upstreams.post(path, ollama_body, on_lines)` (a `router.Router`) and get a
call with UpstreamCall's interface whatever the upstream's dialect; see router.py for the
routing and failover rules.
"""
