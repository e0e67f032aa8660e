"""mesh.kit.supervision: only the supervisor's own children ask to stop with it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mesh.kit.supervision import SUPERVISOR_ENV, stop_with_supervisor

PROBE = "from mesh.kit.supervision import stop_with_supervisor; print(stop_with_supervisor())"


def _probe(supervisor: str) -> str:
    env = {**os.environ, SUPERVISOR_ENV: supervisor}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_child_of_the_named_supervisor_asks_for_its_parent_death_signal() -> None:
    """The process the supervisor started arranges SIGTERM for when the supervisor dies."""
    assert _probe(str(os.getpid())) == "True"


def test_a_process_with_another_parent_is_left_alone() -> None:
    """A worker a service started inherits the variable but not the supervisor as parent: nothing is
    arranged (it stops with its service, which stops with the supervisor); nor without the variable."""
    assert _probe(str(os.getppid())) == "False"
    assert _probe("") == "False"


@pytest.mark.parametrize("supervisor", ["²", "١٢", "12a"])
def test_a_supervisor_pid_that_is_not_ascii_digits_is_ignored(
    monkeypatch: pytest.MonkeyPatch, supervisor: str
) -> None:
    """A MESH_SUPERVISOR_PID that is not a plain number is no supervisor's: nothing is arranged and the process
    starts. ('²' passes isdigit() but int() refuses it, which made every service fail at start-up.)"""
    monkeypatch.setenv(SUPERVISOR_ENV, supervisor)
    assert stop_with_supervisor() is False
