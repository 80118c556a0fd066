"""Command-line conventions shared by every entry point (train, export, eval, tools/, benchmarks/).

- Parsers are built with ``argparse.ArgumentParser(allow_abbrev=False)`` (subparsers too): ``--dry`` is not
  ``--dry-run``, and a flag added later that shares a prefix can never change what an old command line means.
- A flag that does not apply to the chosen mode is refused with one line (exit 2) instead of being ignored:
  a user who typed it expected it to do something.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable


def given(p: argparse.ArgumentParser, args: argparse.Namespace, dest: str) -> bool:
    """Whether ``--dest`` was set to something other than its default (a flag repeated at its default counts as
    not given: it changes nothing)."""
    return getattr(args, dest) != p.get_default(dest)


def flag_name(p: argparse.ArgumentParser, dest: str) -> str:
    for action in p._actions:  # argparse keeps no public dest -> option-string map
        if action.dest == dest and action.option_strings:
            return max(action.option_strings, key=len)
    return dest


def refuse_flags(p: argparse.ArgumentParser, args: argparse.Namespace, dests: Iterable[str], why: str) -> None:
    """Exit 2 with one line naming the first flag in ``dests`` that was given, and ``why`` it does not apply."""
    for dest in dests:
        if given(p, args, dest):
            print(f"error: {flag_name(p, dest)} {why}", file=sys.stderr)
            raise SystemExit(2)


def json_object(text: str, flag: str, error: type = ValueError) -> dict:
    """``text`` (a command-line value) parsed as a JSON object, or ``error`` with one line naming ``flag``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{flag} is not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise error(f"{flag} must be a JSON object")
    return value
