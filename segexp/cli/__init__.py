"""segexp's command lines (the ``segexp-*`` console commands and the scripts in ``scripts/``) and
the one wrapper they all run under.

Every command's logic is a ``main(argv) -> result`` function; :func:`run_command` runs it and
turns an error segexp can explain (a :class:`~segexp.errors.SegexpError`, also when Hydra or a
DataLoader worker wrapped it, or a Hydra composition error such as an unknown option) into one
line on stderr, ``segexp: error: <message>``, and exit status 1, instead of a traceback. Any other
exception is a bug and keeps its traceback. A console command is ``command(main)``::

    def cli() -> None:          # [project.scripts] segexp-eval = "segexp.cli.evaluate:cli"
        command(main)

and a script in ``scripts/`` is ``if __name__ == "__main__": command(main)``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from hydra.errors import HydraException

from segexp.errors import SegexpError

PREFIX = "segexp"


def explained_error(err: BaseException | None) -> SegexpError | None:
    """The SegexpError behind an exception (Hydra wraps errors raised while instantiating; a
    DataLoader re-raises a worker's error as a new one from the original)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, SegexpError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def message_of(err: BaseException) -> str:
    """The explanation alone: an error re-raised from a DataLoader worker carries the worker's
    traceback in its text, whose last line is the original message."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(("segexp.", type(err).__name__)) else last
    return text


def print_error(message: str) -> None:
    """The one line every command prints for an error it can explain."""
    print(f"{PREFIX}: error: {message}", file=sys.stderr)


def run_command(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None, *,
                interrupted: str | None = None) -> int:
    """Run ``main(argv)`` and return the exit status: 0, or the int ``main`` returned, or 1 for an
    explained error (printed as one line). ``interrupted``: a line to print on Ctrl-C (exit
    status 130) instead of the traceback, for commands that can be re-run to resume."""
    try:
        result = main(argv)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"{PREFIX}: interrupted: {interrupted}", file=sys.stderr)
        return 130
    except Exception as err:
        known = explained_error(err)
        if known is None and isinstance(err, HydraException):
            known = err  # config composition: an unknown option, a missing group; Hydra says which
        if known is None:
            raise
        print_error(message_of(known))
        return 1
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return 0


def command(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None, *,
            interrupted: str | None = None) -> NoReturn:
    """:func:`run_command`, then exit the process with its status."""
    sys.exit(run_command(main, argv, interrupted=interrupted))


def run_prepare(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """A ``scripts/prepare/<dataset>.py`` command: as :func:`run_command`, and Ctrl-C says that a
    re-run resumes (each finished step is skipped)."""
    return run_command(main, argv, interrupted="run the same command again to resume "
                                               "(finished steps are skipped).")
