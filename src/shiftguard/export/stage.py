"""The export stage: ONNX and TorchScript, parity checks, the bundle, MLflow (see the package)."""

from __future__ import annotations

import io
import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from shiftguard.calibration import Calibration
from shiftguard.config.deploy import ExportConfig
from shiftguard.config.schema import IngestConfig, TrainConfig
from shiftguard.data.volume import read_nifti
from shiftguard.dicom.scan import list_files, scan_files
from shiftguard.dicom.series import group_series
from shiftguard.edge.bundle import (
    CALIBRATION_MEMBER,
    CARD_MEMBER,
    bundle_file_name,
    content_version,
    open_bundle,
    sha256_bytes,
    write_bundle,
)
from shiftguard.edge.predict import FEATURES, Predictor
from shiftguard.edge.preprocess import preprocess
from shiftguard.edge.signing import (
    SIGNING_KEY_ENV,
    SigningKey,
    Trust,
    default_signer,
    development_key_path,
    read_signing_key,
)
from shiftguard.edge.smoke import SMOKE_MEMBER, SMOKE_SECTION, SMOKE_TOLERANCE, smoke_volume
from shiftguard.errors import ExportError, InvalidSeriesError, MetricInputError
from shiftguard.evaluation.validate import is_external_profile
from shiftguard.metrics import format_interval
from shiftguard.records.features import (
    BY_NAME,
    FEATURE_NAMES,
    Projection,
    clean_value,
    output_features,
)
from shiftguard.records.features import SCHEMA_VERSION as MONITOR_SCHEMA
from shiftguard.tracking import (
    BUNDLE_VERSION_TAG,
    CHALLENGER,
    CHAMPION,
    data_version,
    file_sha256,
    tracking_uri,
    trained_model,
)

log = logging.getLogger(__name__)

ONNX_MEMBER = "model.onnx"
TORCHSCRIPT_MEMBER = "model.torchscript.pt"
REFERENCE_MEMBER = "reference.csv"
PROJECTION_MEMBER = "embedding_pca.json"
#: the validation reports the bundle carries (and the card quotes)
VALIDATION_FILES = ("metrics.json", "segments.csv", "robustness.csv")
#: acquisition columns of the split table kept in the drift baseline (no identifiers, no dates)
PREPROCESSING_TOLERANCE = 1e-5


@dataclass
class ExportSummary:
    """What the export stage wrote and measured."""

    bundle: str
    bundle_sha256: str
    bundle_bytes: int
    name: str
    version: str
    onnx_max_abs_diff: float
    preprocessing_max_abs_diff: float
    parity_series: int
    torchscript: bool
    members: list[str] = field(default_factory=list)
    signer: str = ""  # the signing key's id

    def to_metrics(self) -> dict[str, Any]:
        return {
            "onnx_max_abs_diff": self.onnx_max_abs_diff,
            "preprocessing_max_abs_diff": self.preprocessing_max_abs_diff,
            "parity_series": self.parity_series,
            "bundle_bytes": self.bundle_bytes,
        }


class _ExportOutputs(nn.Module):
    """The network's logit, then its class-activation map (when it has ``activation_map``), then
    its penultimate features: the input of its last linear layer, captured by a hook while the
    logit is computed (the drift monitor projects them onto a fixed PCA basis)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.has_map = callable(getattr(net, "activation_map", None))
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        self.last_linear = linears[-1] if linears else None

    @property
    def output_names(self) -> list[str]:
        names = ["logit"]
        if self.has_map:
            names.append("saliency")
        if self.last_linear is not None:
            names.append("embedding")
        return names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        captured: list[torch.Tensor] = []
        handle = None
        if self.last_linear is not None:
            handle = self.last_linear.register_forward_pre_hook(
                lambda _module, args: captured.append(args[0])
            )
        try:
            outputs = [self.net(x)]
        finally:
            if handle is not None:
                handle.remove()
        if self.has_map:
            outputs.append(self.net.activation_map(x))  # type: ignore[operator]
        if captured:
            outputs.append(captured[0].flatten(1))
        return tuple(outputs)


def export_onnx(net: nn.Module, example: torch.Tensor, opset: int = 17) -> bytes:
    """ONNX bytes of ``net`` (eval mode) with input ``image`` ``(B, 1, X, Y, Z)`` and outputs
    ``logit`` ``(B, 1)``, ``saliency`` when ``net`` has ``activation_map``, and ``embedding``
    ``(B, D)`` (the penultimate features) when it has a linear layer."""
    # the exporter restores the *top* module's training flag on every submodule afterwards, so a
    # wrapper left in training mode would switch ``net`` back to training (batch-norm statistics)
    module = _ExportOutputs(net).eval()
    outputs = module.output_names
    axes = {"image": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(
            module,
            (example,),
            buffer,  # type: ignore[arg-type]  # typed as a path; the exporter writes file objects
            input_names=["image"],
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    return buffer.getvalue()


def export_torchscript(net: nn.Module, example: torch.Tensor) -> bytes | None:
    """TorchScript bytes of ``net`` traced on ``example``, without debug information
    (:func:`strip_debug_info`); ``None`` (logged) when tracing fails."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(net.eval(), example)
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer)
        return strip_debug_info(buffer.getvalue())
    except Exception as exc:  # tracing support varies by network and torch release
        log.warning("TorchScript export skipped: %s", exc)
        return None


