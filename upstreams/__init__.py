"""Upstream LLM servers: one module per dialect (ollama, openai) and the router that picks one.

Handlers call `app.ollama.post(path, ollama_body, on_lines)` (a `router.Router`) and get a
call with OllamaCall's interface whatever the upstream's dialect; see router.py for the
routing and failover rules.
"""
