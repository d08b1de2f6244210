"""Every subcommand, given bad input, exits 2 with a message naming the input and the problem.

Each case runs ``python -m shiftguard.cli`` in a subprocess in a temporary folder: a missing path,
a typo in a name, an empty or malformed file, a port in use or a missing token. It asserts the exit
status, fragments of the message (the input and the problem) and that no traceback reached the
user. The test also checks that every leaf subcommand of the parser has at least one case, so a new
subcommand cannot slip past it. (It lives beside the edge fixtures because three cases need a
signed bundle.)
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shiftguard.cli import build_parser

pytestmark = pytest.mark.slow(seconds=95)


@dataclass(frozen=True)
class Case:
    """One bad invocation and what its message must contain (case-insensitive; ``a|b``: either)."""

    argv: tuple[str, ...]
    expect: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> set[str]:
    """``"edge serve"``, ``"config show"``, ...: every runnable subcommand of the parser."""
    found: set[str] = set()
    for action in parser._actions:  # argparse keeps subparsers there and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= leaf_commands(sub, (*prefix, name))
    return found or {" ".join(prefix)}


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


NOT_FOUND = "not found|no such|does not exist"


def _cases(root: Path, bundle: Path, busy: int) -> list[Case]:
    missing = root / "missing"
    empty_dir = root / "empty-dir"
    empty_dir.mkdir()
    empty = root / "empty.csv"
    empty.write_text("")
    garbage = root / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 4)
    headers_only = root / "headers.csv"
    headers_only.write_text("something,else\n1,2\n")
    no_token = {"SHIFTGUARD_MONITOR_TOKEN": ""}
    token = {"SHIFTGUARD_MONITOR_TOKEN": "t0ken"}
    edge = (
        f"edge.bundle={bundle}",
        f"edge.storage={root / 'edge'}",
        "edge.port=0",
        "edge.http_port=0",
    )
    m, e, g = str(missing), str(empty), str(garbage)
    return [
        Case(("cohort", "generate", "--out", str(root / "c"), "cohort.n_subjectz=3"),
             ("cohort.n_subjectz",)),
        Case(("ingest", str(missing), "--out", str(root / "i")), (m, NOT_FOUND)),
        Case(("ingest", str(empty_dir), "--out", str(root / "i")), (str(empty_dir), "no dicom")),
        Case(("data", "init", "--dicom", m, "--labels", g), (m, NOT_FOUND)),
        Case(("data", "init", "--dicom", str(empty_dir), "--labels", m),
             (str(empty_dir), "no readable dicom")),
        Case(("data", "lookup", "P-0", "data.identifiers=pseudonymize"), ("data.key_id",)),
        Case(("split", "--manifest", m, "--out", str(root / "s")), (m, NOT_FOUND)),
        Case(("split", "--manifest", e, "--out", str(root / "s")), (e, "empty")),
        Case(("train", "--dataset", m, "--ingest", str(empty_dir), "--out", str(root / "t"),
              "--no-track"), (m, "no split table")),
        Case(("validate", "--model", g, "--dataset", str(headers_only), "--out", str(root / "v"),
              "--no-track"), (g, "not a")),
        Case(("compare", "--last", "0"), ("--last", "at least 1")),
        Case(("experiment", "power", "--dataset", m), (m, NOT_FOUND)),
        Case(("experiment", "power", "--dataset", str(headers_only)),
             (str(headers_only), "column")),
        Case(("experiment", "prepare", "--design", "nosuch"), ("nosuch", "design")),
        Case(("experiment", "report", "--runs", m, "--out", str(root / "r"), "--no-track"),
             (m, "missing")),
        Case(("export", "--model", m, "--out", str(root / "x"), "--no-track"),
             (m, "no trained model")),
        Case(("keys", "generate", "--out", g), (g, "not a folder")),
        Case(("edge", "verify", m), (m, NOT_FOUND)),
        Case(("edge", "verify", g), (g, "not a")),
        Case(("edge", "predict", "--bundle", str(bundle), m, "--out", str(root / "p")),
             (m, NOT_FOUND)),
        Case(("edge", "predict", "--bundle", str(bundle), str(empty_dir), "--out",
              str(root / "p")), (str(empty_dir), "no series predicted")),
        Case(("edge", "serve", "--config", m), (m, NOT_FOUND)),
        Case(("edge", "serve", *edge, "edge.collector_url=https://127.0.0.1:9/"),
             ("collector", "token", "SHIFTGUARD_MONITOR_TOKEN"), no_token),
        Case(("edge", "serve", *edge[:2], f"edge.port={busy}", "edge.http_port=0"),
             (f"127.0.0.1:{busy}", "in use", "edge.port")),
        Case(("edge", "config", "--out", str(empty_dir)), (str(empty_dir), "folder|directory")),
        Case(("edge", "check", "--config", m), (m, NOT_FOUND)),
        Case(("monitor", "collect", f"monitor.collector.port={busy}",
              f"monitor.collector.store={root / 'store.db'}"),
             (f"127.0.0.1:{busy}", "in use", "monitor.collector.port"), token),
        Case(("monitor", "collect", f"monitor.collector.store={root / 'store.db'}"),
             ("SHIFTGUARD_MONITOR_TOKEN",), no_token),
        Case(("monitor", "report", "--bundle", str(bundle), "--results", m,
              f"monitor.workspace={root / 'ws'}"), (m, NOT_FOUND)),
        Case(("monitor", "report", "--bundle", str(bundle), "--results", e,
              f"monitor.workspace={root / 'ws'}"), (e, "empty")),
        Case(("monitor", "check", "--bundle", str(bundle), "--results", str(headers_only),
              f"monitor.workspace={root / 'ws'}"), (str(headers_only), "column")),
        Case(("monitor", "scenarios", "--names", "nosuch", "--bundle", str(bundle)),
             ("nosuch", "scenario")),
        Case(("monitor", "ui", "--port", str(busy)), (f"127.0.0.1:{busy}", "in use")),
        Case(("shadow", "evaluate", "--log", m, "--diagnoses", e, "--out", str(root / "sh"),
              "--no-mlflow"), (m, NOT_FOUND)),
        Case(("shadow", "evaluate", "--log", e, "--diagnoses", e, "--out", str(root / "sh"),
              "--no-mlflow"), (e, "empty")),
        Case(("shadow", "recalibrate", "--log", e, "--diagnoses", e, "--bundle", str(bundle),
              "--out", str(root / "rc"), "--no-mlflow"), (e, "empty")),
        Case(("shadow", "recalibrate", "--log", m, "--bundle", str(bundle), "--no-mlflow"),
             ("--diagnoses",)),
        Case(("shadow", "fetch", "--pacs", "ORTHANC-no-port", "--out", str(root / "f.jsonl")),
             ("ORTHANC-no-port", "AE_TITLE@host:port")),
        Case(("promote", "--report", m, "--dry-run"), (m, "no shadow evaluation")),
        Case(("fleet", "status", "--collector", "http://127.0.0.1:9"),
             ("http://127.0.0.1:9", "cannot be read")),
        Case(("fleet", "status", "--collector", "not-a-url"), ("not-a-url", "cannot be read")),
        Case(("fleet", "rollout", "--collector", "http://127.0.0.1:9", "--dry-run"),
             ("http://127.0.0.1:9", "cannot be read")),
        Case(("config", "dump", "--out", str(root / "p.yaml"), "ingest.min_slicez=3"),
             ("ingest.min_slicez",)),
        Case(("config", "check", "--params", m), (m, NOT_FOUND)),
        Case(("config", "show", "--section", "ingestt"), ("ingestt", "section")),
    ]  # fmt: skip


def _run(case: Case, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **case.env, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    env = {k: v for k, v in env.items() if v != ""}  # "" removes a variable
    return subprocess.run(
        [sys.executable, "-m", "shiftguard.cli", *case.argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_subcommand_turns_bad_input_into_a_message(
    tmp_path: Path, bundle_path: Path, busy_port: int
) -> None:
    cases = _cases(tmp_path, bundle_path, busy_port)
    leaves = leaf_commands(build_parser())
    uncovered = {
        leaf for leaf in leaves if not any(" ".join(c.argv).startswith(leaf + " ") for c in cases)
    }
    assert not uncovered, f"subcommand(s) with no bad-input case: {sorted(uncovered)}"
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = list(pool.map(lambda c: _run(c, tmp_path), cases))
    failures = []
    for case, proc in zip(cases, done, strict=True):
        err = proc.stderr.lower()
        wrong = [
            what
            for what, bad in (
                (f"exit {proc.returncode}", proc.returncode != 2),
                ("a traceback", "traceback" in err),
                *(
                    (f"no '{x}'", not any(a.lower() in err for a in x.split("|")))
                    for x in case.expect
                ),
            )
            if bad
        ]
        if wrong:
            failures.append(f"shiftguard {' '.join(case.argv)}: {', '.join(wrong)}\n{proc.stderr}")
    assert not failures, "\n\n".join(failures)