#: records ``torch.jit.save`` writes itself; copied, they would appear twice
_WRITER_RECORDS = ("version", ".data/version", "byteorder", ".data/serialization_id")


def strip_debug_info(torchscript: bytes) -> bytes:
    """A TorchScript archive without its ``*.debug_pkl`` records.

    Those hold the source ranges error messages quote, with the absolute path of every traced
    module's source file: the checkout's folder would change the bundle's bytes. ``torch.jit.load``
    does without them (an error inside the model then names no source line); the code, constants
    and weights are copied unchanged, through torch's own archive reader and writer.
    """
    reader = torch._C.PyTorchFileReader(io.BytesIO(torchscript))
    buffer = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(buffer)
    records = reader.get_all_records()
    # the format version decides which operator upgraders torch.jit.load applies: keep it
    version = next(n for n in (".data/version", "version") if n in records)
    writer.set_min_version(int(bytes(reader.get_record(version)).decode().strip()))
    for name in records:
        if name.endswith(".debug_pkl") or name in _WRITER_RECORDS:
            continue
        data = reader.get_record(name)
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    return buffer.getvalue()


def onnx_logits(onnx_bytes: bytes, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logit"], {"image": batch.astype(np.float32)})[0])


def _training_batch(paths: Sequence[Path], train_cfg: TrainConfig) -> np.ndarray:
    """The training pipeline's (MONAI) preprocessing of ``paths``, stacked ``(N, 1, X, Y, Z)``."""
    from shiftguard.training.data import build_dataset

    cfg = train_cfg.model_copy(update={"cache_rate": 0.0, "num_workers": 0})
    items = [{"image": str(p), "label": 0.0, "key": str(i)} for i, p in enumerate(paths)]
    dataset = build_dataset(items, cfg)
    return np.stack([np.asarray(dataset[i]["image"], dtype=np.float32) for i in range(len(items))])


def check_parity(
    net: nn.Module,
    onnx_bytes: bytes,
    paths: Sequence[Path],
    train_cfg: TrainConfig,
    spec: Mapping[str, Any],
    tolerance: float,
) -> tuple[float, float]:
    """Max |ONNX - PyTorch| logit and max |edge - training| preprocessed voxel on ``paths``.

    Raises:
        ExportError: either difference is over its tolerance.
    """

    batch = _training_batch(paths, train_cfg)
    edge = np.concatenate([preprocess(read_nifti(Path(p))[0], spec) for p in paths])
    prep_diff = float(np.max(np.abs(edge - batch)))
    if prep_diff > PREPROCESSING_TOLERANCE:
        raise ExportError(
            f"the edge preprocessing differs from training by {prep_diff:.3g} on the validation "
            f"series (tolerance {PREPROCESSING_TOLERANCE:g}); shiftguard.edge.preprocess no longer "
            "matches shiftguard.training.data.preprocessing"
        )
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(batch)).numpy()
    got = onnx_logits(onnx_bytes, batch)
    diff = float(np.max(np.abs(got - expected)))
    if diff > tolerance:
        raise ExportError(
            f"ONNX Runtime's logits differ from PyTorch's by {diff:.3g} on {len(paths)} validation "
            f"series (export.parity_tolerance {tolerance:g}); the exported graph is not faithful"
        )
    return diff, prep_diff


