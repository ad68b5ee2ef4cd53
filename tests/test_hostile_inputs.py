"""Hostile inputs: malformed GGUFs, tokenizer files and chat templates, and every argument at
its edge values, never crash, hang, panic, run out of memory, or raise an exception outside
the candle_phi hierarchy (issue 9, items 2 and 7).

The corpus is tests/hostile/cases.py (malformed GGUFs come from tests/hostile/
gguf_mutations.py, with fixed seeds). Each case runs in a child process
(tests/hostile/run_case.py) under a time limit and an address-space limit (RLIMIT_AS); the
cases that share a loaded model run as a batch in one child, and whatever a crash or hang cut
short runs again, the case in flight alone. A case passes when it returns or raises a
candle_phi error; the tests list every other case with its outcome and the tail of its
stderr. ``pytest -s`` also prints a table of outcomes per category.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import phi3_fixtures as fx
import pytest

sys.path.insert(0, str(Path(__file__).parent / "hostile"))

import cases as corpus
import run_case
from cases import Case

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="the limits need Linux: RLIMIT_AS and /proc/self/status"
)

SEED = 97  # issue 9, item 7
# A case still running after this long hangs. Generous on purpose: CI machines are shared
# and noisy, and this catches hangs; it is not a speed assertion (a valid case takes well
# under a second).
CASE_TIMEOUT_S = 30
# Issue 9, item 2: before its first token, loading a GGUF allocates no more than the file's
# size plus this fixed overhead, which covers the tokenizer, a few tokens' KV cache and
# activations, thread stacks and allocator arenas. Every child's address space is capped at
# what it has mapped after `import candle_phi` plus the model file's size plus this.
LOAD_OVERHEAD_BYTES = 512 * 2**20
WORKERS = 2  # CI machines have two cores

PASSING = ("ok", "error")  # returned, or raised a candle_phi error
FAILING = ("crash", "hang", "panic", "oom", "foreign", "harness")
RUN_CASE = Path(run_case.__file__)
# Lines of a child's stderr that say why it died.
TELLING = ("panicked at", "memory allocation of", "overflowed its stack", "Fatal Python error")


@dataclass(frozen=True)
class Result:
    case: Case
    outcome: str  # one of PASSING or FAILING
    detail: str  # the exception and its message, or how the process ended
    stderr: str = ""
    seconds: float | None = None  # how long the case ran, when it reported

    def describe(self) -> str:
        """The case, its outcome, and its stderr: the lines that say what happened (a Rust
        panic or allocation failure, a fatal error), then the last few."""
        lines = self.stderr.strip().splitlines()
        telling = [i for i, line in enumerate(lines) if any(m in line for m in TELLING)]
        shown = sorted({*telling[:3], *range(max(len(lines) - 4, 0), len(lines))})
        stderr = [f"    | {lines[i][:200]}" for i in shown]
        return "\n".join([f"{self.case.id}: {self.outcome}: {self.detail}", *stderr])


# Inputs that once crashed, hung or exhausted memory: the corpus must keep them.
KNOWN_HOSTILE = (
    "gguf/alignment/0",
    "gguf/hyperparameters/block_count_2^32",
    "gguf/hyperparameters/block_count_10^12",
    "gguf/dims/embedding_product_past_2^64",
    "gguf/lengths/array_of_1000000000_U8",
    "gguf/lengths/string_value_length_u64_max",
    "gguf/tensor_types/Q4_K_rows_of_64",
    "gguf/tensor_types/kquant_attn_output_Q8_K",
    "gguf/dims/embedding_bytes_wrap_to_0_F32",
    "template/nested_loops_10^10",
    "template/special_tokens_10^5",
    "template/doubling_string_64_times",
    "template/doubling_list_64_times",
    "args/chat/gen.chat([{'role': 'user', 'content': 'hi'}] * 10_000, max_tokens=2, seed=0).read()",
    "args/generate/gen.generate('\\ud800', max_tokens=2, seed=0).read()",
    "args/generate/gen.generate(PROMPT, max_tokens=2, seed=0, stop='\\ud800').read()",
    "args/chat/gen.chat([{'role': 'user', 'content': '\\ud800'}], max_tokens=2, seed=0).read()",
    "args/tokenize/gen.tokenize('\\ud800')",
)

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hostile_corpus(
    tmp_path_factory: pytest.TempPathFactory, model_path: Path, tokenizer_path: Path
) -> list[Case]:
    kquant = tmp_path_factory.mktemp("hostile") / "kquant.gguf"
    config = fx.TinyPhi3Config(
        hidden_size=256,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=256,
        context_length=512,
        original_context_length=128,
        rope_factors=True,
        tied_embeddings=True,
        sliding_window=64,
    )
    fx.write_phi3_gguf(kquant, config, seed=5, weight_type="Q4_K")
    return corpus.build_corpus(corpus.Fixtures(model_path, kquant, tokenizer_path), SEED)


@pytest.fixture(scope="module")
def results(
    hostile_corpus: list[Case],
    tmp_path_factory: pytest.TempPathFactory,
    model_path: Path,
    tokenizer_path: Path,
) -> list[Result]:
    runner = Runner(tmp_path_factory.mktemp("hostile-runs"), model_path, tokenizer_path)
    start = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        done = [r for job in pool.map(runner.run_job, jobs(hostile_corpus)) for r in job]
    print(f"\n{summary(done)}\n{len(done)} cases in {time.monotonic() - start:.0f} s")
    assert sorted(r.case.id for r in done) == sorted(c.id for c in hostile_corpus)
    return done


# --------------------------------------------------------------------------- tests


def test_the_corpus_covers_the_issue(hostile_corpus: list[Case]) -> None:
    assert len(hostile_corpus) >= 300
    categories = {case.category for case in hostile_corpus}
    required = {
        "gguf/truncation", "gguf/magic", "gguf/version", "gguf/counts", "gguf/lengths",
        "gguf/value_types", "gguf/tensor_types", "gguf/dims", "gguf/offsets",
        "gguf/alignment", "gguf/hyperparameters", "gguf/header_flips", "gguf/data_flips",
        "tokenizer", "template", "args/generate", "args/chat", "args/apply_chat_template",
        "args/tokenize", "args/detokenize", "args/token_to_id", "args/logits",
        "args/constructor",
    }  # fmt: skip
    assert required <= categories, sorted(required - categories)
    ids = {case.id for case in hostile_corpus}
    assert set(KNOWN_HOSTILE) <= ids, sorted(set(KNOWN_HOSTILE) - ids)


def test_valid_inputs_succeed_under_the_same_limits(results: list[Result]) -> None:
    """The controls: if these fail, the limits or the harness are wrong."""
    failed = [r for r in results if r.case.must_succeed and r.outcome != "ok"]
    assert not failed, report(failed, results)


def test_loading_needs_no_more_than_the_file_size_plus_a_fixed_overhead(
    results: list[Result],
) -> None:
    """Issue 9, item 2: no malformed GGUF makes loading allocate past the limit."""
    failed = [r for r in results if r.case.category.startswith("gguf/") and r.outcome == "oom"]
    assert not failed, report(failed, results)


@pytest.mark.parametrize("group", ["gguf", "tokenizer", "template", "args"])
def test_no_crash_hang_panic_oom_or_foreign_exception(group: str, results: list[Result]) -> None:
    failed = [r for r in results if r.case.category.split("/")[0] == group and r.outcome in FAILING]
    assert not failed, report(failed, results)


# --------------------------------------------------------------------------- running


# The classes a hostile file may raise. A broken model file is a load error, never a
# generation error (issue 9, item 4), with three exceptions that are the right diagnosis: a
# token list that is not the tokenizer's (TokenizerError), a context too short for the
# request (ContextLengthError), and weights that load but compute NaN or infinity
# (GenerationError saying so). A broken tokenizer file is the tokenizer's error.
NON_FINITE = "non-finite logits"
EXPECTED_CLASSES = {
    "gguf": ("ModelLoadError", "TokenizerError", "ContextLengthError"),
    "tokenizer": ("TokenizerError", "ModelLoadError"),
    "template": ("TokenizerError", "InvalidArgumentError", "ContextLengthError"),
}


@pytest.mark.parametrize("group", sorted(EXPECTED_CLASSES))
def test_rejected_files_raise_the_class_of_their_fault(group: str, results: list[Result]) -> None:
    expected = EXPECTED_CLASSES[group]

    def right_class(detail: str) -> bool:
        name = detail.split(":")[0].removeprefix("candle_phi.")
        return name in expected or (name == "GenerationError" and NON_FINITE in detail)

    wrong = [
        r
        for r in results
        if r.case.category.split("/")[0] == group
        and r.outcome == "error"
        and not right_class(r.detail)
    ]
    assert not wrong, f"{len(wrong)} {group} cases raised another class than {expected}:\n" + (
        "\n".join(r.describe() for r in wrong)
    )


def jobs(cases: Iterable[Case]) -> list[list[Case]]:
    """Batches first (they take longest), then every other case alone."""
    batches: dict[str, list[Case]] = defaultdict(list)
    alone = []
    for case in cases:
        if case.batch is None:
            alone.append([case])
        else:
            batches[case.batch].append(case)
    return [*batches.values(), *alone]


class Runner:
    """Runs jobs (lists of cases that share files) in child processes."""

    def __init__(self, work: Path, model: Path, tokenizer: Path) -> None:
        self.work = work
        self.model = model
        self.tokenizer = tokenizer
        hub = work / "empty-hf-cache"
        hub.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        self.env |= {
            # No network, and nothing cached: a hub source fails at once.
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_CACHE": str(hub),
            "HF_HOME": str(hub),
            "HF_ENDPOINT": "http://127.0.0.1:9",
            "RUST_BACKTRACE": "0",  # the panic message ends stderr, not a backtrace
            # glibc reserves 64 MiB of address space per malloc arena (one per thread, up to
            # 8 per core), none of it used: with two, a valid tiny model peaks ~140 MiB above
            # the baseline, against ~420 MiB with the default.
            "MALLOC_ARENA_MAX": "2",
            # Each thread's stack counts too: two threads, whatever the machine's cores.
            "RAYON_NUM_THREADS": "2",
            "OPENBLAS_NUM_THREADS": "1",
        }

    def run_job(self, cases: list[Case]) -> list[Result]:
        """Makes the job's files (the cases of a job share them) and runs it."""
        folder = Path(tempfile.mkdtemp(dir=self.work))
        try:
            files = {"MODEL": self.model, "TOKENIZER": self.tokenizer}
            for name, make, filename in (
                ("MODEL", cases[0].model, "model.gguf"),
                ("TOKENIZER", cases[0].tokenizer, "tokenizer.json"),
            ):
                if make is not None:
                    files[name] = folder / filename
                    make(files[name])
            model = files["MODEL"]
            model_size = model.stat().st_size if model.is_file() else 0
            paths = {name: str(path) for name, path in files.items()}
            return self.run(cases, paths, model_size + LOAD_OVERHEAD_BYTES)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def run(self, cases: list[Case], files: dict[str, str], budget: int) -> list[Result]:
        """Runs the cases in one child. When it dies or hangs, the case in flight runs again
        alone (in a batch, the batch's setup first) and decides; the cases not yet started
        run on in a new child."""
        job = {
            "budget": budget,
            "imports": sorted({module for case in cases for module in case.imports}),
            "files": files,
            "setup": corpus.LOAD if cases[0].batch is not None else None,
            "cases": [{"id": case.id, "code": case.code} for case in cases],
        }
        stdout, stderr, ending = self.child(json.dumps(job))
        started: list[str] = []
        reports: dict[str, dict[str, Any]] = {}
        for line in stdout.splitlines():
            if line.startswith(run_case.PREFIX):
                record = json.loads(line.removeprefix(run_case.PREFIX))
                if "start" in record:
                    started.append(record["start"])
                else:
                    reports[record["id"]] = record
        results = [
            Result(
                case,
                reports[case.id]["outcome"],
                describe_exception(reports[case.id]),
                seconds=reports[case.id]["seconds"],
            )
            for case in cases
            if case.id in reports
        ]
        unfinished = [case for case in cases if case.id not in reports]
        if not unfinished:
            return results
        in_flight = next((case for case in unfinished if case.id in started), None)
        if in_flight is None:
            # The child died before its first case: at start-up, or loading a batch's model.
            why = f"the child ended before the first case ({ending[0]}: {ending[1]})"
            return results + [Result(case, "harness", why, stderr) for case in unfinished]
        if len(cases) > 1:
            results += self.run([in_flight], files, budget)
        else:
            results.append(Result(in_flight, *ending, stderr))
        rest = [case for case in unfinished if case is not in_flight]
        if rest:
            results += self.run(rest, files, budget)
        return results

    def child(self, job: str) -> tuple[str, str, tuple[str, str]]:
        """Runs run_case.py: its stdout, its stderr, and how it ended (outcome, detail)."""
        command = [sys.executable, "-X", "faulthandler", str(RUN_CASE)]
        try:
            done = subprocess.run(
                command,
                input=job,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=CASE_TIMEOUT_S,
                env=self.env,
                cwd=self.work,
            )
        except subprocess.TimeoutExpired as timeout:
            stdout, stderr = (as_text(out) for out in (timeout.stdout, timeout.stderr))
            return stdout, stderr, ("hang", f"still running after {CASE_TIMEOUT_S} s")
        return done.stdout, done.stderr, ending_of(done.returncode, done.stderr)


