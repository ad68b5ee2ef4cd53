"""Automatic KV prefix reuse in a multi-turn chat: candle-phi against llama.cpp, same run.

    python bench/chat_reuse.py            # 3 runs, 2 threads; writes bench/.out/chat_reuse.json
    python bench/chat_reuse.py --quick    # a ~300-token history, to try the script out

The chat: a system prompt and user/assistant turns of deterministic filler English, ~2,000
tokens of history, then a new ~30-token user message. Each run first plays the previous turn
as a trained model would (a ~40-token reply whose text tokenizes back to the same ids; see
previous_turn()), then times the first token of the reply to each of --turns new messages
(each after the same history). Cases, each a time to first token (TTFT), prompt included:

- no reuse: the whole conversation from scratch (candle-phi with prefix_cache_bytes=0,
  llama.cpp after reset()); over a minute per engine, so timed in --no-reuse-runs runs only.
- prefix reused: right after the previous turn on the same generator (candle-phi's prefix
  cache, at its default size) or the same Llama (generate() keeps the longest common prefix
  with what it evaluated last): only the tokens past that prefix are computed.
- new message alone: the ~30-token message as a conversation of its own, from scratch; what
  reuse should come close to.

The model is bench.py's (Phi-3-mini-4k-instruct's shapes, Q4_K_M mix, random weights, built
once). Both engines see the same token ids: candle-phi's chat template and tokenizer make them
and llama.cpp is fed the ids (llama.cpp's own template and tokenizer for this GGUF could
differ); llama.cpp evaluates the previous turn's same ids. candle-phi's TTFT
runs from the chat() call, template and tokenization included; llama.cpp's from generate()
on ids. Each engine runs in a fresh subprocess per run, engines alternating; figures are
median (min-max) over every sample of every run. llama-cpp-python is imported only in its
subprocess, run by --llama-python (default: /work/venv-llama/bin/python when it exists).
Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bench

if TYPE_CHECKING:
    from candle_phi import ChatMessage, GenerationOptions, Phi3Generator

LLAMA_VENV_PYTHON = Path("/work/venv-llama/bin/python")
CASES = [
    ("no_reuse", "history + new message, no reuse"),
    ("reuse", "history + new message, prefix reused"),
    ("alone", "new message alone"),
]
ENGINES = ["candle-phi", "llama.cpp"]

# --------------------------------------------------------------------------- the chat

# Common English words, for filler text.
WORD_LIST = """
the of and to in is that it for was on are as with his they at be this from have or by one
had not but what all were when we there can an your which their said if do will each about how
up out them then she many some so these would other into has more her two like him see time
could no make than first been its who now people my made over did down only way find use may
water long little very after words called just where most know get through back much go good
new write our me man too any day same right look think also around another came come work three
word must because does part even place well such here take why things help put years different
away again off went old number great tell men say small every found still between name should
home big give air line set own under read last never us left end along while might next sound
below saw something thought both few those always looked show large often together asked house
world going want school important until form food keep children feet land side without boy once
animals life enough took sometimes four head above kind began almost live page got earth need
far hand high year mother light parts country father let night following picture being study
second eyes soon times story boys since white days paper hard near sentence better best across
during today others however sure means knew try told young miles sun ways thing whole hear
example heard several change answer room sea against top turned learn point city play toward
"""
WORDS = WORD_LIST.split()


def filler(rng: random.Random, n_words: int, end: str = ".") -> str:
    """About `n_words` words of English-looking text, in sentences of 5 to 15 words."""
    sentences: list[str] = []
    count = 0
    while count < n_words:
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 15))]
        sentences.append(" ".join(words).capitalize() + end)
        count += len(words)
    return " ".join(sentences)


def fitted(rng: random.Random, size: Callable[[str], int], limit: int) -> str:
    """The longest question, cut from filler text at a word, whose size is at most `limit`
    (one word at least)."""
    words = filler(rng, 500, "?").split()

    def text(n: int) -> str:
        return " ".join(words[:n]).rstrip(".?") + "?"

    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(text(mid)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text(lo)


def build_chat(
    gen: Phi3Generator, history_tokens: int, reply_tokens: int, new_tokens: int, seed: int = 0
) -> tuple[list[ChatMessage], ChatMessage]:
    """The conversation up to the user message of the previous turn, sized so that its prompt
    plus a `reply_tokens` reply make `history_tokens`; and the new `new_tokens` user message.
    Deterministic: the same arguments and tokenizer give the same messages."""
    rng = random.Random(seed)

    def size(messages: list[ChatMessage]) -> int:
        return len(gen.tokenize(gen.apply_chat_template(messages)))

    budget = history_tokens - reply_tokens
    system = "You are a helpful assistant. " + filler(rng, max(10, budget // 25))
    messages: list[ChatMessage] = [{"role": "system", "content": system}]
    while True:
        user: ChatMessage = {"role": "user", "content": filler(rng, rng.randint(15, 60), "?")}
        reply: ChatMessage = {"role": "assistant", "content": filler(rng, rng.randint(40, 150))}
        if size([*messages, user, reply, {"role": "user", "content": "Why?"}]) > budget:
            break
        messages += [user, reply]
    last = fitted(rng, lambda t: size([*messages, {"role": "user", "content": t}]), budget)
    messages.append({"role": "user", "content": last})
    new = fitted(rng, lambda t: len(gen.tokenize(t, add_special_tokens=False)), new_tokens)
    return messages, {"role": "user", "content": new}


# --------------------------------------------------------------------------- workers


def greedy(max_tokens: int) -> GenerationOptions:
    """Greedy decoding, through end tokens."""
    return {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "repeat_penalty": 1.0}


def size_of(gen: Phi3Generator) -> Callable[[str], int]:
    return lambda text: len(gen.tokenize(text, add_special_tokens=False))


def samples(firsts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several first-token measurements of one case: their times, and the first's counts."""
    return {**firsts[0], "ttft_s": [float(f["ttft_s"]) for f in firsts]}


