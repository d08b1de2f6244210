"""Every typed error of ShiftGuard, in one place.

Every error a user can meet derives from :class:`ShiftGuardError` and is defined here, grouped by
the area that raises it; its message names the input, what is wrong with it, and what to do. The
command line prints such errors without a traceback (exit 2), and so a path it was given that is
missing, unreadable or of the wrong kind (``FileNotFoundError`` and its kin, which carry the file's
name); anything else is a bug and keeps its traceback. The modules that raise an error import it
from here, so it can also be imported from them
(``from shiftguard.edge.bundle import BundleError``).

This module imports nothing from ShiftGuard: it is the bottom layer.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

# --------------------------------------------------------------------------------------------------
# The root, and what every area shares
# --------------------------------------------------------------------------------------------------


class ShiftGuardError(Exception):
    """An input (file, series, config key, table) that ShiftGuard cannot accept, and why."""


class PortInUseError(ShiftGuardError):
    """A service cannot listen where its settings say: the port is taken or the address is not ours."""


@contextmanager
def listening(host: str, port: int, setting: str) -> Iterator[None]:
    """Turn a failure to bind ``host:port`` into a :class:`PortInUseError` naming ``setting``.

    Args:
        host: the listen address.
        port: the port.
        setting: where the user sets it, e.g. ``"edge.port"``.

    Raises:
        PortInUseError: the address is in use, not assigned to this machine, or needs privileges.
    """
    try:
        yield
    except PortInUseError:
        raise
    except OSError as exc:
        reasons = {
            errno.EADDRINUSE: "is in use by another process",
            errno.EADDRNOTAVAIL: "is not an address of this machine",
            errno.EACCES: "needs privileges (ports below 1024)",
        }
        reason = reasons.get(exc.errno or 0)  # asyncio rewords its bind error, keeps the errno
        if reason is None:
            raise
        raise PortInUseError(
            f"{host}:{port} {reason}: stop it or choose another ({setting})"
        ) from None


class EmptyInputError(ShiftGuardError, ValueError):
    """An input that exists but holds nothing to work on (no DICOM series, no rows)."""


# --------------------------------------------------------------------------------------------------
# Configuration (config/): composing conf/, validating a section, reading a site file
# --------------------------------------------------------------------------------------------------


class ConfigError(ShiftGuardError, ValueError):
    """A configuration file, override or section is missing or invalid; the message names the key."""


# --------------------------------------------------------------------------------------------------
# DICOM (dicom/, data/ingest): an ingest error (DicomIngestError and its subclasses) carries a
# short machine-readable ``code`` (a slug used in the quarantine report), a ``reason`` (what is
# wrong, with which input) and a ``fix`` (what would make the input acceptable); ``str(err)`` joins
# them into one readable sentence. InvalidUidError is a plain error naming the value.
# --------------------------------------------------------------------------------------------------


class DicomIngestError(ShiftGuardError):
    """Base of all DICOM ingest errors.

    Args:
        code: Short slug naming the problem, e.g. ``"missing_slice"``.
        reason: What is wrong and with which input.
        fix: What would fix it.
    """

    def __init__(self, code: str, reason: str, fix: str) -> None:
        self.code = code
        self.reason = reason
        self.fix = fix
        super().__init__(f"{reason} [{code}]. To fix: {fix}")

    def __reduce__(self) -> tuple[object, ...]:
        # Keeps the error picklable across process pools despite the keyword-rich __init__.
        return (self.__class__._rebuild, (self.__class__, self.__dict__.copy()))

    @staticmethod
    def _rebuild(cls: type[DicomIngestError], state: dict[str, object]) -> DicomIngestError:
        err = cls.__new__(cls)
        err.__dict__.update(state)
        Exception.__init__(err, f"{err.reason} [{err.code}]. To fix: {err.fix}")
        return err


class UnreadableFileError(DicomIngestError):
    """One file cannot be used: not DICOM, truncated, not an image, malformed header, ...

    Args:
        path: The file.
        code: Short slug, e.g. ``"truncated"``, ``"not_dicom"``, ``"not_image"``, ``"dicomdir"``.
        reason: What is wrong with it.
        fix: What would fix it.
    """

    def __init__(self, path: str, code: str, reason: str, fix: str) -> None:
        self.path = path
        super().__init__(code, reason, fix)


class InvalidSeriesError(DicomIngestError):
    """A series cannot be assembled into a volume: mixed geometry, missing slice, bad pixels, ...

    Args:
        code: Short slug, e.g. ``"missing_slice"``, ``"duplicate_position"``.
        reason: What is wrong with the series.
        fix: What would fix it.
        files: The series' files (paths as given in the slice headers).
    """

    def __init__(self, code: str, reason: str, fix: str, files: Sequence[str] = ()) -> None:
        self.files = tuple(files)
        super().__init__(code, reason, fix)


class PixelDecodeError(InvalidSeriesError):
    """The pixel data of one file of a series could not be read or decoded."""


class InvalidUidError(ShiftGuardError, ValueError):
    """A value that should be a DICOM UID breaks the UI rules (PS3.5 9.1); the message names it."""


# --------------------------------------------------------------------------------------------------
# Kernels: metrics.py, tls.py, peers.py
# --------------------------------------------------------------------------------------------------


class MetricInputError(ShiftGuardError, ValueError):
    """Labels, scores or a metric option that cannot be evaluated; the message names which and why."""


class TlsConfigError(ShiftGuardError, ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file."""