def as_text(output: str | bytes | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def ending_of(returncode: int, stderr: str) -> tuple[str, str]:
    """Why a child that did not report its case ended: (outcome, detail)."""
    if returncode < 0:
        how = f"killed by {signal.Signals(-returncode).name}"
    else:
        how = f"exit status {returncode}"
    if "memory allocation of" in stderr or "MemoryError" in stderr:
        return "oom", f"{how}: an allocation failed"
    if "panicked at" in stderr:
        return "panic", f"{how} after a Rust panic"
    if returncode == -signal.SIGKILL:
        return "oom", f"{how} (the kernel's out-of-memory killer?)"
    if "overflowed its stack" in stderr:
        return "crash", f"{how}: stack overflow"
    if returncode == 0:
        return "harness", "the child exited without reporting its case"
    return "crash", how


def describe_exception(record: dict[str, Any]) -> str:
    if record["outcome"] == "ok":
        return "returned"
    return f"{record['exception']}: {record['message']}"


# --------------------------------------------------------------------------- reporting


def summary(results: list[Result]) -> str:
    """Cases per category and outcome, as a table."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for r in results:
        counts[r.case.category][r.outcome] += 1
        counts["total"][r.outcome] += 1
    columns = (*PASSING, *FAILING)
    width = max(map(len, counts))
    rows = [f"{'category':<{width}}  {'cases':>5}" + "".join(f"{c:>8}" for c in columns)]
    for category in [*sorted(set(counts) - {"total"}), "total"]:
        row = counts[category]
        cells = "".join(f"{row[c] or '.':>8}" for c in columns)
        rows.append(f"{category:<{width}}  {sum(row.values()):>5}{cells}")
    return "\n".join(rows)


def report(failed: list[Result], results: list[Result]) -> str:
    listing = "\n".join(r.describe() for r in sorted(failed, key=lambda r: r.case.id))
    return f"{len(failed)} hostile cases failed:\n{listing}\n\n{summary(results)}"
