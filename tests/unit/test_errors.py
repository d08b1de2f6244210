"""Every error a user can meet is defined in ``shiftguard.errors``; the modules that raise one still
export it under the name callers import it by."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from shiftguard import errors

PACKAGE = Path(errors.__file__).resolve().parent

# where each error was defined before it moved to shiftguard.errors; callers import it from there
OLD_PATHS = {
    "shiftguard.augment.fast": ["SimInputError"],
    "shiftguard.augment.randconv": ["RandConvInputError"],
    "shiftguard.augment.robustness": ["RobustnessInputError"],
    "shiftguard.augment.transforms": ["BackendUnavailableError"],
    "shiftguard.config": ["ConfigError"],
    "shiftguard.cohort": [
        "CohortError",
        "OutputDirectoryError",
        "TemplateNotFoundError",
        "UnsupportedTransferSyntaxError",
    ],
    "shiftguard.data.identifiers": ["PseudonymKeyError"],
    "shiftguard.data.ingest": ["IngestInputError"],
    "shiftguard.data.labels": ["LabelFileError"],
    "shiftguard.data.source": ["DataSourceError"],
    "shiftguard.data.split": ["SplitInputError", "TooFewLabelledError"],
    "shiftguard.edge.bundle": ["BundleError"],
    "shiftguard.edge.predict": ["InputError"],
    "shiftguard.edge.shipper": ["CollectorAddressError"],
    "shiftguard.edge.signing": ["KeyFileError", "SignatureError"],
    "shiftguard.evaluation.validate": ["ValidationError"],
    "shiftguard.experiment.design": ["DesignInputError"],
    "shiftguard.experiment.report": ["ExperimentReportError"],
    "shiftguard.experiment.runner": ["ExperimentInputError"],
    "shiftguard.experiment.stats": ["PairedInputError"],
    "shiftguard.export.stage": ["ExportError"],
    "shiftguard.metrics": ["MetricInputError"],
    "shiftguard.monitor.drift": ["DriftInputError"],
    "shiftguard.monitor.report": ["PageError"],
    "shiftguard.monitor.runner": ["ResultsFileError"],
    "shiftguard.peers": ["PeerMissingError"],
    "shiftguard.records.contract": ["InvalidRecordError"],
    "shiftguard.shadow.diagnoses": ["DiagnosisFileError"],
    "shiftguard.shadow.evaluate": ["ShadowInputError"],
    "shiftguard.shadow.log": ["ShadowLogError"],
    "shiftguard.shadow.pacs": ["PacsError"],
    "shiftguard.shadow.promote": ["PromotionError"],
    "shiftguard.tls": ["TlsConfigError"],
    "shiftguard.training.loop": ["ModelFileError"],
    "shiftguard.training.stage": ["TrainingDataError"],
}


def _user_errors() -> set[str]:
    return {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.ShiftGuardError)
    }


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def test_no_module_but_errors_defines_a_user_facing_error() -> None:
    known = _user_errors()
    elsewhere = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and {_base_name(b) for b in node.bases} & known:
                elsewhere.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not elsewhere, f"define these in shiftguard/errors.py: {elsewhere}"


def test_every_error_in_errors_derives_from_the_root_and_is_defined_there() -> None:
    for name in _user_errors():
        assert getattr(errors, name).__module__ == "shiftguard.errors", name
    assert _user_errors() >= {n for names in OLD_PATHS.values() for n in names}


@pytest.mark.parametrize("module", sorted(OLD_PATHS))
def test_an_error_still_imports_from_where_it_was_defined(module: str) -> None:
    loaded = importlib.import_module(module)
    for name in OLD_PATHS[module]:
        assert getattr(loaded, name) is getattr(errors, name), f"{module}.{name}"


def test_the_errors_keep_their_bases_and_messages() -> None:
    assert errors.ConfigError.__mro__[1:3] == (errors.ShiftGuardError, ValueError)
    assert issubclass(errors.DesignInputError, errors.PairedInputError)
    assert issubclass(errors.TemplateNotFoundError, errors.CohortError)
    assert issubclass(errors.TemplateNotFoundError, FileNotFoundError)
    err = errors.InvalidRecordError({3: ["no site"]}, what="batch records")
    assert str(err).startswith("1 invalid batch records (record 3: no site)")
    assert err.problems == {3: ["no site"]}
