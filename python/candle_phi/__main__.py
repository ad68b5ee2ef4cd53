"""``python -m candle_phi``: the command line of :mod:`candle_phi.cli`.

Ctrl-C ends it with exit code 130 and no traceback at any moment once this file runs: the
command line (argparse, the native library) is imported inside the handler too.
"""

import _thread
import signal
import sys

EXIT_INTERRUPTED = 130  # cli.EXIT_INTERRUPTED, without importing what may be interrupted


def run() -> int:
    previous_hook = sys.unraisablehook

    def repost_interrupt(unraisable: "sys.UnraisableHookArgs") -> None:
        # Ctrl-C that lands where Python cannot raise (a weakref callback of the import
        # machinery, a __del__) is printed as "Exception ignored" and lost. Post it again,
        # from another thread: posted here it would be raised in this hook, and lost again.
        # That thread needs the GIL, so it posts once this returns; the interrupt is then
        # raised where it propagates, and handled below.
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _thread.start_new_thread(_thread.interrupt_main, ())
        else:
            previous_hook(unraisable)

    sys.unraisablehook = repost_interrupt
    try:
        if sys.platform != "win32":
            # A blocked signal mask survives exec: a launcher that blocked SIGINT (a CI
            # runner, a thread of a Go or JVM program) would leave Ctrl-C pending until the
            # run ends. An ignored SIGINT (a shell's background job) stays ignored.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        from candle_phi.cli import main

        return main()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        sys.unraisablehook = previous_hook


if __name__ == "__main__":
    sys.exit(run())
