"""Tests that need a real peer fail, not skip, when it is missing under CI.

Loaded for every run (``-p peers_plugin`` in ``pyproject.toml``):

- ``@pytest.mark.peers("Orthanc", "storescu")`` marks a test that needs those programs; they are
  looked up with :func:`shiftguard.peers.find_tool` (``$PATH``, then where Debian installs
  them). :func:`peer_missing` is the same rule for a fixture that finds a peer missing.
- Where peers are required (``SHIFTGUARD_REQUIRE_PEERS=1``, or ``CI`` set to anything but ``0`` or
  ``false``; ``.ci/run`` sets the first), a missing peer fails the test, and the run fails when any
  test skipped other than those marked ``gpu``. Elsewhere (a laptop without Orthanc) it skips.
- The summary prints the skip count, gpu-marked and other.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

import pytest

REQUIRE_ENV = "SHIFTGUARD_REQUIRE_PEERS"


def peers_required() -> bool:
    """Whether a missing peer (or any skip outside the ``gpu`` tests) fails the run."""
    if os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0"):
        return True
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def peer_missing(message: str) -> NoReturn:
    """Fail (peers required) or skip with ``message``, which names what is missing."""
    if peers_required():
        pytest.fail(f"{message} ({REQUIRE_ENV}=1 or CI: a missing peer fails the test)", False)
    pytest.skip(message)


#: the run's skips, gpu-marked and other (nodeid: reason), as the controlling process sees them
SKIPPED: dict[str, list[str]] = {"gpu": [], "other": []}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "peers(*programs): needs these peer programs (failed, not skipped, when missing under CI)",
    )
    for kind in SKIPPED.values():
        kind.clear()


def pytest_runtest_setup(item: pytest.Item) -> None:
    from shiftguard.peers import PACKAGES, find_tool

    for mark in item.iter_markers("peers"):
        missing = [str(name) for name in mark.args if find_tool(str(name)) is None]
        if missing:
            packages = sorted({PACKAGES.get(name, name) for name in missing})
            peer_missing(
                f"needs {', '.join(missing)}: not installed (Debian packages "
                f"{', '.join(packages)}; scripts/setup.sh installs them)"
            )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    SKIPPED["gpu" if "gpu" in report.keywords else "other"].append(f"{report.nodeid}: {reason}")


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")  # an xdist worker: the controller judges the run


def pytest_sessionfinish(session: pytest.Session, exitstatus: Any) -> None:
    if _is_worker(session.config):
        return
    if peers_required() and SKIPPED["other"] and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if _is_worker(config):
        return
    gpu, other = len(SKIPPED["gpu"]), len(SKIPPED["other"])
    terminalreporter.write_line(f"skipped: {gpu + other} ({gpu} gpu-marked, {other} other)")
    if peers_required() and other:
        terminalreporter.write_line(
            f"FAILED: {other} test(s) skipped while peers are required ({REQUIRE_ENV}=1 or CI); "
            "only gpu-marked tests may skip:",
            red=True,
        )
        for line in SKIPPED["other"]:
            terminalreporter.write_line(f"  {line}", red=True)
