"""Pseudonyms for what identifies a patient, so a site's cohort leaves no PHI in what the pipeline writes.

With ``data.identifiers: pseudonymize`` the ingest manifest, the quarantine, the split table, the
labels report and everything downstream (reports, MLflow, the bundle) carry

* ``P-<16 hex>`` for PatientID and ``A-<16 hex>`` for AccessionNumber: HMAC-SHA-256 under the
  source's secret key, so the same patient gets the same pseudonym in every run (the split stays
  patient-level) and nobody without the key can test a guessed ID against it;
* ``F-<16 hex>`` for a file's path inside the DICOM tree (exports name folders after patients);
* ``2.25.<decimal>`` for study and series UIDs (vendors' UIDs often hold the acquisition date and
  time): still valid UIDs, the same for the same UID, so every table keeps joining;
* study dates cut to the month (``YYYYMM``): a temporal split still works, the day does not leave;
* ages over 89 as 90 (HIPAA's Safe Harbor groups them).

Stages that meet the DICOM again (export's drift reference, edge_predict) compare through
:meth:`Pseudonymizer.uid` (see :class:`Pseudonymized`); the monitor and shadow stages read the edge
runner's results through :func:`lab_copy_of_results`.

The key is a site secret like a signing key: ``<config dir>/pseudonym/<source>.key``
(``$SHIFTGUARD_PSEUDONYM_KEY`` names another file). The config holds only its fingerprint
(``data.key_id``), so a missing or different key fails before anything is written. Share the key the
way the data is shared; ``shiftguard data lookup`` turns pseudonyms from a report back into the
identifiers on site.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shiftguard.errors import PseudonymKeyError
from shiftguard.utils import config_dir

ENV_KEY = "SHIFTGUARD_PSEUDONYM_KEY"
#: the oldest age written as itself; older patients are written as :data:`AGE_CAP`
AGE_CAP = 90


def key_path(source: str) -> Path:
    """Where the key of data source ``source`` lives: ``$SHIFTGUARD_PSEUDONYM_KEY``, else
    ``<config dir>/pseudonym/<source>.key``."""
    env = os.environ.get(ENV_KEY)
    return Path(env) if env else config_dir() / "pseudonym" / f"{source}.key"


def fingerprint(key: bytes) -> str:
    """The key's public fingerprint (``data.key_id``): 16 hex digits of SHA-256 over a label and it.

    >>> fingerprint(bytes(32))
    '4de0b527ebd027f0'
    """
    return hashlib.sha256(b"shiftguard-pseudonym-key\0" + key).hexdigest()[:16]


def generate_key(source: str, overwrite: bool = False) -> tuple[Path, str]:
    """Write a new random 256-bit key for ``source`` (owner-only file) and return it and its id.

    An existing key is kept and returned (pseudonyms must not change under a running project) unless
    ``overwrite``.
    """
    path = key_path(source)
    if path.is_file() and not overwrite:
        return path, fingerprint(_read(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    tmp.replace(path)
    return path, fingerprint(_read(path))


def _read(path: Path) -> bytes:
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise PseudonymKeyError(f"{path}: not a pseudonym key (64 hex digits expected)") from None
    if len(key) < 16:
        raise PseudonymKeyError(f"{path}: key too short ({len(key)} bytes; 32 expected)")
    return key


def load_key(source: str, key_id: str) -> bytes:
    """The key of ``source``, checked against the config's ``key_id``.

    Raises:
        PseudonymKeyError: no key file, or a key with another fingerprint.
    """
    path = key_path(source)
    if not path.is_file():
        raise PseudonymKeyError(
            f"{path}: no pseudonym key for data source {source!r} (data.key_id={key_id}); copy the "
            f"key from where the data was set up, or point ${ENV_KEY} at it"
        )
    key = _read(path)
    if fingerprint(key) != key_id:
        raise PseudonymKeyError(
            f"{path}: key {fingerprint(key)} is not data.key_id={key_id}; with another key every "
            "pseudonym would change. Use the source's key, or run `shiftguard data init` again"
        )
    return key


@dataclass(frozen=True)
class Pseudonymizer:
    """Applies the source's identifier policy; ``key=None`` keeps identifiers as they are.

    >>> p = Pseudonymizer(bytes(32))
    >>> p.patient("12345"), p.study_date("20210317"), p.age("97")
    ('P-f98ed5b8d59cbd5f', '202103', '90')
    >>> Pseudonymizer(None).patient("12345")
    '12345'
    """

    key: bytes | None

    @property
    def active(self) -> bool:
        """Whether identifiers are replaced."""
        return self.key is not None

    def token(self, kind: str, value: str) -> str:
        """``<kind>-<16 hex>``, the keyed hash of ``value``; empty stays empty."""
        if self.key is None or not value:
            return value
        mac = hmac.new(self.key, f"{kind}\0{value.strip()}".encode(), hashlib.sha256)
        return f"{kind}-{mac.hexdigest()[:16]}"

    def patient(self, patient_id: str) -> str:
        """PatientID -> ``P-...``."""
        return self.token("P", patient_id)

    def accession(self, accession_number: str) -> str:
        """AccessionNumber -> ``A-...``."""
        return self.token("A", accession_number)

    def path(self, relative_path: str) -> str:
        """A file's path inside the DICOM tree -> ``F-...``."""
        return self.token("F", relative_path)

    def uid(self, uid: str) -> str:
        """A study or series UID -> ``2.25.<decimal>`` (a UUID-derived UID, PS3.5 B.2)."""
        if self.key is None or not uid:
            return uid
        mac = hmac.new(self.key, f"U\0{uid.strip()}".encode(), hashlib.sha256)
        return f"2.25.{int(mac.hexdigest()[:32], 16)}"

    def study_date(self, date: str) -> str:
        """``YYYYMMDD`` (or ``YYYY-MM-DD``) -> ``YYYYMM``; anything shorter is kept."""
        if self.key is None:
            return date
        digits = "".join(c for c in date if c.isdigit())
        return digits[:6] if len(digits) >= 6 else digits

    def age(self, years: str) -> str:
        """Ages over 89 -> ``90``."""
        if self.key is None or not years:
            return years
        try:
            return str(AGE_CAP) if float(years) >= AGE_CAP else years
        except ValueError:
            return years


