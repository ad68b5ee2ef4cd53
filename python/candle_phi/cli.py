"""``python -m candle_phi`` / ``candle-phi``: a prompt in, streamed text out; or a chat.

Only generated text goes to stdout; prompts, metrics and errors go to stderr. Exit codes:
0 success, 1 one of our errors (one line on stderr), 2 usage error, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from candle_phi import CandlePhiError, Phi3Generator, TokenStream, __version__
from candle_phi.types import ChatMessage

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

CHAT_HELP = """commands:
  /clear              forget the conversation (the system message stays)
  /system TEXT        set the system message
  /set PARAM VALUE    change a generation parameter (e.g. /set temperature 0.2)
  /exit               leave (or Ctrl-D)
  \"\"\"                 start and end multi-line input
Ctrl-C stops the current reply."""


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type that also accepts 'none'."""

    def convert(text: str) -> Any:
        return None if text.lower() == "none" else parse(text)

    convert.__name__ = parse.__name__
    return convert


# Generation parameters: name -> (argparse type, default). Shared by flags and /set.
PARAMETERS: dict[str, tuple[Callable[[str], Any], Any]] = {
    "max_tokens": (_optional(int), 256),
    "temperature": (float, 0.8),
    "top_p": (_optional(float), 0.95),
    "top_k": (_optional(int), 40),
    "min_p": (float, 0.0),
    "seed": (_optional(int), None),
    "repeat_penalty": (float, 1.1),
    "repeat_last_n": (int, 64),
    "presence_penalty": (float, 0.0),
    "frequency_penalty": (float, 0.0),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="candle-phi",
        description="Generate text with a quantized Phi-3 GGUF model on Candle.",
        epilog="With no prompt and a terminal on stdin, a chat starts. "
        "'candle-phi serve --help': the OpenAI-compatible server.",
    )
    parser.add_argument("prompt", nargs="?", help="the prompt; read from stdin when piped")
    parser.add_argument("--version", action="version", version=f"candle-phi {__version__}")
    mode = parser.add_argument_group("mode")
    mode.add_argument("--chat", action="store_true", help="an interactive chat on stdin")
    mode.add_argument("--system", help="a system message for the conversation")
    mode.add_argument(
        "--raw", action="store_true", help="send the prompt as is, without the chat template"
    )
    mode.add_argument(
        "--verbose", "-v", action="store_true", help="print load and speed figures on stderr"
    )

    add_model_arguments(parser)

    gen = parser.add_argument_group("generation")
    for name, (parse, default) in PARAMETERS.items():
        gen.add_argument(
            "--" + name.replace("_", "-"),
            type=parse,
            default=default,
            metavar=parse.__name__.upper(),
            help=f"default: {default}",
        )
    gen.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)"
    )
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The flags that say which model to load (shared with `candle-phi serve`)."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="local GGUF file (default: from the Hugging Face hub)")
    model.add_argument("--tokenizer", help="local tokenizer.json")
    model.add_argument("--repo", help="hub repo of the GGUF")
    model.add_argument("--file", help="GGUF file name in --repo, or a glob such as '*q4.gguf'")
    model.add_argument("--revision", help="hub revision: branch, tag or commit")
    model.add_argument(
        "--kv-cache-type",
        choices=["f16", "q8_0", "f32"],
        default="f16",
        help="how keys and values are kept: f16 (default, 2 bytes a value), q8_0 (8-bit "
        "blocks, 1.125 bytes, slightly less exact) or f32 (4 bytes)",
    )
    model.add_argument(
        "--no-repack-weights",
        dest="repack_weights",
        action="store_false",
        help="read every matrix from the mapped file instead of repacking the Q4_K ones "
        "eight rows to a block at load (faster products, same memory; off: instant load, "
        "pages shared between processes)",
    )
    return model


def load_generator(args: argparse.Namespace, **options: Any) -> Phi3Generator:
    """The generator `add_model_arguments`' flags name, with Phi3Generator's `options`."""
    flags = {"repo_id": args.repo, "filename": args.file, "revision": args.revision}
    hub = {key: value for key, value in flags.items() if value is not None}
    # A download draws a progress bar on stderr when it is a terminal (the default).
    return Phi3Generator(
        args.model,
        tokenizer=args.tokenizer,
        kv_cache_type=args.kv_cache_type,
        repack_weights=args.repack_weights,
        **hub,
        **options,
    )


def stream_to(out: TextIO, stream: Iterator[str]) -> None:
    for piece in stream:
        out.write(piece)
        out.flush()


def report(stream: TokenStream, generator: Phi3Generator) -> None:
    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f} tokens/s"

    ttft = stream.time_to_first_token
    print(
        f"[load {generator.load_time:.2f} s, {generator.kv_cache_type} KV cache | "
        f"prompt {stream.prompt_tokens} tokens "
        f"({stream.cached_tokens} cached), "
        f"{rate(stream.prompt_tokens_per_second)} | generated {stream.generated_tokens} tokens, "
        f"{rate(stream.generation_tokens_per_second)} | first token "
        f"{'n/a' if ttft is None else f'{ttft:.2f} s'} | {stream.finish_reason}]",
        file=sys.stderr,
    )


