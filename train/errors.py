"""Bad input is reported as one clear line and exit status 2, never a traceback."""
import argparse
import sys


class UserError(Exception):
    """A problem with what the user asked for or gave us (flags, files, data)."""


def require(ok: bool, message: str) -> None:
    """Bad input unless ok: a UserError with message."""
    if not ok:
        raise UserError(message)


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none): for one-line reports."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (not usage + message) with exit status 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def run_cli(main, argv=None) -> None:
    """Run main(argv); a UserError becomes one 'error: ...' line on stderr and exit status 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None

