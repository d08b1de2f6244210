"""dicom3tools' ``dciodvfy`` on one file, its findings sorted, for the tests that hold ShiftGuard's
DICOM objects to "no errors and no warnings".

dciodvfy prints the name of each IOD it checked on a line of its own (``Comprehensive3DSR``,
``SCImage``), then one line per finding: ``Error - ...``, ``Warning - ...``, or ``Abort - ...``
when it cannot read the file at all (followed by its usage text). It exits non-zero on an error or
an abort, but 0 when it only warns, so a check that reads the exit status alone, or keeps only the
lines starting with ``Error``, passes an object dciodvfy warns about (and one it could not open).

:func:`dciodvfy` runs it (found with :func:`shiftguard.peers.tool`, so where Debian installs
it) and returns an :class:`IodReport`; :func:`assert_dciodvfy_clean` fails a test on any error, any
warning not allowed by its exact text, a non-zero exit status, or any line it cannot classify.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from shiftguard.peers import tool

#: a line naming an IOD dciodvfy recognised and checked (``MRImage``, ``Comprehensive3DSR``)
_IOD_LINE = re.compile(r"[A-Za-z][A-Za-z0-9]*")
#: how long one file may take (a few hundred milliseconds in practice)
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class IodReport:
    """What dciodvfy said about one file.

    Attributes:
        path: The file checked.
        returncode: dciodvfy's exit status (non-zero on an error or when it could not read the file).
        iods: The IODs it recognised, in the order printed.
        errors: Its ``Error - ...`` lines, then any line that is neither an IOD name, an error nor
            a warning (``Abort - ...``, its usage text), trailing blanks removed.
        warnings: Its ``Warning - ...`` lines, trailing blanks removed.
        output: Everything it printed (stdout and stderr, in order).
    """

    path: Path
    returncode: int
    iods: tuple[str, ...]
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    output: str

    def problems(self, allowed_warnings: Collection[str] = ()) -> list[str]:
        """Every finding that makes the file not clean: the errors, a non-zero exit status, and
        the warnings whose exact text is not in ``allowed_warnings``."""
        found = list(self.errors)
        if self.returncode != 0:
            found.append(f"exit status {self.returncode}")
        found += [w for w in self.warnings if w not in allowed_warnings]
        return found

    @property
    def clean(self) -> bool:
        """No error, no warning, exit status 0."""
        return not self.problems()


def parse_output(path: Path | str, output: str, returncode: int) -> IodReport:
    """Sort dciodvfy's ``output`` for ``path`` into IOD names, errors and warnings.

    >>> r = parse_output("x.dcm", "SCImage\\nWarning - Unrecognized defined term <X> \\n", 0)
    >>> r.iods, r.errors, r.warnings, r.clean
    (('SCImage',), (), ('Warning - Unrecognized defined term <X>',), False)
    >>> parse_output("y.dcm", "Abort - File open for read failed\\n", 1).errors
    ('Abort - File open for read failed',)
    """
    iods: list[str] = []
    errors: list[str] = []
    warnings: list[str] = []
    for raw in output.splitlines():
        line = raw.rstrip()
        if not line:
            continue
        if line.startswith("Warning"):
            warnings.append(line)
        elif line.startswith("Error") or not _IOD_LINE.fullmatch(line):
            errors.append(line)
        else:
            iods.append(line)
    return IodReport(Path(path), returncode, tuple(iods), tuple(errors), tuple(warnings), output)


def dciodvfy(path: Path | str) -> IodReport:
    """Run dciodvfy on ``path`` and sort what it says (see :func:`parse_output`).

    Raises:
        shiftguard.peers.PeerMissingError: dciodvfy is not installed.
    """
    proc = subprocess.run(
        [tool("dciodvfy"), str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    return parse_output(path, proc.stdout, proc.returncode)


def assert_dciodvfy_clean(
    path: Path | str, iod: str | None = None, allowed_warnings: Collection[str] = ()
) -> IodReport:
    """Fail unless dciodvfy finds ``path`` free of errors and warnings (exit status 0), the
    warnings in ``allowed_warnings`` (exact text, trailing blanks removed) excepted, and, when
    ``iod`` is given, checked it as that IOD.

    Returns:
        The report, for further assertions.
    """
    report = dciodvfy(path)
    problems = report.problems(allowed_warnings)
    assert not problems, f"{path}: dciodvfy found\n" + "\n".join(problems)
    if iod is not None:
        assert iod in report.iods, f"{path}: dciodvfy checked {report.iods}, expected {iod}"
    return report
