"""The small library shared by the entry scripts in scripts/ (imported as `cogumi`).

While one of those entry scripts is starting, Ctrl-C exits 130 with one line instead of a page of import
traceback: an entry script loads torch and transformers (seconds) before `run_main` can catch KeyboardInterrupt,
and nothing has been written yet. `run_main` puts Python's own handler back before `main()` runs.
"""

import os as _os
import signal as _signal
import sys as _sys
from pathlib import Path as _Path


def _interrupted_while_starting(_signum, _frame) -> None:
    _sys.stderr.write("Interrupted while starting (loading libraries): nothing was changed; run the same command "
                      "again.\n")
    _os._exit(130)


_entry = getattr(_sys.modules.get("__main__"), "__file__", None)
if (_entry and _Path(_entry).resolve().parent == _Path(__file__).resolve().parents[1]
        and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler):
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)
