"""HTTP handlers, one module per API family: board (/, /getchatts, /postchatt),
llm (/llmprompt, /llmprep), chat (/llmchat), tools (/llmtools), openai_api (/v1) and ops
(/healthz, /readyz, /metrics)."""