def candle_first_token(gen: Phi3Generator, messages: list[ChatMessage]) -> dict[str, Any]:
    start = time.perf_counter()
    with gen.chat(messages, **greedy(1)) as stream:
        stream.read()
        elapsed = time.perf_counter() - start
    return {
        "ttft_s": elapsed,
        "stream_ttft_s": stream.time_to_first_token,
        "prompt_tokens": stream.prompt_tokens,
        "cached_tokens": stream.cached_tokens,
        "prompt_ids": stream.prompt_token_ids,
    }


def previous_turn(
    gen: Phi3Generator, previous: list[ChatMessage], reply_tokens: int
) -> dict[str, Any]:
    """The previous turn as a real model plays it: the prompt, then a reply whose text
    tokenizes back to the ids generated (true of nearly every reply of a trained model, and
    of few of a random-weights model's, whose replies are odd tokens). So the reply is fixed
    filler text, and the state the turn leaves is its prompt and reply tokens, up to the
    sampled end token (never fed)."""
    reply = fitted(
        random.Random(1),
        lambda t: len(gen.tokenize(t, add_special_tokens=False)),
        reply_tokens,
    )
    message: ChatMessage = {"role": "assistant", "content": reply}
    prompt = gen.tokenize(gen.apply_chat_template(previous))
    full = gen.tokenize(gen.apply_chat_template([*previous, message], add_generation_prompt=False))
    end = gen.token_to_id("<|end|>")
    cut = max(i for i, t in enumerate(full) if t == end)
    if full[: len(prompt)] != prompt:
        raise RuntimeError("the template renders the history differently with the reply")
    return {"previous": prompt, "reply": full[len(prompt) : cut], "reply_message": message}


