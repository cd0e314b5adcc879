"""Running Triton kernels under the CPU interpreter from a test module.

Triton decides "interpreted or compiled" when a function is decorated (its own ``tl.*`` helpers at their first
import, our kernels at theirs), so ``TRITON_INTERPRET=1`` must be set before anything imports triton. A module calls
:func:`import_interpreted` at its top; if another test module already imported triton compiled, the kernels cannot be
interpreted in this process and :func:`fresh_interpreter_test` re-runs the whole file in a subprocess instead.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from types import ModuleType

import pytest


def import_interpreted(*names: str) -> list[ModuleType]:
    """Import ``names`` with TRITON_INTERPRET=1 set, then restore the variable for modules collected later."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def is_interpreted(*kernels: object) -> bool:
    """True when triton's own helpers and every given kernel were decorated in interpreter mode."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return all(isinstance(f, InterpretedFunction) for f in (tl.cdiv, *kernels))


@pytest.fixture(autouse=True)
def interpret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter also reads the variable while running a kernel: keep it set around every test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def fresh_interpreter_test(file: str, in_process: bool) -> Callable[[], None]:
    """A test that runs ``file`` in a subprocess with TRITON_INTERPRET=1 first; skipped when already in process."""

    @pytest.mark.skipif(in_process, reason="this process already interprets the kernels")
    def test_whole_file_in_fresh_interpreter() -> None:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(file)))
        path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", file]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

    return test_whole_file_in_fresh_interpreter