def reference_table(records: Sequence[Mapping[str, Any]]) -> bytes:
    """The drift baseline: one row of monitor features per development series (exactly
    :data:`~shiftguard.records.features.FEATURE_NAMES`, nothing that identifies anyone), the
    split it belongs to (``train``, ``val`` or ``test``), its label (``finding``, 0/1, empty
    when unknown) and the network's own probability before calibration (``raw_probability``;
    ``probability`` is calibrated): the held-out rows' labels with their calibrated outputs are
    what label-free performance estimation (:mod:`shiftguard.monitor.performance`) stands on,
    and the raw ones let a site recalibration recompute them."""

    table = pd.DataFrame(
        [
            {
                **{n: clean_value(r.get(n), BY_NAME[n].kind) for n in FEATURE_NAMES},
                "split": r.get("split"),
                "finding": r.get("finding"),
                "raw_probability": r.get("raw_probability"),
            }
            for r in records
        ],
        columns=[*FEATURE_NAMES, "split", "finding", "raw_probability"],
    )
    table["finding"] = pd.to_numeric(table["finding"], errors="coerce").astype("Int64")
    return table.to_csv(index=False, lineterminator="\n").encode()


def monitor_reference(
    bundle_path: Path,
    dicom_dir: Path,
    splits: Mapping[str, str],
    trust: Trust | None = None,
    uid_of: Callable[[str], str] = str,
    findings: Mapping[str, Any] | None = None,
) -> tuple[bytes, bytes, int]:
    """Run the edge runner (:meth:`~shiftguard.edge.predict.Predictor.analyse`) on the development
    series' DICOM files (``splits``: series UID -> train / val / test; ``uid_of`` maps a file's
    UID to the table's, see :mod:`shiftguard.data.identifiers`), fit the embedding's PCA
    basis on the training series' penultimate features, and return ``reference.csv``,
    ``embedding_pca.json`` and how many series went in (``findings``: series UID -> label, the
    reference's ``finding`` column). Live records and the reference are thus
    computed by the same code on the same kind of input. The monitor compares the model's outputs
    and embedding with the held-out rows only: on its training series the model is overconfident."""

    if not dicom_dir.is_dir():
        raise ExportError(f"{dicom_dir}: no DICOM folder to compute the drift reference from")
    headers, _ = scan_files(list_files(dicom_dir))
    groups = sorted(
        (g for g in group_series(headers) if uid_of(g.series_uid) in splits),
        key=lambda g: g.series_uid,
    )
    predictor = Predictor(open_bundle(bundle_path, trust))
    analyses = []
    labels = []
    for group in groups:
        try:
            analyses.append((splits[uid_of(group.series_uid)], predictor.analyse(group)))
            labels.append((findings or {}).get(uid_of(group.series_uid)))
        except InvalidSeriesError as exc:
            log.warning("export: reference skips series %s: %s", group.series_uid, exc)
    train = [a for split, a in analyses if split == "train"]
    if not train or any(a.embedding is None for _, a in analyses):
        raise ExportError(
            f"{dicom_dir}: {len(train)} usable training series of {len(splits)} development ones, "
            "or the model has no embedding output; cannot build the drift reference"
        )
    projection = Projection.fit(np.stack([a.embedding for a in train]))  # type: ignore[misc]
    records = [
        {
            **a.features,
            **output_features(a.probability, projection.project(a.embedding)),  # type: ignore[arg-type]
            "split": split,
            "finding": label,
            "raw_probability": round(a.raw_probability, 6),
        }
        for (split, a), label in zip(analyses, labels, strict=True)
    ]
    basis = json.dumps(projection.to_json(), indent=1).encode()
    return reference_table(records), basis, len(records)


def _fmt_ci(entry: Any, n: Any = None, positives: Any = None) -> str:
    """A metrics.json figure with its interval (see
    :func:`~shiftguard.metrics.format_interval`: a collapsed interval says so, with the
    counts it came from)."""
    if not isinstance(entry, Mapping) or entry.get("value") is None:
        return "n/a"
    return format_interval(
        entry["value"], entry.get("low"), entry.get("high"), _count(n), _count(positives)
    )


