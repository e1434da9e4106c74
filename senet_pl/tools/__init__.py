"""Tools that stand apart from the package's core: ``python -m senet_pl.tools.bench`` (benchmarks) and
``python -m senet_pl.tools.study`` (ResNet vs SE-ResNet over seeds)."""

import inspect
import re
import sys
from collections.abc import Callable
from typing import Any


def run_as_cli(function: Callable[..., Any]) -> None:
    """Run ``function`` as a command line: its typed, documented arguments become the options (jsonargparse)."""
    from jsonargparse import ArgumentParser, auto_cli

    from senet_pl.cli import USER_ERRORS
    from senet_pl.compat import quiet
    from senet_pl.options import ShortErrors

    class ToolParser(ShortErrors, ArgumentParser):
        pass

    quiet()  # as python -m senet_pl: no Lightning message that a user cannot act on
    # A bad option: one line and a pointer to --help, as python -m senet_pl (not the usage page and a nested report)
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # python -m senet_pl.tools.study: its module
    prog = f"python -m {spec.name}" if spec is not None else None
    try:
        auto_cli(function, args=sys.argv[1:], parser_class=ToolParser, prog=prog)
    except USER_ERRORS as err:  # a run's setting or data, as python -m senet_pl says it
        sys.exit(f"error: {own_options(str(err), function)}")


def own_options(message: str, function: Callable[..., Any]) -> str:
    """``message`` (the data module's or the CLI's) with ``--data.NAME`` written as the tool's ``--NAME`` where the tool
    has that option: a user of ``study --data_dir`` is not helped by ``--data.data_dir``. A tool that passes CLI
    arguments through (``tta --args``) has no such options, and its messages keep the CLI's names."""
    own = inspect.signature(function).parameters
    return re.sub(r"--data\.(\w+)", lambda m: f"--{m[1]}" if m[1] in own else m[0], message)
