"""One clear line instead of a traceback.

Every entry point runs through :func:`cli_main`: a :class:`UserError` (bad input, missing data,
mismatched artifacts, impossible config values) is printed as one ``error: ...`` line on stderr and
the process exits with status 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """A problem the user can fix; the message is the whole explanation."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def cli_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; finished stages are kept, rerun the same command to resume",
              file=sys.stderr, flush=True)
        sys.exit(130)