class PeerMissingError(ShiftGuardError, FileNotFoundError):
    """A peer program is not installed; the message names it and the package that installs it."""


# --------------------------------------------------------------------------------------------------
# Data (data/): ingest, split, labels, data sources, pseudonyms
# --------------------------------------------------------------------------------------------------


class IngestInputError(ShiftGuardError, FileNotFoundError):
    """The folder to ingest is missing or holds no file at all."""


class SplitInputError(ShiftGuardError, ValueError):
    """The manifest or the diagnoses table cannot be split; the message names the file and column."""


class TooFewLabelledError(SplitInputError):
    """Too few labelled studies remain after the join for the configured split."""


class LabelFileError(ShiftGuardError, ValueError):
    """A label file cannot be read or lacks a mapped column; the message names the file."""


class DataSourceError(ShiftGuardError, ValueError):
    """The export or label file cannot make a data source; the message says which and why."""


class PseudonymKeyError(ShiftGuardError, ValueError):
    """The pseudonym key is missing or is not the one the data config names; says which file."""


# --------------------------------------------------------------------------------------------------
# Feature records (records/contract.py)
# --------------------------------------------------------------------------------------------------


class InvalidRecordError(ShiftGuardError, ValueError):
    """Records that do not follow the record schema; ``problems`` maps each one's index in the
    batch to what is wrong with it."""

    def __init__(self, problems: Mapping[int, Sequence[str]], what: str = "records") -> None:
        self.problems = {int(i): list(p) for i, p in problems.items()}
        shown = "; ".join(f"record {i}: {', '.join(p)}" for i, p in list(self.problems.items())[:5])
        more = len(self.problems) - 5
        super().__init__(
            f"{len(self.problems)} invalid {what} ({shown}{f'; and {more} more' if more > 0 else ''}); "
            "build records with shiftguard.records.features.make_record"
        )


# --------------------------------------------------------------------------------------------------
# Edge runtime (edge/): bundles, signatures, predict, the record shipper
# --------------------------------------------------------------------------------------------------


class BundleError(ShiftGuardError, ValueError):
    """A bundle cannot be trusted or used; the message names the file and the problem."""


class SmokeTestError(BundleError):
    """A bundle failed its smoke test on its own reference series: it is not served."""


class KeyFileError(ShiftGuardError, ValueError):
    """A key file is missing or malformed; the message names the file."""


class SignatureError(ShiftGuardError, ValueError):
    """A bundle's signature is missing, unknown or does not verify; the message names the bundle."""


class InputError(ShiftGuardError, FileNotFoundError):
    """A path given to ``predict`` does not exist."""


class CollectorAddressError(ShiftGuardError, ValueError):
    """A collector or registry URL a client must not use (not http(s), or plain HTTP across the
    network)."""


class RegistryError(ShiftGuardError):
    """The model registry cannot be reached, or answers something unusable; the message names the
    registry and the request. A following site keeps serving what it has."""


# --------------------------------------------------------------------------------------------------
# Synthetic cohort (cohort/)
# --------------------------------------------------------------------------------------------------


class CohortError(ShiftGuardError):
    """The cohort cannot be generated from this configuration or into this folder."""


class TemplateNotFoundError(CohortError, FileNotFoundError):
    """The MNI152 template that the anatomy is built from is missing (nilearn not installed)."""


