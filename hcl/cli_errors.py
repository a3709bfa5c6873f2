"""The one-line messages of ``python -m hcl.fit`` for a user's mistakes: options, data, and refusals of hcl's and
Lightning's checks during training. A bug (an error raised in a user's own code, or in a library under hcl's) keeps
its traceback."""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import os
import re
import traceback
from types import TracebackType

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException

import hcl.callbacks  # noqa: F401 - loaded: their folders are the checks' (package_dirs)
import hcl.datamodules  # noqa: F401
from hcl.checks import package_dirs

# Errors of a run's set-up that a user's options cause: reported in one line, without a traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, ConnectionError,
               MisconfigurationException)


# The packages whose raised errors are refusals of options or data (their own checks), not bugs
_CHECKING = package_dirs("hcl", "hcl.callbacks", "hcl.datamodules", "lightning")


def raised_by_checks(error: BaseException) -> bool:
    """Whether hcl or Lightning raised ``error`` itself (its innermost frame is theirs): a refusal to report in one
    line, not a bug in a user's code (a model's ``training_step``, a data module of one's own), whose traceback is
    wanted."""
    frames = traceback.extract_tb(error.__traceback__)
    return not frames or frames[-1].filename.startswith(_CHECKING)


def spawned_user_error(error: BaseException) -> BaseException | None:
    """The user error a spawned process raised (``ddp_spawn`` hands it back as the text of its traceback, in torch's
    ``ProcessRaisedException``), rebuilt from that text's last line; ``None`` for any other error."""
    if type(error).__name__ != "ProcessRaisedException":
        return None
    text = str(error).strip()
    files = re.findall(r'File "([^"]+)", line', text)  # the child's traceback: a bug's innermost frame is not theirs
    if files and not files[-1].startswith(_CHECKING):
        return None
    name, _, message = text.splitlines()[-1].partition(": ")
    kind = next((kind for kind in USER_ERRORS if kind.__name__ == name.rsplit(".", 1)[-1]), None)
    return None if kind is None else kind(message)


def one_line_error(error: BaseException, constructing: bool = False) -> str:
    """The cause of a failed start in one line: the user's mistake, without the parser's or the call stack's noise.

    ``constructing``: the error was raised while the parsed classes were instantiated; the message then names the
    class whose constructor refused its arguments.
    """
    if isinstance(error, ArgumentError):
        return _argument_error(str(error))
    while _from_parser(error) and (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    message = _squeeze(str(error)) or type(error).__name__
    owner = _raising_class(error.__traceback__) if constructing else None
    return f"{owner}: {message}" if owner else message


def _from_parser(error: BaseException) -> bool:
    """Whether ``error`` was raised by jsonargparse (which wraps the real error of an instantiation)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}jsonargparse{os.sep}" in tb.tb_frame.f_code.co_filename


def _raising_class(tb: TracebackType | None) -> str | None:
    """The class whose constructor raised (the innermost ``__init__`` frame), e.g. ``TwoLayerReLU``."""
    owner = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            name = type(frame.f_locals["self"]).__name__
            owner = owner if name.startswith("_") else name  # a library's private helper names nothing a user set
        tb = tb.tb_next
    return owner


def _argument_error(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    key = re.match(r'Parser key "([^"]+)"', lines[0]) if lines else None
    # A class_path that failed: the first one named is the user's; later ones are the base classes tried.
    for i, line in enumerate(lines):
        problem = re.match(r"- Problem with given class_path '([^']+)':", line)
        if problem and i + 1 < len(lines):
            class_path, reason = problem.group(1), lines[i + 1]
            nested = re.fullmatch(r'Parser key "([^"]+)":', reason)
            if nested and i + 2 < len(lines):  # a bad value of one of its options: the reason is the next line
                reason = f"{nested.group(1)}: {lines[i + 2]}"
            option = re.match(r"Option '([^']+)' is not accepted", reason)
            if option and class_path in ("lightning.LightningDataModule", "lightning.LightningModule"):
                # no class chosen yet: the option came before --data=<class> / --config (or a YAML without class_path)
                group = "data" if "DataModule" in class_path else "model"
                return (f"{key.group(1) + ': ' if key else ''}--{group}.{option.group(1)} is given before any "
                        f"{group} class is chosen: put --{group}=<class> or --config first (in a YAML file, give "
                        f"{group}: a class_path)")
            if option:
                reason += _suggestion(class_path, option.group(1))
            return f"{key.group(1) + ': ' if key else ''}{class_path}: {reason}"
    given = next((line[len("Given value: "):] for line in lines if line.startswith("Given value: ")), None)
    try:  # a section with keys beside class_path and init_args: jsonargparse names only the Union it failed
        extra = sorted(set(ast.literal_eval(given)) - {"class_path", "init_args", "dict_kwargs"}) if given else []
    except (ValueError, SyntaxError, TypeError):
        extra = []
    if key and extra and "class_path" in given:
        return (f"{key.group(1)}: {', '.join(map(repr, extra))} given beside class_path and init_args: the class's "
                "options go under init_args (and the trainer's under trainer:)")
    if key and len(lines) > 1:
        return f"{key.group(1)}: {_squeeze(' '.join(lines[1:3]))}"
    return _squeeze(message)


def _suggestion(class_path: str, option: str) -> str:
    module_name, _, name = class_path.rpartition(".")
    try:
        parameters = inspect.signature(getattr(importlib.import_module(module_name), name)).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return ""
    accepted = [p for p in parameters if p not in ("self", "args", "kwargs")]
    close = difflib.get_close_matches(option, accepted, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (accepted: {', '.join(accepted)})" if accepted else f"{hint} ({name} takes no options)"


def _squeeze(text: str) -> str:
    return " ".join(text.split())