def work_candle(model: Path, tokenizer: Path, args: argparse.Namespace) -> dict[str, Any]:
    from candle_phi import Phi3Generator

    start = time.perf_counter()
    gen = Phi3Generator(model, tokenizer=tokenizer, n_threads=args.threads)  # default cache
    result: dict[str, Any] = {"load_s": time.perf_counter() - start}
    previous, new = build_chat(gen, args.history_tokens, args.reply_tokens, args.new_tokens)
    ids = previous_turn(gen, previous, args.reply_tokens)
    # The previous turn: its stream ends (closed by `with`), its state stays in the cache.
    start = time.perf_counter()
    with gen.generate(ids["previous"] + ids["reply"], **greedy(1)) as stream:
        stream.read()
    result["previous_turn"] = {
        "s": time.perf_counter() - start,
        "prompt_tokens": len(ids["previous"]),
        "reply_tokens": len(ids["reply"]),
    }
    reply = ids.pop("reply_message")
    news = [new] + [
        {"role": "user", "content": fitted(random.Random(1000 + i), size_of(gen), args.new_tokens)}
        for i in range(1, args.turns)
    ]
    # Each new turn after the same history: the history's state is reused every time.
    reuse = [candle_first_token(gen, [*previous, reply, n]) for n in news]
    del stream, gen  # the stream holds the generator: both go, and their memory

    gen = Phi3Generator(model, tokenizer=tokenizer, n_threads=args.threads, prefix_cache_bytes=0)
    with gen.generate([1, 300, 301, 302], **greedy(1)) as stream:
        stream.read()  # touch the weights
    alone = [candle_first_token(gen, [n]) for n in news]
    ids["finals"] = [r.pop("prompt_ids") for r in reuse]
    ids["alones"] = [r.pop("prompt_ids") for r in alone]
    result["reuse"], result["alone"] = samples(reuse), samples(alone)
    if args.no_reuse:
        no_reuse = candle_first_token(gen, [*previous, reply, new])
        if no_reuse.pop("prompt_ids") != ids["finals"][0]:
            raise RuntimeError("the same conversation gave two different prompts")
        result["no_reuse"] = samples([no_reuse])
    conversation = [*previous, reply, new]
    result["ids"] = ids
    result["messages"] = len(conversation)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def llama_first_token(llm: Any, ids: list[int]) -> dict[str, Any]:
    # generate() keeps the longest prefix that its last evaluation shares with the prompt,
    # short of the prompt's last token, and computes the rest.
    kept = common_prefix([int(t) for t in llm.input_ids[: llm.n_tokens]], ids[:-1])
    start = time.perf_counter()
    tokens = llm.generate(ids, temp=0.0, repeat_penalty=1.0)
    next(tokens)
    elapsed = time.perf_counter() - start
    tokens.close()
    return {"ttft_s": elapsed, "prompt_tokens": len(ids), "cached_tokens": kept}


def work_llama(model: Path, threads: int, ids: dict[str, Any], no_reuse: bool) -> dict[str, Any]:
    import llama_cpp  # type: ignore[import-not-found, unused-ignore]

    llm, load_s = bench.load_llama(model, threads, n_ctx=4096)
    result: dict[str, Any] = {"load_s": load_s}
    # The previous turn as candle-phi played it: its prompt and reply ids, evaluated.
    start = time.perf_counter()
    llm.eval(ids["previous"] + ids["reply"])  # the same state candle-phi's turn leaves
    result["previous_turn"] = {"s": time.perf_counter() - start}
    result["reuse"] = samples([llama_first_token(llm, final) for final in ids["finals"]])
    alone = []
    for prompt in ids["alones"]:
        llm.reset()
        alone.append(llama_first_token(llm, prompt))
    result["alone"] = samples(alone)
    if no_reuse:
        llm.reset()
        result["no_reuse"] = samples([llama_first_token(llm, ids["finals"][0])])
    result["version"] = llama_cpp.__version__
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# --------------------------------------------------------------------------- report


def measured(runs: list[dict[str, Any]], case: str) -> list[dict[str, Any]]:
    return [r[case] for r in runs if case in r]


