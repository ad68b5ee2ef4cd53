"""Ctrl-C ends `python -m candle_phi` with exit code 130 and no traceback, in every phase.

The runs use a slow scripted model whose reply is 400 tokens long, so that no run ends before
its SIGINT: one that goes on lost the signal. Nothing here sleeps to wait for a state: a test
waits for what the child writes, or sends the signal at a moment it chose.
"""

from __future__ import annotations

import codecs
import os
import re
import selectors
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

import candle_phi
import phi3_fixtures as fx
import pytest
from candle_phi import Phi3Generator
from child_signals import sigint_reaches_children
from conftest import NEWLINE, SLOW_CONFIG

# One character each (CJK filler tokens), distinct as a script needs, none an end token.
SCRIPT = list(range(20000, 20400))
PROMPT = "Write a long story about ice hockey. " + "the " * 80  # prefill: two chunks
# Seconds from SIGINT to exit that count as a hang. Generous, so that a busy machine (two of
# these runs at once beside other jobs, on 2 cores) never reaches it; a lost signal still
# does (the 400-token reply outlasts it); the latencies are reported instead (pytest -s).
HANG_LIMIT = 60.0
PACKAGE = Path(candle_phi.__file__).parent
# Where __main__.run starts handling Ctrl-C.
GUARD_LINE = next(
    number
    for number, line in enumerate((PACKAGE / "__main__.py").read_text().splitlines(), 1)
    if line.strip() == "try:"
)
FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


@pytest.fixture()
def sigint_default() -> Iterator[None]:
    """Children start with SIGINT at its default (see `sigint_reaches_children`)."""
    with sigint_reaches_children():
        yield


@pytest.fixture(scope="module")
def endless(fixture_dir: Path, tokenizer_path: Path) -> list[str]:
    """Arguments of a chat run whose greedy reply is SCRIPT (it has no end token)."""
    path = fixture_dir / "slow-scripted.gguf"
    fx.write_phi3_gguf(path, SLOW_CONFIG, seed=3, script=SCRIPT, trigger_token=NEWLINE)
    return [
        "-m",
        "candle_phi",
        "--model",
        str(path),
        "--tokenizer",
        str(tokenizer_path),
        "--temperature",
        "0",
        "--verbose",
        PROMPT,
    ]


@pytest.fixture(scope="module")
def script_text(generator: Phi3Generator) -> str:
    return generator.detokenize(SCRIPT)


