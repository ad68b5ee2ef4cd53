"""``python -m candle_phi`` / ``candle-phi``: a prompt in, streamed text out.

Only generated text goes to stdout. Our errors print one line on stderr and exit 1, usage
errors exit 2 (argparse), Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from candle_phi import CandlePhiError, Phi3Generator, __version__

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="candle-phi",
        description="Generate text with a quantized Phi-3 GGUF model on Candle.",
    )
    parser.add_argument(
        "prompt", nargs="?", help="the prompt; read from stdin when left out and stdin is piped"
    )
    parser.add_argument("--version", action="version", version=f"candle-phi {__version__}")
    parser.add_argument(
        "--raw", action="store_true", help="send the prompt as is, without the chat format"
    )

    model = parser.add_argument_group("model")
    model.add_argument("--model", help="local GGUF file (default: fetched from the hub)")
    model.add_argument("--tokenizer", help="local tokenizer.json")
    model.add_argument("--repo", default=None, help="hub repo of the GGUF")
    model.add_argument("--file", default=None, help="GGUF file name in --repo")
    model.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--top-k", type=int, default=40)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--repeat-penalty", type=float, default=1.1)
    gen.add_argument("--repeat-last-n", type=int, default=64)
    return parser


def load_generator(args: argparse.Namespace) -> Phi3Generator:
    hub: dict[str, Any] = {
        key: value
        for key, value in (
            ("repo_id", args.repo),
            ("filename", args.file),
            ("revision", args.revision),
        )
        if value is not None
    }
    return Phi3Generator(args.model, tokenizer=args.tokenizer, progress=True, **hub)


def generation_params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "repeat_penalty": args.repeat_penalty,
        "repeat_last_n": args.repeat_last_n,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            parser.error("give a prompt, or pipe one on stdin")
        prompt = sys.stdin.read()
    try:
        generator = load_generator(args)
        text = prompt if args.raw else f"<|user|>\n{prompt}<|end|>\n<|assistant|>\n"
        for piece in generator.generate(text, **generation_params(args)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except CandlePhiError as err:
        print(f"candle-phi: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return EXIT_INTERRUPTED
    return 0