class UnsupportedTransferSyntaxError(CohortError, ValueError):
    """A scanner profile asks for a transfer syntax that is unknown or has no working encoder."""


class OutputDirectoryError(CohortError, FileExistsError):
    """The output folder holds files that the generator did not write and will not overwrite."""


# --------------------------------------------------------------------------------------------------
# Augmentation (augment/): scanner simulation, random convolutions, the robustness sets
# --------------------------------------------------------------------------------------------------


class BackendUnavailableError(ShiftGuardError, ImportError):
    """The requested simulation backend cannot be imported; the message says which and what to do."""


class SimInputError(ShiftGuardError, ValueError):
    """A volume, spacing or :class:`SimParams` field that the simulation cannot apply, and why."""


class RandConvInputError(ShiftGuardError, ValueError):
    """A kernel size, mixing range or image that random convolutions cannot use."""


class RobustnessInputError(ShiftGuardError, ValueError):
    """The dataset table or a volume it names cannot be used; the message names it."""


# --------------------------------------------------------------------------------------------------
# Training (training/)
# --------------------------------------------------------------------------------------------------


class ModelFileError(ShiftGuardError, ValueError):
    """A ``model.pt`` or checkpoint that is missing, unreadable or not written by training."""


class TrainingDataError(ShiftGuardError, ValueError):
    """The split table cannot be trained on (missing, a split empty, one class only)."""


# --------------------------------------------------------------------------------------------------
# Validation (evaluation/)
# --------------------------------------------------------------------------------------------------


class ValidationError(ShiftGuardError, ValueError):
    """The inputs of the validation stage cannot be judged (a split missing, one class only)."""


# --------------------------------------------------------------------------------------------------
# Central monitoring (monitor/): drift, edge results, reports
# --------------------------------------------------------------------------------------------------


class DriftInputError(ShiftGuardError, ValueError):
    """A reference or current table, or a column kind, that drift cannot be computed on."""


class ResultsFileError(ShiftGuardError, ValueError):
    """An ``edge predict`` results file that is missing, empty or lacks a column."""


class PageError(ShiftGuardError, RuntimeError):
    """Evidently's rendered report does not have the shape the ShiftGuard header is put into."""


class CollectorStoreError(ShiftGuardError):
    """The collector's record store cannot be opened (a PostgreSQL server that does not answer,
    a database or credentials it refuses); the message names the store without its password."""


class EstimationError(ShiftGuardError, ValueError):
    """A reference or window table that label-free performance estimation cannot use (no labelled
    held-out rows, one class only, a missing column); the message names the table and column."""


# --------------------------------------------------------------------------------------------------
# Shadow mode (shadow/): logs, diagnoses, evaluation, the PACS, promotion
# --------------------------------------------------------------------------------------------------


class ShadowLogError(ShiftGuardError):
    """A shadow log that cannot be read (missing, not a queue or results file, lacking columns)."""


class DiagnosisFileError(ShiftGuardError):
    """A diagnosis file that cannot be read at all (missing, empty, not CSV or JSON lines)."""


class ShadowInputError(ShiftGuardError, ValueError):
    """A shadow log the evaluation cannot judge as given (missing columns, mixed thresholds)."""


class PacsError(ShiftGuardError):
    """A PACS that cannot be asked: a bad address, unreachable, refusing, or failing a request."""


class PromotionError(ShiftGuardError):
    """The promotion cannot be judged at all (no report, challenger unknown to the registry)."""


# --------------------------------------------------------------------------------------------------
# Export (export/)
# --------------------------------------------------------------------------------------------------


class ExportError(ShiftGuardError, ValueError):
    """The model cannot be exported faithfully; the message says what differs and by how much."""


# --------------------------------------------------------------------------------------------------
# Experiment (experiment/): paired statistics, designs, sweeps, the report
# --------------------------------------------------------------------------------------------------


class PairedInputError(ShiftGuardError, ValueError):
    """Scores, labels or thresholds of two arms that cannot be compared in pairs."""


class DesignInputError(PairedInputError):
    """A split table that cannot give the class counts of a design."""


class ExperimentInputError(ShiftGuardError, ValueError):
    """A design's data is missing or unusable; the message names the file and what to do."""


class ExperimentReportError(ShiftGuardError, ValueError):
    """The sweep's cells cannot be compared; the message says which cell or file and why."""