def start(args: list[str], *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *args, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


@dataclass
class Output:
    """What a child wrote, as text (a character may come in two reads)."""

    stdout: str = ""
    stderr: str = ""
    decoders: dict[str, codecs.IncrementalDecoder] = field(
        default_factory=lambda: {
            name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")
        }
    )

    def add(self, name: str, data: bytes) -> None:
        text = self.decoders[name].decode(data, final=not data)
        setattr(self, name, getattr(self, name) + text)


def follow(
    proc: subprocess.Popen[bytes],
    output: Output,
    seen: Callable[[], object] = lambda: False,
    timeout: float = 120,
) -> bool:
    """Reads the child's stdout and stderr into `output` as they come, until it closes them
    (then returns True: it is ending), `seen()` holds or `timeout` seconds pass."""
    deadline = time.perf_counter() + timeout
    with selectors.DefaultSelector() as selector:
        for name in ("stdout", "stderr"):
            selector.register(getattr(proc, name), selectors.EVENT_READ, name)
        while selector.get_map():
            left = deadline - time.perf_counter()
            if seen() or left <= 0:
                return False
            for key, _ in selector.select(timeout=left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                output.add(key.data, chunk)
    return True


def check_stdout(stdout: str, script_text: str) -> None:
    """Only generated text on stdout: a prefix of the reply, ended by a newline if any."""
    text = stdout.removesuffix("\n")
    assert script_text.startswith(text), f"stdout is not the reply: {stdout[:200]!r}"


# Runs argv[1:] with SIGINT blocked, as a launcher that blocked it leaves its children.
BLOCKED_EXEC = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


@pytest.mark.parametrize("moment", ["prompt", "reply", "reply, started with SIGINT blocked"])
def test_ctrl_c_exits_130(
    endless: list[str], script_text: str, sigint_default: None, moment: str
) -> None:
    """SIGINT once the model is loaded (template, tokenization, prefill) or once the reply
    streams: exit code 130, no traceback, only generated text on stdout. Also when the run
    inherits SIGINT blocked: the command line unblocks it."""
    args = [*endless, "--max-tokens", str(len(SCRIPT))]
    if moment.endswith("blocked"):
        args = ["-c", BLOCKED_EXEC, *args]
    proc = start(args)
    output = Output()
    if moment == "prompt":
        follow(proc, output, lambda: "[loaded" in output.stderr)
    else:
        follow(proc, output, lambda: output.stdout)
    proc.send_signal(signal.SIGINT)
    follow(proc, output, timeout=HANG_LIMIT)
    assert proc.wait(timeout=HANG_LIMIT) == 130, output.stderr
    assert "Traceback" not in output.stderr, output.stderr
    check_stdout(output.stdout, script_text)
    assert len(output.stdout.strip()) < len(SCRIPT), "the run ended before the signal"


SWALLOWING_MAIN = """
import sys, types, weakref

def main():
    # Ctrl-C as it lands in a weakref callback of the import machinery: Python cannot raise
    # it there, reports it as "Exception ignored", and goes on.
    def callback(_):
        raise KeyboardInterrupt

    class Target:
        pass

    target = Target()
    ref = weakref.ref(target, callback)
    del target
    for _ in range(10**8):  # what a lost Ctrl-C lets run on: seconds
        pass
    return 0

sys.modules["candle_phi.cli"] = types.SimpleNamespace(main=main)
from candle_phi.__main__ import run
sys.exit(run())
"""


def test_ctrl_c_that_python_swallows_still_exits_130(sigint_default: None) -> None:
    """A KeyboardInterrupt raised where Python cannot propagate it is raised again."""
    result = subprocess.run(
        [sys.executable, "-c", SWALLOWING_MAIN], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr == ""


# ------------------------------------------------------------------ SIGINT at random moments

MOMENTS = 100
PARALLEL = 2
REFERENCE_TOKENS = 6  # the reply of the reference runs: their end is the last moment
# A phase begins when the run writes its mark (runs get -X importtime: a line per import).
PHASES = {
    "start-up": None,  # CPython: site, runpy's own imports
    "import": ("stderr", re.compile(r"\| runpy\n")),  # candle_phi, the command line, native
    "load": ("stderr", re.compile(r"\| +candle_phi\.cli\n")),  # parse arguments, load
    "prompt": ("stderr", re.compile(r"\[loaded")),  # template, tokenization, prefill
    "reply": ("stdout", re.compile(r"\S")),  # decoding
}
# CPython's default unraisable hook reporting a KeyboardInterrupt it swallowed (candle_phi's
# hook reports none: it raises them again).
SWALLOWED = re.compile(r"Exception ignored in[^\n]*\n(?:[^\n]*\n)*?KeyboardInterrupt")


def phase_reached(output: Output) -> str:
    """The last phase whose mark a run wrote."""
    reached = "start-up"
    for phase, mark in PHASES.items():
        if mark is not None and mark[1].search(getattr(output, mark[0])):
            reached = phase
    return reached


@dataclass
class Run:
    moment: float  # seconds after the start
    aimed_at: str  # the phase of the reference runs at that moment
    output: Output = field(default_factory=Output)
    returncode: int | None = None
    latency: float = 0.0  # seconds from SIGINT to exit
    ended_first: bool = False  # the run was over before its moment
    killed: bool = False  # by the test: it went on after the signal
    phase: str = ""  # the phase the run had reached when the signal was sent

    @property
    def outcome(self) -> str:
        stderr = self.output.stderr
        if self.killed:
            # CPython swallowed the KeyboardInterrupt (in a weakref callback of importlib,
            # python/cpython#95959) before candle_phi's handler, which raises such an
            # interrupt again, was in place; the run went on.
            lost = SWALLOWED.search(stderr) and before_the_handler(stderr)
            return "before the handler: lost" if lost else "bad: hang"
        if "Traceback" not in stderr and "KeyboardInterrupt" not in stderr:
            if self.returncode == 130:
                return "130"
            if self.returncode == -signal.SIGINT:  # before Python's handler: a shell says 130
                return "killed by SIGINT"
        last = stderr.strip().rsplit("\n", 1)[-1]
        if (
            self.returncode in (1, -signal.SIGINT)
            and last.startswith("KeyboardInterrupt")
            and before_the_handler(stderr)
        ):
            return "before the handler: KeyboardInterrupt printed"
        return f"bad: exit {self.returncode}"


def before_the_handler(stderr: str) -> bool:
    """Whether the KeyboardInterrupt of this traceback was raised before candle_phi could
    handle it: in CPython's start-up (site, runpy) or at the first instructions of the
    package (its module code, run() above its `try:`)."""
    ours = [frame for frame in FRAME.findall(stderr) if frame[0].startswith(str(PACKAGE))]
    if not ours:
        return True
    path, line, function = ours[-1]  # the innermost
    name = Path(path).name
    return (name in ("__init__.py", "__main__.py") and function == "<module>") or (
        name == "__main__.py" and function == "run" and int(line) <= GUARD_LINE
    )


def reference_run(args: list[str]) -> tuple[dict[str, float], str]:
    """When each phase of an uninterrupted run begins (seconds after the start), and its
    stdout."""
    proc = start(args)
    start_time = time.perf_counter()  # as interrupt() counts its moments
    output = Output()
    begins = {"start-up": 0.0}

    def note_phases() -> bool:
        now = time.perf_counter() - start_time
        for phase, mark in PHASES.items():
            if mark and phase not in begins and mark[1].search(getattr(output, mark[0])):
                begins[phase] = now
        return False

    follow(proc, output, note_phases)
    assert proc.wait(timeout=HANG_LIMIT) == 0, output.stderr[-2000:]
    begins["end"] = time.perf_counter() - start_time
    assert list(begins) == [*PHASES, "end"], f"phases seen in order: {list(begins)}"
    return begins, output.stdout


def interrupt(args: list[str], run: Run) -> Run:
    proc = start(args)
    follow(proc, run.output, timeout=run.moment)  # until the moment, not a wait for a state
    run.phase = phase_reached(run.output)
    sent = time.perf_counter()
    run.ended_first = proc.poll() is not None
    proc.send_signal(signal.SIGINT)
    if not follow(proc, run.output, lambda: SWALLOWED.search(run.output.stderr), HANG_LIMIT):
        run.killed = True
        proc.kill()
    proc.wait()
    run.latency = time.perf_counter() - sent
    run.returncode = proc.returncode
    return run


def describe(values: list[float]) -> str:
    if not values:
        return "no runs"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"median {statistics.median(ordered):.3f} s, p95 {p95:.3f} s, max {ordered[-1]:.3f} s"


def test_ctrl_c_at_random_moments(
    endless: list[str], script_text: str, sigint_default: None
) -> None:
    """SIGINT at 100 seeded random moments of `python -m candle_phi`, 20 aimed at each phase
    (CPython start-up; import of candle_phi, the command line and the native library; model
    load; prompt: template, tokenization, prefill; reply) of reference runs made as loaded
    as the test's (PARALLEL at a time). Every run ends with 130 and no traceback, but for
    what CPython does before any candle_phi code runs, which no package can change
    (`python -c pass` does the same): killed by SIGINT before Python installs its handler
    (a shell reports 130), its traceback of the KeyboardInterrupt (in site or runpy), and
    rarely the KeyboardInterrupt swallowed in one of importlib's weakref callbacks."""
    args = ["-X", "importtime", *endless]
    reference = [*args, "--max-tokens", str(REFERENCE_TOKENS)]
    with ThreadPoolExecutor(PARALLEL) as pool:
        references = list(pool.map(reference_run, [reference] * PARALLEL))
    for _, stdout in references:
        check_stdout(stdout, script_text)
    bounds = [*PHASES, "end"]
    begins = {b: statistics.mean(begins[b] for begins, _ in references) for b in bounds}

    rng = Random(9)
    runs = [
        Run(rng.uniform(begins[phase], begins[bounds[i + 1]]), phase)
        for i, phase in enumerate(PHASES)
        for _ in range(MOMENTS // len(PHASES))
    ]
    interrupted = [*args, "--max-tokens", str(len(SCRIPT))]
    with ThreadPoolExecutor(PARALLEL) as pool:
        done = list(pool.map(lambda run: interrupt(interrupted, run), runs))

    ended = [r for r in done if not r.killed]
    print(
        f"\nphases of the reference runs begin at (s): "
        f"{', '.join(f'{p} {t:.3f}' for p, t in begins.items())}"
        f"\noutcomes: {dict(Counter(run.outcome for run in done))}"
        f"\nlatency from SIGINT to exit, {len(ended)} runs: "
        f"{describe([r.latency for r in ended])}; by the phase reached:"
    )
    for phase in PHASES:
        mine = [r for r in done if r.phase == phase]
        print(
            f"  {phase}: {len(mine)} runs, {describe([r.latency for r in mine if not r.killed])}"
            f", {dict(Counter(r.outcome for r in mine))}"
        )
    bad = [r for r in done if r.outcome.startswith("bad") or r.ended_first]
    assert not bad, "\n\n".join(
        f"aimed at {r.aimed_at}, {r.moment:.3f} s; reached {r.phase}; exit {r.returncode}, "
        f"ended first: {r.ended_first}\n{r.output.stderr[-1500:]}"
        for r in bad[:3]
    )
    for run in done:
        check_stdout(run.output.stdout, script_text)
    slowest = max(ended, key=lambda r: r.latency)
    assert slowest.latency < HANG_LIMIT, f"a hang after SIGINT: {slowest}"
