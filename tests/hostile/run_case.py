"""The child process of the hostile-input corpus: runs cases against the real candle_phi API
and reports each outcome on stdout.

Input (stdin, one JSON object)::

    {"budget": BYTES, "imports": [MODULE, ...], "files": {"MODEL": PATH, ...},
     "setup": CODE or null, "cases": [{"id": ID, "code": CODE}, ...]}

Right after importing candle_phi (and ``imports``, e.g. numpy for cases that pass numpy
scalars), before touching any input, the child caps its own address space (RLIMIT_AS) at
what it has mapped so far plus ``budget``: the limit covers everything a case does, and
nothing it needs to start. ``setup`` (e.g. loading the model that a batch of argument cases
shares) runs once, then each case's ``code`` runs with ``exec`` in a namespace holding the
names below.

Before a case the child prints ``hostile-case: {"start": ID}``, after it
``hostile-case: {"id": ID, "outcome": OUTCOME, "seconds": S, ...}``. OUTCOME is ``ok``,
``error`` (a ``candle_phi.CandlePhiError``), ``panic`` (``pyo3_runtime.PanicException``),
``oom`` (``MemoryError``) or ``foreign`` (any other exception). A crash or a hang shows as a
start without a result; the parent tells which it was.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import candle_phi
from candle_phi import CandlePhiError, ChatMessage, Phi3Generator

PREFIX = "hostile-case: "

PROMPT = "<|user|>\nWrite a haiku about ice hockey<|end|>\n<|assistant|>\n"
MESSAGES: list[ChatMessage] = [
    {"role": "system", "content": "You are a poet."},
    {"role": "user", "content": "Write a haiku about ice hockey"},
]


def address_space() -> int:
    """Bytes of address space this process has mapped (VmSize)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def each(*calls: Callable[[], object]) -> None:
    """Runs every call, even after one raised a candle_phi error (re-raised at the end, the
    first one); any other exception propagates at once."""
    first: CandlePhiError | None = None
    for call in calls:
        try:
            call()
        except CandlePhiError as error:
            first = first or error
    if first is not None:
        raise first


def first_tokens(gen: Phi3Generator) -> None:
    """What a user does first with a freshly loaded model: a few tokens, greedy and
    sampled, through generate and chat, and the tokenizer both ways."""
    each(
        lambda: gen.generate(PROMPT, max_tokens=2, temperature=0).read(),
        lambda: gen.generate("Hello world", max_tokens=2, seed=1).read(),
        lambda: gen.chat(MESSAGES, max_tokens=2, seed=1).read(),
        lambda: gen.detokenize(gen.tokenize("Hello <|end|> world")),
    )


def chat_both_ways(gen: Phi3Generator) -> None:
    """The chat template rendered as text, then used: the first token of a reply."""
    each(
        lambda: gen.apply_chat_template(MESSAGES),
        lambda: next(gen.chat(MESSAGES, max_tokens=1, seed=1), None),
    )


# Hostile objects the argument cases pass.


class HugeLen:
    """A sequence that claims sys.maxsize items but holds three."""

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> int:
        if index < 3:
            return 1
        raise IndexError(index)

    def __iter__(self) -> Iterator[int]:
        return iter([1, 1, 1])


class StrSubclass(str):
    """A str subclass whose str() is something else."""

    def __str__(self) -> str:
        return "\ud800"


def outcome_of(exc: BaseException) -> dict[str, str]:
    cls = type(exc)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(exc, CandlePhiError):
        outcome = "error"
    elif name == "pyo3_runtime.PanicException":
        outcome = "panic"
    elif isinstance(exc, MemoryError):
        outcome = "oom"
    else:
        outcome = "foreign"
    try:
        message = str(exc)
    except Exception as err:  # a message that cannot be shown is still a result
        message = f"<str() raised {type(err).__name__}>"
    return {"outcome": outcome, "exception": name, "message": message[:500]}


def report(record: dict[str, Any]) -> None:
    # ensure_ascii: a message may hold lone surrogates, which stdout cannot encode.
    print(PREFIX + json.dumps(record, ensure_ascii=True), flush=True)


def main() -> int:
    job = json.load(sys.stdin)
    modules = {name: importlib.import_module(name) for name in job["imports"]}
    limit = address_space() + job["budget"]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    namespace: dict[str, Any] = {
        **modules,
        **job["files"],
        "candle_phi": candle_phi,
        "Phi3Generator": Phi3Generator,
        "PROMPT": PROMPT,
        "MESSAGES": MESSAGES,
        "each": each,
        "first_tokens": first_tokens,
        "chat_both_ways": chat_both_ways,
        "HugeLen": HugeLen,
        "StrSubclass": StrSubclass,
        "pathlib": pathlib,
    }
    if job["setup"]:
        exec(job["setup"], namespace)
    for case in job["cases"]:
        report({"start": case["id"]})
        result: dict[str, Any] = {"id": case["id"], "outcome": "ok"}
        start = time.monotonic()
        try:
            exec(case["code"], dict(namespace))
        except BaseException as exc:
            result |= outcome_of(exc)
        report(result | {"seconds": round(time.monotonic() - start, 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