def _count(value: Any) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def _calibration_lines(metrics: Mapping[str, Any]) -> list[str]:
    cal = metrics.get("calibration") or {}
    if not cal or cal.get("method") == "none":
        return []
    params = ", ".join(
        f"{k} {v}"
        for k, v in cal.items()
        if k not in {"method", "fitted_on", "n", "n_positive", "notes"}
    )
    return [
        f"The probability is calibrated: {cal['method']} scaling ({params}) fitted on the "
        f"{cal.get('n')} {cal.get('fitted_on')} series ({cal.get('n_positive')} with the finding); "
        "the ECE figures below are after it, the network's own in brackets.",
        *[f"Calibration note: {note}" for note in cal.get("notes", [])],
    ]


def robustness_markdown(robustness: pd.DataFrame) -> list[str]:
    """The card's robustness section as Markdown lines: AUROC (95% CI) by severity for each
    simulated profile, marked trained-with or held out, then the unseen real scanners (stored
    with severity -1 in ``robustness.csv``) as their own table, pooled first."""
    if robustness.empty:
        return ["No robustness table: the validate stage ran without robustness sets.", ""]
    frame = robustness.copy()
    for column in ("n", "n_positive", "auroc_low", "auroc_high"):
        if column not in frame:
            frame[column] = None
    real = frame["profile"].map(is_external_profile).astype(bool)
    lines: list[str] = []
    shifted = frame[~real]
    if len(shifted):
        severities = sorted(int(v) for v in shifted["severity"].unique())
        sizes = shifted[["n", "n_positive"]].drop_duplicates()
        each = (
            f" (n={_count(sizes['n'].iloc[0])}, {_count(sizes['n_positive'].iloc[0])} with the "
            "finding, in every cell)"
            if len(sizes) == 1 and sizes.notna().all(axis=None)
            else ""
        )
        lines += [
            f"AUROC (95% CI) of the test series re-rendered under each simulated scanner profile"
            f"{each}; severity 0 is the series unchanged.",
            "",
            "| profile | in training | " + " | ".join(f"severity {v}" for v in severities) + " |",
            "| --- | --- |" + " --- |" * len(severities),
        ]
        for profile, part in shifted.groupby("profile", sort=True):
            by_severity = {int(r["severity"]): r for _, r in part.iterrows()}
            seen = part["seen_in_training"].eq(True).any() if "seen_in_training" in part else None
            cells = [_robustness_cell(by_severity.get(v)) for v in severities]
            trained = "n/a" if seen is None else ("yes" if seen else "no (held out)")
            lines.append(f"| {profile} | {trained} | " + " | ".join(cells) + " |")
        lines.append("")
    scanners = frame[real]
    if len(scanners):
        lines += [
            "Unseen real scanners (not simulated; held out of training):",
            "",
            "| scanner | n | with the finding | AUROC (95% CI) |",
            "| --- | --- | --- | --- |",
        ]
        order = sorted(scanners.index, key=lambda i: (scanners.at[i, "profile"] != "external", i))
        for i in order:
            r = scanners.loc[i]
            profile = str(r["profile"])
            name = (
                "all unseen scanners (pooled)" if ":" not in profile else profile.split(":", 1)[1]
            )
            n = "n/a" if pd.isna(r["n"]) else str(int(r["n"]))
            pos = "n/a" if pd.isna(r["n_positive"]) else str(int(r["n_positive"]))
            lines.append(f"| {name} | {n} | {pos} | {_robustness_cell(r)} |")
        lines.append("")
    return lines


def _robustness_cell(row: Any) -> str:
    if row is None:
        return "–"
    figure = {"value": _num(row["auroc"]), "low": _num(row["auroc_low"]),
              "high": _num(row["auroc_high"])}  # fmt: skip
    return _fmt_ci(figure, row["n"], row["n_positive"])


