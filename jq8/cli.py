"""Error handling shared by the command-line scripts (``train.py``, ``quantize.py``).

Bad input is a :class:`UsageError`: the script prints ``error: <message>`` on one line of stderr (the
message names the input and the fix) and exits with status 2, without a traceback. Ctrl-C exits with
status 130 after the script's own clean-up (:class:`Interrupted` carries what it kept). Any other exception
is a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

EXIT_FAILED = 1  # the run started and then failed (e.g. the loss diverged)
EXIT_USAGE = 2  # bad input: nothing was run
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class UsageError(ValueError):
    """Bad command-line input; the message names the input and how to fix it.

    A ``ValueError``, so library callers that catch ``ValueError`` keep working.
    """


class Interrupted(Exception):
    """Raised after a Ctrl-C was handled; the message says what was kept (e.g. the last checkpoint)."""


def one_line(message: object) -> str:
    """``message`` as a single line (newlines and runs of spaces collapsed)."""
    return " ".join(str(message).split())


def require_module(module: str, extra: str, what: str) -> None:
    """Raises UsageError naming the pip extra to install when ``module`` cannot be imported.

    Checked before a run starts, so a missing optional dependency never ends a run half-way.
    """
    if importlib.util.find_spec(module) is None:
        raise UsageError(f'{what} needs the {module} package: pip install "jq8[{extra}]"')


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one-line :class:`UsageError`s, not usage + exit."""

    def error(self, message: str):  # noqa: D102 (argparse API)
        raise UsageError(f"{message} (see python {self.prog} --help)")


def run(
    main: Callable[[list[str] | None], Any],
    argv: list[str] | None = None,
    *,
    failures: tuple[type[BaseException], ...] = (),
) -> int:
    """Runs ``main(argv)`` and returns the process exit status.

    0 on success; :data:`EXIT_USAGE` for a UsageError; :data:`EXIT_INTERRUPTED` for Ctrl-C;
    :data:`EXIT_FAILED` for the exception types in ``failures`` (each printed as one ``error:`` line).
    Anything else propagates with its traceback.
    """
    try:
        main(argv)
    except SystemExit as e:  # argparse's --help (0)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_FAILED)
    except UsageError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:
        print(one_line(e), file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except failures as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    return 0