def cached_summary(runs: list[dict[str, Any]], case: str) -> str:
    values = [int(m["cached_tokens"]) for m in measured(runs, case)]
    return str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def all_ttft(runs: list[dict[str, Any]], case: str) -> list[float]:
    """Every sample of `case`, all runs pooled."""
    return [t for m in measured(runs, case) for t in m["ttft_s"]]


def median_ttft(runs: list[dict[str, Any]], case: str) -> float:
    return statistics.median(all_ttft(runs, case))


def reusable_prefix(ids: dict[str, Any]) -> str:
    """What of the final prompt the previous turn's tokens (prompt and reply) begin."""
    previous, reply, final = ids["previous"], ids["reply"], ids["finals"][0]
    shared = common_prefix(previous + reply, final)
    line = f"Shared with the previous turn's tokens: the final prompt's first {shared} tokens"
    if shared < len(previous):
        return line + f", short of the previous turn's {len(previous)}-token prompt."
    if shared == len(previous) + len(reply):
        return line + " (the previous turn's prompt and all of its reply)."
    return line + (
        f" (the previous prompt and the first {shared - len(previous)} of the {len(reply)} "
        "reply tokens: the reply's text, tokenized again in the history, gives other ids "
        "from there, as a random-weights model's output often does)."
    )