def system_messages(system: str | None) -> list[ChatMessage]:
    return [{"role": "system", "content": system}] if system else []


def one_shot(generator: Phi3Generator, args: argparse.Namespace, prompt: str) -> int:
    params = {name: getattr(args, name) for name in PARAMETERS}
    if args.raw:
        stream = generator.generate(prompt, stop=args.stop, **params)
    else:
        messages: list[ChatMessage] = [
            *system_messages(args.system),
            {"role": "user", "content": prompt},
        ]
        stream = generator.chat(messages, stop=args.stop, **params)
    try:
        stream_to(sys.stdout, stream)
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if args.verbose:
        report(stream, generator)
    return EXIT_OK


def read_turn(stdin: TextIO) -> str | None:
    """One user turn: a line, or several between lines of triple quotes. None at EOF."""
    print(">>> ", end="", file=sys.stderr, flush=True)
    line = stdin.readline()
    if not line:
        return None
    line = line.rstrip("\n")
    if not line.startswith('"""'):
        return line
    lines = [line[3:]]
    while not lines[-1].endswith('"""'):
        print("... ", end="", file=sys.stderr, flush=True)
        more = stdin.readline()
        if not more:
            break
        lines.append(more.rstrip("\n"))
    text = "\n".join(lines)
    return text[:-3] if text.endswith('"""') else text


def set_parameter(params: dict[str, Any], stops: list[str], command: str) -> None:
    parts = command.split(maxsplit=2)
    if len(parts) != 3:
        raise ValueError("usage: /set PARAM VALUE")
    _, name, value = parts
    name = name.replace("-", "_")
    if name == "stop":
        stops[:] = [] if value.lower() == "none" else [value.encode().decode("unicode_escape")]
        return
    if name not in PARAMETERS:
        raise ValueError(f"unknown parameter {name!r}; one of: stop, {', '.join(PARAMETERS)}")
    params[name] = PARAMETERS[name][0](value)


def chat(generator: Phi3Generator, args: argparse.Namespace) -> int:
    params = {name: getattr(args, name) for name in PARAMETERS}
    stops: list[str] = list(args.stop)
    system = args.system
    history: list[ChatMessage] = []
    if sys.stdin.isatty():
        print(f"candle-phi {__version__} chat. /help for commands.", file=sys.stderr)
    while True:
        try:
            text = read_turn(sys.stdin)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if text is None or text.strip() in ("/exit", "/quit"):
            return EXIT_OK
        command = text.strip()
        if command.startswith("/"):
            try:
                if command == "/help":
                    print(CHAT_HELP, file=sys.stderr)
                elif command == "/clear":
                    history.clear()
                elif command.startswith("/system"):
                    system = command[len("/system") :].strip() or None
                elif command.startswith("/set"):
                    set_parameter(params, stops, command)
                else:
                    unknown = command.split()[0]
                    print(f"unknown command {unknown}; /help lists them", file=sys.stderr)
            except ValueError as err:
                print(f"candle-phi: {err}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        reply: list[str] = []
        error: CandlePhiError | None = None
        stream: TokenStream | None = None
        try:
            stream = generator.chat([*system_messages(system), *history], stop=stops, **params)
            for piece in stream:
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # stops this reply only; what was shown stays in the conversation
        except CandlePhiError as err:
            error = err
        finally:
            if stream is not None:
                # Hands the conversation's state to the generator now, so that the next
                # turn (even after Ctrl-C) computes only its new tokens.
                stream.close()
        if reply or error is None:
            sys.stdout.write("\n")  # ends the reply's line; stdout holds replies only
            sys.stdout.flush()
        if error is not None:
            history.pop()
            print(f"candle-phi: error: {error}", file=sys.stderr)
            continue
        if args.verbose and stream is not None:
            report(stream, generator)
        history.append({"role": "assistant", "content": "".join(reply)})


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # at any moment, handling one of our errors included
        return EXIT_INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from candle_phi.server.cli import main as serve

        return serve(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    interactive = args.chat or (args.prompt is None and sys.stdin.isatty())
    prompt = args.prompt
    if not interactive and prompt is None:
        prompt = sys.stdin.read()
    try:
        generator = load_generator(args)
        if args.verbose:
            print(f"[loaded {generator!r} in {generator.load_time:.2f} s]", file=sys.stderr)
        if interactive:
            return chat(generator, args)
        return one_shot(generator, args, prompt)
    except CandlePhiError as err:
        print(f"candle-phi: error: {err}", file=sys.stderr)
        return EXIT_ERROR
