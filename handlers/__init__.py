"""HTTP handlers, one module per API family: board (/, /getchatts, /postchatt),
llm (/llmprompt, /llmprep), chat (/llmchat) and ops (/healthz, /readyz, /metrics)."""