def report(
    args: argparse.Namespace, model: Path, results: dict[str, list[dict[str, Any]]]
) -> tuple[list[str], dict[str, float]]:
    ours, theirs = results["candle-phi"], results.get("llama.cpp", [])
    first = ours[0]
    ids = first["ids"]
    previous, reply = len(ids["previous"]), len(ids["reply"])
    lines = [
        f"Machine: {bench.machine()}; {args.threads} threads; {args.runs} runs; model "
        f"{model.stat().st_size / 2**30:.2f} GiB (Phi-3-mini shapes, Q4_K_M mix, random "
        "weights).",
        f"Chat: {first['messages']} messages; history {previous + reply} tokens (the previous "
        f"turn's prompt {previous} + its reply {reply}); new user message "
        f"{len(ids['alones'][0])} tokens alone, {len(ids['finals'][0])} with the history "
        f"({args.turns} new messages of about that size per run, each after the same history).",
        reusable_prefix(ids),
        "",
        "| case | prompt tokens | candle-phi TTFT (s) | cached | "
        "llama-cpp-python TTFT (s) | cached |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for case, label in CASES:
        cells = [label, str(first[case]["prompt_tokens"])]
        for runs in (ours, theirs):
            if runs and all_ttft(runs, case):
                ttft = all_ttft(runs, case)
                cells += [f"{bench.summary(ttft)} n={len(ttft)}", cached_summary(runs, case)]
            else:
                cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")

    ratios = {"candle_reuse_over_alone": median_ttft(ours, "reuse") / median_ttft(ours, "alone")}
    ratios["candle_no_reuse_over_reuse"] = median_ttft(ours, "no_reuse") / median_ttft(
        ours, "reuse"
    )

    def verdict(value: float, target: float) -> str:
        return f"{value:.2f} (target <= {target}: {'met' if value <= target else 'MISSED'})"

    lines += [
        "",
        "Ratios of medians:",
        "- candle-phi reuse TTFT / new message alone TTFT: "
        + verdict(ratios["candle_reuse_over_alone"], 1.5),
    ]
    if theirs:
        ratios["llama_reuse_over_alone"] = median_ttft(theirs, "reuse") / median_ttft(
            theirs, "alone"
        )
        ratios["candle_reuse_over_llama_reuse"] = median_ttft(ours, "reuse") / median_ttft(
            theirs, "reuse"
        )
        ratios["llama_no_reuse_over_reuse"] = median_ttft(theirs, "no_reuse") / median_ttft(
            theirs, "reuse"
        )
        lines += [
            f"  (llama-cpp-python: {ratios['llama_reuse_over_alone']:.2f})",
            "- candle-phi reuse TTFT / llama-cpp-python reuse TTFT: "
            + verdict(ratios["candle_reuse_over_llama_reuse"], 1.0),
        ]
    speedup = ratios["candle_no_reuse_over_reuse"]
    speedup_line = f"- speed-up from reuse (no reuse / reuse): candle-phi {speedup:.1f}x"
    if theirs:
        speedup_line += f", llama-cpp-python {ratios['llama_no_reuse_over_reuse']:.1f}x"
    lines.append(speedup_line)
    if theirs:
        lines.append(f"llama-cpp-python {theirs[0]['version']}.")
    return lines, ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--history-tokens", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--reply-tokens", type=int, default=40)
    parser.add_argument(
        "--turns", type=int, default=5, help="new messages timed per run (default %(default)s)"
    )
    parser.add_argument(
        "--no-reuse-runs",
        type=int,
        default=1,
        help="runs that also time the whole conversation without reuse, which takes over a "
        "minute per engine (default %(default)s)",
    )
    parser.add_argument("--no-reuse", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick", action="store_true", help="a ~300-token history (overrides --history-tokens)"
    )
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument(
        "--llama-python",
        default=str(LLAMA_VENV_PYTHON) if LLAMA_VENV_PYTHON.exists() else sys.executable,
        help="the Python that has llama_cpp (default: %(default)s)",
    )
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.history_tokens = 300
    if args.worker == "candle-phi":
        print(json.dumps(work_candle(args.model, args.tokenizer, args)))
        return 0
    if args.worker == "llama.cpp":
        print(json.dumps(work_llama(args.model, args.threads, json.load(sys.stdin), args.no_reuse)))
        return 0

    model, tokenizer = bench.make_model()
    bench.read_through(model)  # both engines memory-map the file: neither pays the disk
    engines = ENGINES[:1] if args.skip_llama else ENGINES
    results: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    ids: dict[str, list[int]] = {}
    for run in range(args.runs):
        # candle-phi first in the first run: llama.cpp replays the chat from its token ids.
        for engine in engines if run % 2 == 0 else engines[::-1]:
            python = sys.executable if engine == "candle-phi" else args.llama_python
            command = [python, __file__, "--worker", engine, "--model", str(model)]
            command += ["--tokenizer", str(tokenizer), "--threads", str(args.threads)]
            command += ["--history-tokens", str(args.history_tokens)]
            command += ["--new-tokens", str(args.new_tokens)]
            command += ["--reply-tokens", str(args.reply_tokens), "--turns", str(args.turns)]
            if run < args.no_reuse_runs:
                command.append("--no-reuse")
            stdin = json.dumps(ids) if engine == "llama.cpp" else None
            result = bench.run_json(command, stdin=stdin, timeout=3600)
            if engine == "candle-phi":
                if not ids:
                    ids = result["ids"]
                elif result["ids"] != ids:
                    print("warning: candle-phi's ids differ from run 1's", file=sys.stderr)
            results[engine].append(result)
            times = ", ".join(
                f"{case} {statistics.median(result[case]['ttft_s']):.2f} s "
                f"({result[case]['cached_tokens']} cached)"
                for case, _ in CASES
                if case in result
            )
            print(f"run {run + 1}/{args.runs} {engine}: {times}", file=sys.stderr)

    lines, ratios = report(args, model, results)
    print("\n".join(lines))
    for runs in results.values():
        for result in runs[1:]:
            result.pop("ids", None)  # the first run's ids stand for all
    document = {
        "machine": bench.machine(),
        "threads": args.threads,
        "runs": args.runs,
        "history_tokens": args.history_tokens,
        "new_tokens": args.new_tokens,
        "reply_tokens": args.reply_tokens,
        "model": str(model),
        "results": results,
        "ratios": ratios,
        "report": lines,
    }
    (bench.OUT / "chat_reuse.json").write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
