"""User-facing errors: one screen, naming the file/key/line and what to do next."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

# Exit codes shared by every entry script, so the Makefile and tests can tell them apart.
EXIT_OK = 0
EXIT_FAILED = 1  # the work ran and its result is bad (a gate failed, verification failed)
EXIT_USER_ERROR = 2  # bad input or environment: nothing was changed on disk
EXIT_DISK_STOP = 3  # stopped cleanly before the disk filled; resumable
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: stopped; nothing half-written under a final name; run again to continue


class UserError(Exception):
    """A mistake the user can fix. `what` is one line; `fix` says what to do next."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(what)
        self.what = what
        self.where = where
        self.fix = fix

    def render(self) -> str:
        lines = [f"ERROR: {self.what}"]
        if self.where:
            lines.append(f"  where: {self.where}")
        if self.fix:
            lines.append(f"  fix:   {self.fix}")
        return "\n".join(lines)


_INTERRUPT_NOTE: list[Callable[[], str]] = []


def note_on_interrupt(note: Callable[[], str]) -> None:
    """What a rerun after Ctrl-C at this point does (e.g. where training resumes), asked for when it happens, so the
    interrupt line never promises a checkpoint that does not exist (ISSUES_LOG B52)."""
    _INTERRUPT_NOTE[:] = [note]


def interrupted_message() -> str:
    note = _INTERRUPT_NOTE[0]() if _INTERRUPT_NOTE else ""
    return ("Interrupted: stopped cleanly, nothing half-written is kept under a final name; run the same command "
            "again to continue" + (f" ({note})." if note else "."))


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run an entry script's main(): user errors print one screen and exit non-zero, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # peft imports bitsandbytes, whose CPU build warns about missing GPU kernels on every CPU run; the stack
    # never quantizes for training, and `make quantize` says itself when there is no GPU.
    logging.getLogger("bitsandbytes.cextension").setLevel(logging.ERROR)
    # SIGTERM (a scheduler, `kill`, torchrun stopping a rank) takes the same path as Ctrl-C: the `finally` blocks
    # that remove temporary folders run, and one line says how to continue (ISSUES_LOG B24).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C is KeyboardInterrupt (cogumi/__init__)
    _INTERRUPT_NOTE.clear()
    try:
        code = main(argv)
    except UserError as err:
        print(err.render(), file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt:
        print(interrupted_message(), file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)


def _interrupt(signum, _frame) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise KeyboardInterrupt