def _num(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def model_card(
    cfg: ExportConfig,
    name: str,
    version: str,
    train_cfg: TrainConfig,
    model_cfg: Mapping[str, Any],
    rows: pd.DataFrame,
    metrics: Mapping[str, Any],
    segments: pd.DataFrame,
    robustness: pd.DataFrame,
    signer: str | None = None,
) -> str:
    """A model card (Markdown) from the split table and the validation reports; ``signer`` is the
    id of the key the bundle is signed with."""
    counts = rows.groupby("split")["finding"].agg(["count", "sum"]) if len(rows) else None
    lines = [
        f"# Model card: {name} v{version}",
        "",
        f"Signed by key {signer} (Ed25519; a site checks it against its trusted keys)."
        if signer
        else "Unsigned: a site opens it only with the development switch.",
        "",
        "## Intended use",
        cfg.intended_use,
        "",
        f"Output: probability of a {cfg.finding}; positive at or above the operating threshold "
        f"{float(metrics.get('threshold', 0.5)):.4f}, chosen on the validation split.",
        *_calibration_lines(metrics),
        "",
        "## Model",
        f"- network: `{model_cfg.get('network', {}).get('_target_', '?')}`",
        f"- input: canonical grid resampled to {list(train_cfg.input_shape or [])} voxels, "
        f"intensities scaled by the {list(train_cfg.intensity_percentiles)} percentiles",
        "",
        "## Data",
    ]
    if counts is not None:
        for split, row in counts.iterrows():
            lines.append(
                f"- {split}: {int(row['count'])} series, {int(row['sum'])} with the finding"
            )
    scanners = sorted(rows["scanner_model"].dropna().unique()) if "scanner_model" in rows else []
    lines += [f"- scanners: {', '.join(map(str, scanners))}", "", "## Performance (95% CI)"]
    for split in ("test", "external"):
        m = metrics.get(split, {})
        if m:
            counts = (m.get("n"), m.get("n_positive"))
            lines.append(
                f"- {split} (n={m.get('n')}): AUROC {_fmt_ci(m.get('auroc'), *counts)}, "
                f"sensitivity {_fmt_ci(m.get('sensitivity'), *counts)}, specificity "
                f"{_fmt_ci(m.get('specificity'), *counts)}, ECE {_fmt_ci(m.get('ece'), *counts)}"
                + (
                    f" (uncalibrated {_fmt_ci(m['ece_uncalibrated'], *counts)})"
                    if m.get("ece_uncalibrated")
                    else ""
                )
            )
    for model, m in (metrics.get("external_scanners") or {}).items():
        counts = (m.get("n"), m.get("n_positive"))
        auroc = f"n/a ({m['reason']})" if m.get("reason") else _fmt_ci(m.get("auroc"), *counts)
        lines.append(
            f"  - {model} (n={m.get('n')}, {m.get('n_positive')} with the finding): AUROC "
            f"{auroc}, sensitivity {_fmt_ci(m.get('sensitivity'), *counts)}, specificity "
            f"{_fmt_ci(m.get('specificity'), *counts)}, ECE {_fmt_ci(m.get('ece'), *counts)}"
        )
    lines += ["", "## Per segment (test + unseen scanner)", ""]
    if len(segments):
        lines.append("| column | segment | n | positives | AUROC | gap | judgeable |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for _, s in segments.iterrows():
            auroc = "n/a" if pd.isna(s.get("auroc")) else f"{s['auroc']:.3f}"
            gap = "n/a" if pd.isna(s.get("auroc_gap")) else f"{s['auroc_gap']:+.3f}"
            lines.append(
                f"| {s['column']} | {s['segment']} | {s['n']} | {s['n_positive']} | {auroc} | "
                f"{gap} | {'yes' if str(s['judgeable']) == 'True' else 'no'} |"
            )
    lines += ["", "## Robustness to scanner shift", ""]
    lines += robustness_markdown(robustness)
    lines += [
        "",
        "## Known limitations",
        "- Trained on a small synthetic cohort; the confidence intervals above are wide.",
        "- Segments marked not judgeable are too small for any claim about them.",
        "- Series outside the selection rules in the manifest are skipped, not scored.",
        "- Not validated for clinical use: run it in shadow mode and compare against the verified "
        "diagnosis per segment and scanner before any other use.",
        "",
    ]
    return "\n".join(lines)


def preprocessing_spec(
    ingest_cfg: IngestConfig, train_cfg: TrainConfig, input_shape: Sequence[int]
) -> dict[str, Any]:
    """The manifest's ``preprocessing`` section: the canonical grid ingest builds (the edge runner
    rebuilds it with the same code) and the intensity scaling and resampling training applied."""
    return {
        "canonical_grid": {
            "spacing": [float(v) for v in ingest_cfg.spacing],
            "shape": [int(v) for v in ingest_cfg.shape],
            "interpolation_order": int(ingest_cfg.interpolation_order),
            "antialias": bool(ingest_cfg.antialias),
            "spacing_tolerance": float(ingest_cfg.spacing_tolerance),
            "orientation_tolerance": float(ingest_cfg.orientation_tolerance),
            "orientation": "RAS",
        },
        "intensity_percentiles": [float(v) for v in train_cfg.intensity_percentiles],
        "input_shape": [int(v) for v in input_shape],
    }


def run(
    cfg: ExportConfig,
    ingest_cfg: IngestConfig,
    model_file: Path,
    dataset_csv: Path,
    ingest_dir: Path,
    reports_dir: Path,
    out_dir: Path,
    track: bool = True,
    root: Path | None = None,
    parity_series: int = 8,
    dicom_dir: Path | None = None,
    uid_of: Callable[[str], str] = str,
) -> ExportSummary:
    """The stage (see the package docstring). Returns what it wrote and measured.

    The bundle (``out_dir/NAME.sgbundle``, ``NAME`` from ``train.registered_model``) is the same
    bytes for the same inputs: its version is :func:`~shiftguard.edge.bundle.content_version`, and
    its manifest names the trained model by ``model_file``'s SHA-256, never by MLflow run or
    registry number. With ``track``, the training run that wrote ``model_file`` is found in MLflow
    by that hash (:func:`~shiftguard.tracking.trained_model`); the bundle is logged to it and its
    registered model version is tagged with the bundle's file name, version, SHA-256 and URI.

    Raises:
        ExportError: parity fails, or the validation reports are missing.
        ModelFileError: the model file is missing or unreadable.
    """
    from shiftguard.training.stage import load_model, read_rows

    root = root or Path.cwd()
    signer = _signer(cfg, root)
    net, payload = load_model(model_file, "cpu")
    train_cfg = TrainConfig.model_validate(payload["train"])
    name = train_cfg.registered_model

    missing = [
        f for f in (*VALIDATION_FILES, CALIBRATION_MEMBER) if not (reports_dir / f).is_file()
    ]
    if missing:
        raise ExportError(
            f"{reports_dir}: lacks {', '.join(missing)}; run the validate stage first "
            "(dvc repro validate)"
        )
    metrics = json.loads((reports_dir / "metrics.json").read_text())
    rows = pd.DataFrame(read_rows(dataset_csv))
    for column in (*FEATURES, "finding"):
        if column in rows:
            rows[column] = pd.to_numeric(rows[column], errors="coerce")

    spec = preprocessing_spec(ingest_cfg, train_cfg, payload["input"]["input_shape"])
    if [int(v) for v in payload["input"]["ingest_shape"]] != spec["canonical_grid"]["shape"]:
        raise ExportError(
            f"{model_file}: trained on a {payload['input']['ingest_shape']} grid but the ingest "
            f"section says {spec['canonical_grid']['shape']}; export with the params it was trained with"
        )

    val = rows[rows["split"] == "val"]
    parity_paths = [ingest_dir / p for p in val["volume_path"].head(parity_series)]
    if not parity_paths:
        raise ExportError(f"{dataset_csv}: no validation series to check the export's parity on")
    example = torch.from_numpy(_training_batch(parity_paths[:1], train_cfg))
    onnx_bytes = export_onnx(net, example, cfg.opset)
    onnx_diff, prep_diff = check_parity(
        net, onnx_bytes, parity_paths, train_cfg, spec, cfg.parity_tolerance
    )
    log.info(
        "export: ONNX parity %.2g (max |logit| diff), preprocessing parity %.2g on %d series",
        onnx_diff,
        prep_diff,
        len(parity_paths),
    )
    torchscript = export_torchscript(net, example) if cfg.torchscript else None
    smoke = read_nifti(parity_paths[0])[0]
    smoke_logit = float(onnx_logits(onnx_bytes, preprocess(smoke, spec)).reshape(-1)[0])

    train_rows = rows[rows["split"] == "train"]
    members: dict[str, bytes] = {ONNX_MEMBER: onnx_bytes, SMOKE_MEMBER: smoke_volume(smoke)}
    models = [
        {
            "member": ONNX_MEMBER,
            "format": "onnx",
            "opset": cfg.opset,
            "outputs": _ExportOutputs(net).output_names,
        }
    ]
    if torchscript is not None:
        members[TORCHSCRIPT_MEMBER] = torchscript
        models.append({"member": TORCHSCRIPT_MEMBER, "format": "torchscript"})
    for fname in VALIDATION_FILES:
        members[f"validation/{fname}"] = (reports_dir / fname).read_bytes()
    members[CALIBRATION_MEMBER] = (reports_dir / CALIBRATION_MEMBER).read_bytes()
    try:
        calibration = Calibration.from_json(
            json.loads(members[CALIBRATION_MEMBER]), str(reports_dir / CALIBRATION_MEMBER)
        )
    except (MetricInputError, json.JSONDecodeError) as err:
        raise ExportError(f"{err}; run the validate stage again") from None
    segments = pd.read_csv(reports_dir / "segments.csv")
    robustness = pd.read_csv(reports_dir / "robustness.csv")

    manifest: dict[str, Any] = {
        "name": name,
        "models": models,
        "input": {
            "name": "image",
            "shape": [None, 1, *spec["input_shape"]],
            "dtype": "float32",
            "layout": "NCXYZ",
        },
        "preprocessing": spec,
        "output": {
            "logit": "finding log-odds; probability = sigmoid(logit)",
            "class_names": list(cfg.class_names),
            "finding": cfg.finding,
        },
        "threshold": float(metrics["threshold"]),
        "calibration": {
            "member": CALIBRATION_MEMBER,
            "method": calibration.method,
            "fitted_on": calibration.fitted_on,
            "n": calibration.n,
        },
        "series_selection": cfg.series_selection.model_dump(mode="json"),
        "training_data": {
            "data_dvc_md5": data_version(root),
            "split_table_sha256": sha256_bytes(dataset_csv.read_bytes()),
            "n_train": len(train_rows),
            "n_val": len(val),
        },
        "trained_model": {"file": model_file.name, "sha256": file_sha256(model_file)},
        "validation": {
            "test_auroc": (metrics.get("test", {}).get("auroc") or {}).get("value"),
            "external_auroc": (metrics.get("external", {}).get("auroc") or {}).get("value"),
        },
        "parity": {"onnx_max_abs_logit_diff": onnx_diff, "preprocessing_max_abs_diff": prep_diff},
        SMOKE_SECTION: {
            "member": SMOKE_MEMBER,
            "logit": smoke_logit,
            "tolerance": SMOKE_TOLERANCE,
            "series": "the first validation series, on the canonical grid (pixel values only)",
        },
    }
    version = content_version(manifest, members)
    manifest = {"name": name, "version": version, **manifest}
    members[CARD_MEMBER] = model_card(
        cfg,
        name,
        version,
        train_cfg,
        payload["model"],
        rows,
        metrics,
        segments,
        robustness,
        signer.key_id,
    ).encode()
    own = Trust(extra=(signer.public,), environment=False)  # what export itself opens
    stored = (CARD_MEMBER,)  # it names the key: uncompressed, the size is the same for any key
    # the drift reference runs the edge runner itself, so it needs the bundle: a provisional one
    # without it first, then the final one
    with tempfile.TemporaryDirectory() as tmp:
        provisional = write_bundle(
            Path(tmp) / "provisional.sgbundle", manifest, members, signer=signer, stored=stored
        )
        internal = rows[rows["split"].isin(["train", "val", "test"])]
        reference, basis, n_reference = monitor_reference(
            provisional,
            dicom_dir or root / "data" / "dicom",
            dict(zip(internal["series_uid"], internal["split"], strict=True)),
            own,
            uid_of,
            dict(zip(internal["series_uid"], internal["finding"], strict=True)),
        )
    members[REFERENCE_MEMBER] = reference
    members[PROJECTION_MEMBER] = basis
    manifest["monitor"] = {
        "reference": REFERENCE_MEMBER,
        "projection": PROJECTION_MEMBER,
        "schema": MONITOR_SCHEMA,
        "n_reference": n_reference,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.sgbundle"):
        old.unlink()
    path = write_bundle(
        out_dir / bundle_file_name(name), manifest, members, signer=signer, stored=stored
    )
    bundle = open_bundle(path, own)
    summary = ExportSummary(
        bundle=str(path),
        bundle_sha256=sha256_bytes(path.read_bytes()),
        bundle_bytes=path.stat().st_size,
        name=name,
        version=version,
        onnx_max_abs_diff=round(onnx_diff, 9),
        preprocessing_max_abs_diff=round(prep_diff, 9),
        parity_series=len(parity_paths),
        torchscript=torchscript is not None,
        members=sorted(bundle.members),
        signer=signer.key_id,
    )
    (out_dir / "export.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    if track:
        _track(path, summary, model_file, root, members[CARD_MEMBER].decode(), cfg.intended_use)
    return summary


def _signer(cfg: ExportConfig, root: Path) -> SigningKey:
    """The key export signs with: ``export.signing_key`` (relative to ``root``), else
    ``$SHIFTGUARD_SIGNING_KEY``, else the development key.

    Raises:
        ExportError: there is none, naming how to make one.
    """
    if cfg.signing_key:
        path = Path(cfg.signing_key).expanduser()
        return read_signing_key(path if path.is_absolute() else root / path)
    found = default_signer()
    if found is None:
        raise ExportError(
            f"no signing key: set {SIGNING_KEY_ENV} (or export.signing_key) to a private key, or "
            f"make the development key with `shiftguard keys generate --development` (make demo "
            f"does; it goes to {development_key_path()})"
        )
    return found


def registered_model_description(intended_use: str) -> str:
    """The registered model's description in MLflow: its use and what its two aliases mean."""
    return (
        f"{intended_use.strip()}\n\n"
        f"Aliases: `@{CHALLENGER}` is the newest trained version, run at the edge in shadow mode "
        f"(beside the champion, or alone before there is one); `@{CHAMPION}` is the version the "
        "promotion gate last passed, the one the edge serves. Each version's description is its "
        "model card; its tags name the validate and shadow runs that judged it and its bundle."
    )


def _track(
    path: Path,
    summary: ExportSummary,
    model_file: Path,
    root: Path,
    card: str,
    intended_use: str,
) -> None:
    """Log the bundle and its model card to the run that trained ``model_file``; tag the model
    version registered from it with the bundle's file name, version, SHA-256 and ``runs:/`` URI
    (the same on every machine), and make the card the version's description."""
    from mlflow.tracking import MlflowClient

    found = trained_model(model_file, root)
    if found is None:
        log.warning(
            "export: no MLflow run in %s trained %s (tracked training tags its run with the "
            "model's SHA-256); the bundle is not logged to MLflow",
            tracking_uri(root),
            model_file,
        )
        return
    client = MlflowClient(tracking_uri(root))
    client.log_artifact(found.run_id, str(path), artifact_path="bundle")
    client.log_text(found.run_id, card, CARD_MEMBER)
    client.log_metric(found.run_id, "export.onnx_max_abs_diff", summary.onnx_max_abs_diff)
    client.set_tag(found.run_id, "shiftguard.bundle_sha256", summary.bundle_sha256)
    client.set_tag(found.run_id, "shiftguard.bundle_version", summary.version)
    client.set_tag(found.run_id, "shiftguard.bundle_signer", summary.signer)
    if found.registered_model and found.version:
        for key, value in (
            ("bundle", path.name),
            (BUNDLE_VERSION_TAG, summary.version),
            ("bundle_sha256", summary.bundle_sha256),
            ("bundle_signer", summary.signer),
            ("bundle_uri", f"runs:/{found.run_id}/bundle/{path.name}"),
        ):
            client.set_model_version_tag(found.registered_model, found.version, key, value)
        client.update_model_version(found.registered_model, found.version, description=card)
        client.update_registered_model(
            found.registered_model, description=registered_model_description(intended_use)
        )
        log.info(
            "export: bundle %s (version %s) is %s version %s, MLflow run %s",
            path.name,
            summary.version,
            found.registered_model,
            found.version,
            found.run_id,
        )
    else:
        log.info("export: bundle logged to MLflow run %s", found.run_id)


__all__ = [
    "ExportError",
    "ExportSummary",
    "check_parity",
    "export_onnx",
    "export_torchscript",
    "model_card",
    "reference_table",
    "run",
    "strip_debug_info",
]
