"""The one error type that reaches users: one line naming the field, the value and what is allowed."""
from __future__ import annotations

import os
import re
import sys

import yaml

EXIT_BAD_INPUT = 2


class ConfigError(ValueError):
    """Bad input. ``str(err)`` is the single line the CLI prints before exiting non-zero.

    It survives pickling and copying (``__reduce__``), so an error raised inside a Ray actor or a Tune trial reaches
    the user as the same one line, not as an unrelated TypeError from rebuilding it."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r}: {allowed}")

    def __reduce__(self):
        return (type(self), (self.field, self.value, self.allowed))


class Terminated(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, Kubernetes, a spot preemption): stops a run as Ctrl-C does, the last checkpoint kept
    and the resume command printed, with the exit status 143 (128 + SIGTERM) instead of 130."""


def user_error(err: BaseException) -> ConfigError | None:
    """The ConfigError inside an error that crossed Ray (an actor's or a trial's RayTaskError), or None.

    Ray re-raises an actor's error as an instance of a class derived from both RayTaskError and the error's class,
    whose text is the actor's whole traceback: the error the actor raised is its ``cause``, and that one is returned."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        if isinstance(err, ConfigError) and not isinstance(cause, BaseException):
            return err
        err = cause if isinstance(cause, BaseException) else err.__cause__
    return None


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def root_cause(err: BaseException) -> tuple[BaseException, str | None]:
    """(the error an actor or a trial raised, where: the Ray call it failed in, e.g. "ray::WorkerShell.run_steps()"),
    or (err, None) for an error raised here. Ray's RayTaskError's text is the remote traceback; its ``cause`` is
    the error itself."""
    where, seen = None, set()
    while id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        if not isinstance(cause, BaseException):
            break
        if where is None:
            first = ANSI.sub("", str(err)).strip().splitlines()        # Ray colours the call's name on a terminal
            where = first[0].split(" (pid=")[0] if first else None
        err = cause
    return err, where


def one_line(err: BaseException) -> str:
    """An error as one line: its type and the first line of its message, and where a remote one was raised."""
    cause, where = root_cause(err)
    lines = ANSI.sub("", str(cause)).strip().splitlines()
    text = f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return f"{text} (raised in {where})" if where else text


def report_error(err: BaseException, explained: tuple[type, ...] = ()) -> int:
    """A command's failure on stderr; returns its exit status. Bad input (also when raised inside a Ray actor or a Tune
    trial): one line, exit 2. Anything else: one line, exit 1, and how to see the traceback (RAYDISTILL_TRACEBACK=1
    raises it instead), unless the error is one of ``explained``: errors whose line already says what to do."""
    bad_input = user_error(err)
    if bad_input is not None:
        print(f"raydistill: error: {bad_input}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if os.environ.get("RAYDISTILL_TRACEBACK"):
        raise err
    print(f"raydistill: {one_line(err)}", file=sys.stderr)
    if not isinstance(err, explained):
        print("raydistill: set RAYDISTILL_TRACEBACK=1 for the traceback", file=sys.stderr)
    return 1


class _Loader(yaml.SafeLoader):
    """YAML 1.2 numbers: ``1e-3``, ``5e-4`` and ``1e6`` are floats (PyYAML's YAML 1.1 reads them as strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def read_yaml(text: str):
    """safe_load with YAML 1.2 floats: the one YAML reader of configs, overrides and search spaces."""
    return yaml.load(text, Loader=_Loader)
