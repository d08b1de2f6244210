"""A longer fuzz campaign over the parsers that read untrusted bytes.

Runs the properties of ``tests/fuzz_targets.py`` (the same ones the test suite runs with a small,
seeded budget) with a larger budget per target and prints, per target, how many examples were run,
how long it took and the distinct failures found. A failure is told apart by its exception type and
the line that raised it; once found, it is recorded with its shrunk example and the search goes on
(with the next seed) for other failures until the budget is spent.

With ``--engine atheris`` the same properties take raw bytes from libFuzzer's coverage-guided
mutator (atheris, where it installs), started from the valid seeds; each target runs in a child
process, which stops at its first failure and writes the input under ``--artifacts``.

Usage::

    python scripts/fuzz_campaign.py --examples 5000
    python scripts/fuzz_campaign.py --examples 500 --only scan_uids --seed 7
    python scripts/fuzz_campaign.py --engine atheris --examples 100000
"""

from __future__ import annotations

import argparse
import inspect
import logging
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import fuzz_targets  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis.errors import Found  # noqa: E402


@dataclass
class Report:
    """One target's campaign: property evaluations (shrinking included), seconds, failures."""

    name: str
    budget: int
    calls: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)  # signature -> shrunk example


def signature(exc: BaseException) -> str:
    """Exception type and the line that raised it: one bug, whatever the input."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"
    if isinstance(exc, RecursionError):  # raised wherever the stack ran out: one bug per file
        where = Path(frames[-1].filename).name
    return f"{type(exc).__name__} at {where}"


def _property(
    target: fuzz_targets.Target, report: Report, known: set[str], found: list[tuple[str, Any]]
) -> Any:
    def prop(value: Any) -> None:
        report.calls += 1
        try:
            target.check(value)
        except Exception as exc:
            sig = signature(exc)
            if sig in known:
                return  # already recorded: look for something else
            found[:] = [(sig, value)]
            raise

    return prop


def run_target(target: fuzz_targets.Target, examples: int, first_seed: int) -> Report:
    report = Report(target.name, examples)
    started = time.perf_counter()
    known: set[str] = set()
    remaining, round_ = examples, 0
    while remaining > 0:
        calls_before = report.calls
        found: list[tuple[str, Any]] = []
        test = given(target.strategy)(_property(target, report, known, found))
        test = settings(
            max_examples=remaining,
            database=None,
            deadline=None,
            print_blob=False,
            report_multiple_bugs=False,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )(test)
        test = seed(first_seed + round_)(test)
        try:
            test()
        except (Exception, Found) as exc:
            sig, value = found[-1] if found else (signature(exc), None)
            known.add(sig)
            report.failures[sig] = repr(value)[:300]
            remaining -= max(report.calls - calls_before, 1)
            round_ += 1
            continue
        break
    report.seconds = time.perf_counter() - started
    return report


# ------------------------------------------------------------------------------------------------
# atheris: coverage-guided byte fuzzing of the same properties
# ------------------------------------------------------------------------------------------------


def byte_targets(scratch: Path, harness: fuzz_targets.ConnectionHarness) -> dict[str, Any]:
    """Target name -> (property taking raw bytes, seed inputs)."""
    ft = fuzz_targets
    seeds = (*ft.DICOM_SEEDS, ft.pydicom_seed())
    files = [s.encode() for s in seeds] + [s.encode(ft.IMPLICIT) for s in seeds]
    stream = b"".join(
        [
            ft.associate_rq(),
            ft.p_data([(3, 0x03, ft.c_echo_rq(1))]),
            *ft.store_pdus(1, 2, ft.SOP_UID, 100),
            ft.RELEASE_RQ,
        ]
    )
    return {
        "dicom.binary.parse_header": (ft.check_parse_header, files),
        "edge.receiver.scan_uids": (ft.check_scan_uids, files),
        "dicom.pixels._fragments": (ft.check_fragments, [ft.encapsulated_pixels()]),
        "dicom.scan.read_headers": (
            lambda data: ft.check_read_headers(data, scratch / "headers.dcm"),
            files,
        ),
        "edge.scp._Connection": (lambda data: ft.check_connection(harness, [data]), [stream]),
        "edge.scp.AssociateRequest.decode": (ft.check_associate_decode, [ft.associate_rq()[6:]]),
        "edge.scp.parse_command": (
            ft.check_parse_command,
            [ft.c_echo_rq(1), ft.c_store_rq(2, ft.SOP_UID)],
        ),
    }


def _instrument_shiftguard(atheris: Any) -> None:
    """Coverage feedback from ShiftGuard's own code only (instrumenting every loaded module,
    pydicom and hypothesis included, costs about 25 s per target)."""
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("shiftguard"):
            continue
        for value in vars(module).values():
            if getattr(value, "__module__", None) != module_name:
                continue
            functions = [value] if inspect.isfunction(value) else []
            if inspect.isclass(value):
                functions = [f for f in vars(value).values() if inspect.isfunction(f)]
            for function in functions:
                atheris.instrument_func(function)


def atheris_child(name: str, runs: int, artifacts: Path) -> None:
    """Fuzz one target under libFuzzer in this process (exits when done or at a failure)."""
    import atheris

    fuzz_targets.TIME_LIMITS = False  # libFuzzer's -timeout catches hangs; it owns SIGALRM
    artifacts.mkdir(parents=True, exist_ok=True)
    harness = fuzz_targets.ConnectionHarness()
    scratch = Path(tempfile.mkdtemp())
    check, seeds = byte_targets(scratch, harness)[name]
    corpus = scratch / "corpus"
    corpus.mkdir()
    for i, data in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(data)
    _instrument_shiftguard(atheris)
    atheris.Setup(
        [sys.argv[0], f"-runs={runs}", "-max_len=65536", "-timeout=10", "-rss_limit_mb=4096",
         f"-artifact_prefix={artifacts}/{name}-", str(corpus)],
        check,
    )  # fmt: skip
    atheris.Fuzz()


def run_atheris(args: argparse.Namespace) -> int:
    artifacts = Path(args.artifacts).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    harness = fuzz_targets.ConnectionHarness()
    names = list(byte_targets(Path(tempfile.gettempdir()), harness))
    harness.close()
    total_runs, total_s, failures = 0, 0.0, 0
    for name in names:
        if args.only and args.only not in name:
            continue
        started = time.perf_counter()
        child = subprocess.run(
            [sys.executable, __file__, "--atheris-child", name, "--examples", str(args.examples),
             "--artifacts", str(artifacts)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        out = child.stdout + child.stderr
        done = re.search(r"Done (\d+) runs", out)
        counts = [int(n) for n in re.findall(r"^#(\d+)\s", out, re.MULTILINE)]
        runs = int(done.group(1)) if done else max(counts, default=0)
        failed = child.returncode != 0
        total_runs, total_s, failures = total_runs + runs, total_s + seconds, failures + failed
        print(f"{name:48s} {runs:7d} examples {seconds:8.1f} s {int(failed):3d} failure(s)")
        if failed:
            lines = [ln for ln in out.splitlines() if ln.strip()]
            error = next(
                (ln for ln in reversed(lines) if re.match(r"^\w*(Error|Exception)", ln)), ""
            )
            written = re.search(r"Test unit written to (\S+)", out)
            print(
                f"    {error or lines[-1]}\n        input: {written.group(1) if written else '?'}"
            )
    print(f"{'total':48s} {total_runs:7d} examples {total_s:8.1f} s {failures:3d} failure(s)")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="budget per target")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--only", default="", help="run the targets whose name contains this")
    parser.add_argument("--engine", choices=["hypothesis", "atheris"], default="hypothesis")
    parser.add_argument("--artifacts", default="fuzz-artifacts", help="atheris: failing inputs")
    parser.add_argument("--atheris-child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # the parsers log every refusal; errors are still reported
    warnings.simplefilter("ignore")  # pydicom warns about every odd value it reads
    if args.atheris_child:
        atheris_child(args.atheris_child, args.examples, Path(args.artifacts))
        return 0
    if args.engine == "atheris":
        return run_atheris(args)

    harness = fuzz_targets.ConnectionHarness()
    with tempfile.TemporaryDirectory() as scratch:
        targets = fuzz_targets.walker_targets(Path(scratch)) + fuzz_targets.scp_targets(harness)
        reports = []
        for target in targets:
            if args.only and args.only not in target.name:
                continue
            report = run_target(target, args.examples, args.seed)
            reports.append(report)
            print(
                f"{report.name:48s} {report.calls:7d} examples {report.seconds:8.1f} s "
                f"{len(report.failures):3d} failure(s)",
                flush=True,
            )
            for sig, example in report.failures.items():
                print(f"    {sig}\n        {example}", flush=True)
    harness.close()
    total_calls = sum(r.calls for r in reports)
    total_s = sum(r.seconds for r in reports)
    total_failures = sum(len(r.failures) for r in reports)
    print(
        f"{'total':48s} {total_calls:7d} examples {total_s:8.1f} s {total_failures:3d} failure(s)"
    )
    return 1 if total_failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
