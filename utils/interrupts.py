"""SIGTERM handled as Ctrl-C. `kill`, a scheduler's time limit or a container stop then end a script
as Ctrl-C does: staged outputs stay as they were, a trainer keeps its last checkpoint and prints the
resume hint, and the exit status is 130 (a script without its own message prints one line)."""
import functools
import signal
import sys
import threading


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def sigterm_as_ctrl_c(main):
    """Decorator of a script's main(argv): while it runs, SIGTERM raises KeyboardInterrupt in the main
    thread; an interrupt that reaches main's edge ends it with one line and SystemExit(130)."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            return main(*args, **kwargs)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("interrupted: every output is either complete or as it was before", file=sys.stderr)
            raise SystemExit(130) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
    return run
