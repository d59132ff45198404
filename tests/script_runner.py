"""Run an experiment or benchmark script in this test process, as its command line would.

Every script ends in ``run_main(main, tyro.cli(Args))``; :func:`run_in_process` parses the
arguments with the same ``tyro.cli`` and calls the same ``run_main``, with the environment
variables given, stdout and stderr captured, and the exit code of a ``SystemExit`` (``2``
for a refused argument, as on the command line) returned. It spares each run the seconds
a new Python process spends importing torch and the rest. Tests that need a process of
their own (Ctrl-C, spawned workers, the ``__main__`` line itself) use ``subprocess``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType

import torch
import tyro

from harness.runs import run_main

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """Import a script (``experiments/`` and ``benchmarks/`` are not packages), anew."""
    path = ROOT / relative
    name = f"script_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def environment(variables: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``variables`` set, restored afterwards."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_in_process(
    relative: str, args: list[str], env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python <relative> <args>`` in this process; the result as ``subprocess.run``
    gives it (``returncode``, ``stdout``, ``stderr``). torch's thread count is restored."""
    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    code = 0
    with (
        environment({"COLUMNS": "1000", **(env or {})}),  # no wrapped messages
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        try:
            script = load_script(relative)
            run_main(script.main, tyro.cli(script.Args, args=args, prog=Path(relative).name))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception:  # noqa: BLE001 (as a process would: the traceback, exit code 1)
            traceback.print_exc()
            code = 1
        finally:
            torch.set_num_threads(threads)
    return subprocess.CompletedProcess(
        [sys.executable, relative, *args], code, stdout.getvalue(), stderr.getvalue()
    )
