"""User errors: the one exception type for what the user can fix, the checks that raise it, and the line
``llmdpd`` prints for it.

A user error is a bad config value, an unknown task, a missing or corrupt file, a checkpoint that does not
match the config, or a path that cannot be used. It is a :class:`ConfigError` that names the config key the
user wrote. ``llmdpd`` prints it as one line on stderr and exits with status 2, as argparse does::

    error: <config key>: <what is wrong> (got <value>)

Any other exception is a bug and keeps its traceback. ``LLMDPD_DEBUG=1`` shows a user error's traceback too.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Set to 1 to see the traceback of a user error.
DEBUG_ENV = "LLMDPD_DEBUG"
#: argparse's exit status for a usage error.
EXIT_USER_ERROR = 2


def _show(value: object) -> str:
    return str(value) if isinstance(value, Path) else repr(value)


class ConfigError(ValueError):
    """A user error: ``key`` is the config key the user wrote (``model.n_diffusion_steps``,
    ``data.dataset.levels.expert.episodes``), ``problem`` what is wrong, ``value`` the value given.

    A ``ValueError``, so code that validates input keeps its contract; picklable, so it crosses from a
    collection worker process unchanged.
    """

    def __init__(self, key: str, problem: str, value: object) -> None:
        super().__init__(key, problem, value)
        self.key, self.problem, self.value = key, problem, value

    def __str__(self) -> str:
        return f"{self.key}: {self.problem} (got {_show(self.value)})"


def at_least(key: str, value: float, low: float) -> None:
    """A :class:`ConfigError` unless ``value >= low`` (NaN fails)."""
    if not value >= low:
        raise ConfigError(key, f"must be >= {low}", value)


def within(key: str, value: float, low: float, high: float) -> None:
    """A :class:`ConfigError` unless ``low <= value <= high`` (NaN fails)."""
    if not low <= value <= high:
        raise ConfigError(key, f"must be in [{low}, {high}]", value)


def check_writable(key: str, folder: str | Path) -> None:
    """A :class:`ConfigError` unless ``folder`` is a folder this process can write, or can create.

    Nothing is created: the nearest existing ancestor must be a writable folder.
    """
    existing = Path(folder).expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, f"cannot be a folder: {existing} is a file", Path(folder))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(key, f"cannot be written: {existing} is not writable", Path(folder))


def check_checkpoint(key: str, path: str | Path) -> None:
    """A :class:`ConfigError` unless ``path`` is a complete checkpoint file (``torch.save``'s zip format,
    every member's CRC intact): a missing, truncated or overwritten file fails here, before any work."""
    if Path(path).is_dir():
        raise ConfigError(key, "is a folder, not a checkpoint file (a run's are <run>/checkpoints/*.ckpt)",
                          Path(path))  # fmt: skip
    if not Path(path).is_file():
        raise ConfigError(key, "no such file", Path(path))
    try:
        with zipfile.ZipFile(path) as archive:
            bad, names = archive.testzip(), archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ConfigError(key, f"not a readable checkpoint ({type(err).__name__})", Path(path)) from err
    if bad is not None:
        raise ConfigError(key, f"corrupt checkpoint: {bad} fails its CRC check", Path(path))
    if not any(name.endswith("/data.pkl") for name in names):
        raise ConfigError(key, "a zip archive, but not a checkpoint (no torch.save data.pkl)", Path(path))


def user_error_line(err: BaseException) -> str | None:
    """The one line for a user error: the :class:`ConfigError` that ``err`` is or was raised from
    (jsonargparse wraps errors raised while it instantiates nested values), or a parser error; None for
    anything else."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ConfigError):
            return str(cause)
        cause = cause.__cause__
    if isinstance(err, argparse.ArgumentError):
        return _parser_line(" ".join(str(err).split()))
    return None


#: The first type a failed value was expected to have (not None's: every optional value lists it).
_EXPECTED = r"(Expected an? (?!<class 'NoneType'>|path).*?)(?:\. Got value: | - | Given value|$)"


def _parser_line(message: str) -> str:
    """jsonargparse's ``Parser key "k": Expected a <type>. Got value: v`` as ``k: expected a <type> (got v)``.

    A value of an optional dataclass (``data.dataset``, ``data.llm``) fails as a union of that class and
    None; the nested key and value are in its ``NestedArg``, the reason is the first type it expected.
    """
    if not (m := re.fullmatch(r'Parser key "([^"]+)": (.*)', message)):
        return message
    key, rest = m.groups()
    if nested := re.search(r"Given value: NestedArg\(key='(.*?)', val='(.*)'\)$", rest):
        key, value = f"{key}.{nested[1]}", nested[2]
    elif got := re.search(r"\. Got value: (.*)$|: '(.*)'$", rest):  # the second: "File does not exist: 'p'"
        rest, value = rest[: got.start()], got[1] or got[2]
    else:
        return f"{key}: {rest}"
    if reason := re.search(_EXPECTED, rest):
        rest = reason[1]
    return f"{key}: {rest[:1].lower()}{rest[1:]} (got {value})"


@contextmanager
def reporting_user_errors() -> Iterator[None]:
    """Turn a user error into one line on stderr and ``SystemExit(2)``; let any other exception through."""
    try:
        yield
    except Exception as err:
        line = user_error_line(err)
        if line is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