def lab_copy_of_results(results: Path, ids: Pseudonymizer, folder: Path) -> Path:
    """The edge runner's ``results.csv`` as the lab side may keep it: study and series UIDs as their
    pseudonyms (so they join the split's tables) and ``study_datetime`` cut to the first of its
    month; written to ``folder``. The edge's own file, which stays on site, is left as it is."""
    import pandas as pd

    frame = pd.read_csv(results, dtype=str, keep_default_na=False)
    for column in ("study_uid", "series_uid"):
        if column in frame:
            frame[column] = frame[column].map(ids.uid)
    if "study_datetime" in frame:
        month = frame["study_datetime"].map(ids.study_date)
        frame["study_datetime"] = [
            f"{m[:4]}-{m[4:6]}-01T00:00:00Z" if len(m) == 6 else "" for m in month
        ]
    out = Path(folder) / Path(results).name
    frame.to_csv(out, index=False)
    return out


class Pseudonymized(Collection[str]):
    """UIDs as the DICOM holds them, tested against pseudonymized ones: ``uid in it`` is whether
    ``ids.uid(uid)`` is among ``pseudonyms`` (for the stages that read the DICOM again)."""

    def __init__(self, ids: Pseudonymizer, pseudonyms: Iterable[str]) -> None:
        self.ids = ids
        self.pseudonyms = frozenset(pseudonyms)

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, str) and self.ids.uid(uid) in self.pseudonyms

    def __iter__(self) -> Iterator[str]:
        return iter(self.pseudonyms)

    def __len__(self) -> int:
        return len(self.pseudonyms)


def pseudonymizer(source: str, identifiers: str, key_id: str | None) -> Pseudonymizer:
    """The policy of a data config (``data.name``, ``data.identifiers``, ``data.key_id``)."""
    if identifiers == "keep":
        return Pseudonymizer(None)
    if key_id is None:
        raise PseudonymKeyError(
            f"data source {source!r}: identifiers=pseudonymize needs data.key_id"
        )
    return Pseudonymizer(load_key(source, key_id))


__all__ = [
    "AGE_CAP",
    "ENV_KEY",
    "PseudonymKeyError",
    "Pseudonymized",
    "Pseudonymizer",
    "fingerprint",
    "generate_key",
    "key_path",
    "lab_copy_of_results",
    "load_key",
    "pseudonymizer",
]
