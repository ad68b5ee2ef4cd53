"""``python -m candle_phi serve``: load the model once, then serve it over HTTP."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence

from candle_phi import CandlePhiError
from candle_phi.cli import add_model_arguments, load_generator
from candle_phi.server import memory

EXIT_OK = 0
EXIT_ERROR = 1
API_KEY_ENV = "CANDLE_PHI_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    from candle_phi.server.settings import ServerSettings

    defaults = ServerSettings()
    parser = argparse.ArgumentParser(
        prog="candle-phi serve",
        description="Serve a Phi-3 GGUF model with OpenAI's API (/v1/chat/completions, "
        "/v1/completions, /v1/models), a chat page at / and /health.",
    )
    model = add_model_arguments(parser)
    model.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    model.add_argument(
        "--prefix-cache-bytes",
        type=int,
        default=1 << 30,
        help="bytes of ended requests' KV state kept for reuse (default: 1 GiB)",
    )
    model.add_argument(
        "--model-name", help="the model id clients see (default: the GGUF file's name)"
    )
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    net.add_argument("--port", type=int, default=8000, help="port (0: a free one; default 8000)")
    net.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none)",
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-concurrency",
        type=int,
        default=defaults.max_concurrency,
        help=f"requests generated at once, batched together (default {defaults.max_concurrency})",
    )
    limits.add_argument(
        "--max-queue",
        type=int,
        default=defaults.max_queue,
        help=f"requests waiting beyond those; more get 503 (default {defaults.max_queue})",
    )
    limits.add_argument(
        "--max-tokens", type=int, help="most tokens one request may generate (default: context)"
    )
    limits.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults.max_body_bytes,
        help=f"largest request body (default {defaults.max_body_bytes})",
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="log one line per request on stderr"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        import uvicorn

        from candle_phi.server import ServerSettings, create_app
    except ImportError as err:
        print(
            f"candle-phi: error: the server needs its extra ({err.name} is missing): "
            "pip install 'candle-phi[server]'",
            file=sys.stderr,
        )
        return EXIT_ERROR
    args = build_parser().parse_args(argv)
    memory.limit_arenas()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        generator = load_generator(
            args, n_threads=args.threads, prefix_cache_bytes=args.prefix_cache_bytes
        )
        settings = ServerSettings(
            model_name=args.model_name or generator.model_path.stem,
            api_key=args.api_key or None,
            max_concurrency=args.max_concurrency,
            max_queue=args.max_queue,
            max_tokens=args.max_tokens,
            max_body_bytes=args.max_body_bytes,
        )
    except (CandlePhiError, ValueError) as err:
        print(f"candle-phi: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    # Bound here, so that --port 0 can say which port it got before serving.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except (OSError, OverflowError) as err:  # OverflowError: a port beyond 65535
        print(
            f"candle-phi: error: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr
        )
        return EXIT_ERROR
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(
        f"candle-phi: serving {settings.model_name} on http://{shown}:{port}"
        + (" (API key required)" if settings.api_key else ""),
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        create_app(generator, settings),
        log_level="info" if args.verbose else "warning",
        access_log=False,  # ours logs one line per request when it ends
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return EXIT_OK
