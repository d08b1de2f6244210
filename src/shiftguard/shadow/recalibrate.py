"""Local recalibration from shadow evidence: a site-specific operating point (and calibration map)
that restores the validated sensitivity, proposed as a new bundle that the promotion gate judges.

A scanner shift can leave a network's ranking intact and move its probabilities: at the site the
validated threshold then flags fewer findings than it did in validation. Once the site's shadow log
holds enough studies with a verified diagnosis, :func:`recalibrate` fits a new calibration map on
them (the network's own probabilities, the log's ``raw_probability``; for a log written before it
was kept, the bundle's parametric map is inverted) and chooses the highest threshold on the new
calibrated scale whose sensitivity on those studies reaches the target: by default the
sensitivity the bundle's labelled held-out reference reached at its validated threshold. Its
interval comes from a stratified bootstrap of the site's studies (the threshold chosen again in
every resample, and the sensitivity and specificity of the proposed threshold on each resample),
beside the figures the bundle's own threshold gets on the same studies.

:func:`write_recalibrated` makes the proposal a bundle: the same network and preprocessing, the new
map and threshold (so a new content version), the reference's probabilities recomputed through
the new map, the change in the model card and the manifest's ``recalibration`` section, signed.
It runs in shadow mode and goes through ``shiftguard shadow evaluate`` and ``shiftguard promote``
like any new model; :func:`track` registers it as a new version of the same registered model in
MLflow, aliased ``challenger``.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shiftguard.calibration import Calibration, fit_calibration, logit
from shiftguard.edge.bundle import (
    CALIBRATION_MEMBER,
    CARD_MEMBER,
    Bundle,
    bundle_file_name,
    content_version,
    open_bundle,
    write_bundle,
)
from shiftguard.edge.signing import SigningKey
from shiftguard.errors import ShadowInputError
from shiftguard.metrics import (
    choose_threshold,
    percentile_interval,
    resample_indices,
    sensitivity_specificity,
)
from shiftguard.monitor.performance import realised
from shiftguard.records.features import output_features
from shiftguard.shadow.diagnoses import DiagnosisBook
from shiftguard.shadow.evaluate import join
from shiftguard.shadow.log import read_shadow_log

log = logging.getLogger(__name__)


@dataclass
class Recalibration:
    """A proposed site recalibration and the evidence it rests on."""

    site: str
    bundle: str  # the bundle recalibrated, name-vversion
    n: int  # studies with a verified diagnosis it rests on
    n_positive: int
    calibration: Calibration
    threshold: float  # the proposed operating point, on the new map's scale
    threshold_interval: tuple[float, float]
    previous_threshold: float
    target_sensitivity: float
    target_source: str
    sensitivity: dict[str, float]  # at the proposed threshold, on the site's studies, with CI
    specificity: dict[str, float]
    previous_sensitivity: dict[str, float]  # at the bundle's threshold, same studies
    previous_specificity: dict[str, float]
    alpha: float = 0.05
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["calibration"] = {"method": self.calibration.method, **self.calibration.parameters}
        out["threshold_interval"] = list(self.threshold_interval)
        return _rounded(out)

    def lines(self) -> list[str]:
        """The proposal in words, for the log and the model card."""

        def ci(entry: dict[str, float]) -> str:
            return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"

        cal = self.calibration
        params = ", ".join(f"{k} {v}" for k, v in cal.parameters.items())
        level = round(100 * (1 - self.alpha))
        return [
            f"Site {self.site}: {self.n} studies with a verified diagnosis ({self.n_positive} with "
            f"the finding) from the shadow log of {self.bundle}.",
            f"Calibration refitted on them: {cal.method} ({params}).",
            f"Target sensitivity {self.target_sensitivity:.3f} ({self.target_source}).",
            f"Bundle threshold {self.previous_threshold:.4f}: sensitivity "
            f"{ci(self.previous_sensitivity)}, specificity {ci(self.previous_specificity)} on these "
            f"studies ({level}% bootstrap CI).",
            f"Proposed threshold {self.threshold:.4f} (bootstrap {level}% range of the threshold "
            f"chosen again: {self.threshold_interval[0]:.4f} to {self.threshold_interval[1]:.4f}): "
            f"sensitivity {ci(self.sensitivity)}, specificity {ci(self.specificity)}.",
            *self.notes,
        ]


def site_evidence(
    log_path: Path | str,
    book: DiagnosisBook,
    bundle: Bundle,
    site: str | None = None,
) -> pd.DataFrame:
    """The studies of ``bundle`` in the shadow log (of ``site``, when given) with a verified
    diagnosis: ``study_uid``, ``finding``, ``probability`` (as reported) and ``raw_probability``
    (the network's own: from the log, else the bundle's parametric map inverted).

    Raises:
        ShadowInputError: the log has no study of this bundle (at this site), or its network
            probabilities are missing and the bundle's map cannot be inverted (isotonic).
    """
    frame = read_shadow_log(log_path, site)
    name = f"{bundle.name}-v{bundle.version}"
    mine = frame[frame["bundle"] == name]
    if site is not None:
        mine = mine[mine["site"] == site]
    if mine.empty:
        where = f" at site {site}" if site else ""
        raise ShadowInputError(
            f"{log_path}: no study predicted by {name}{where} (the log holds "
            f"{', '.join(sorted(frame['bundle'].unique())) or 'none'}); recalibrate the bundle "
            "the site ran"
        )
    joined, pending = join(mine.reset_index(drop=True), book)
    log.info(
        "recalibrate: %d studies of %s in the log, %d with a verified diagnosis, %d pending",
        len(mine), name, len(joined), pending,
    )  # fmt: skip
    raw = joined["raw_probability"].to_numpy(dtype=np.float64)
    missing = ~np.isfinite(raw)
    if missing.any():
        inverted = invert(bundle.calibration, joined["probability"].to_numpy(dtype=np.float64))
        if inverted is None:
            raise ShadowInputError(
                f"{log_path}: {int(missing.sum())} studies lack the network's own probability "
                f"(raw_probability) and the bundle's {bundle.calibration.method} map cannot be "
                "inverted; recalibrate from a log written by this release's edge"
            )
        raw = np.where(missing, inverted, raw)
    return joined.assign(raw_probability=raw)[
        ["study_uid", "finding", "probability", "raw_probability"]
    ]


def invert(calibration: Calibration, prob: np.ndarray) -> np.ndarray | None:
    """The network's probabilities behind ``calibration.apply``'s output, for the parametric maps
    (``None`` for an isotonic map, which merges scores)."""
    if calibration.method == "none":
        return prob.copy()
    if calibration.method == "isotonic":
        return None
    z = (logit(prob) - calibration.b) / calibration.a
    out: np.ndarray = 1.0 / (1.0 + np.exp(-z))
    return out


def reference_sensitivity(bundle: Bundle) -> float | None:
    """The sensitivity the bundle's labelled held-out reference reached at its threshold."""
    member = bundle.manifest.get("monitor", {}).get("reference", "reference.csv")
    if member not in bundle.members:
        return None
    ref = pd.read_csv(io.BytesIO(bundle.members[member]))
    if "finding" not in ref or "split" not in ref:
        return None
    held = ref[(ref["split"].astype(str) != "train") & ref["finding"].isin([0, 1])]
    if held.empty or held["finding"].nunique() < 2:
        return None
    return realised(held["finding"], held["probability"], bundle.threshold)["sensitivity"]


def recalibrate(
    evidence: pd.DataFrame,
    bundle: Bundle,
    site: str,
    method: str = "platt",
    target: float | None = None,
    min_studies: int = 100,
    min_positive: int = 20,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Recalibration:
    """Fit a site map on ``evidence`` (:func:`site_evidence`) and choose the threshold restoring
    ``target`` sensitivity (default: the bundle's held-out reference's, see
    :func:`reference_sensitivity`).

    Raises:
        ShadowInputError: fewer than ``min_studies`` verified studies or ``min_positive`` with the
            finding (or negatives), or no target to restore.
    """
    y = evidence["finding"].to_numpy().astype(int)
    raw = evidence["raw_probability"].to_numpy(dtype=np.float64)
    n, n_pos = int(y.size), int(y.sum())
    if n < min_studies or min(n_pos, n - n_pos) < min_positive:
        raise ShadowInputError(
            f"site {site}: {n} studies with a verified diagnosis ({n_pos} with the finding, "
            f"{n - n_pos} without); a recalibration needs at least {min_studies}, with "
            f"{min_positive} of each class: keep the model in shadow mode longer"
        )
    source = "given"
    if target is None:
        target = reference_sensitivity(bundle)
        source = "the bundle's labelled held-out reference at its threshold"
    if target is None or not 0.0 < target <= 1.0:
        raise ShadowInputError(
            f"{bundle.path}: no sensitivity to restore (its reference has no labelled held-out "
            "series); give --target-sensitivity"
        )
    cal = fit_calibration(method, y, raw, fitted_on=f"site {site} shadow log")
    p = cal.apply(raw)
    rule = f"sensitivity@{target:.6f}".rstrip("0")
    threshold = choose_threshold(y, p, rule)
    old = bundle.calibration.apply(raw)
    rng = np.random.default_rng(seed)
    idx = resample_indices(y.astype(bool), n_boot, rng, stratified=True)
    chosen, sens_new, spec_new, sens_old, spec_old = [], [], [], [], []
    for row in idx:
        yb, pb = y[row], p[row]
        chosen.append(choose_threshold(yb, pb, rule))
        s, c = sensitivity_specificity(yb, pb, threshold)
        sens_new.append(s)
        spec_new.append(c)
        s, c = sensitivity_specificity(yb, old[row], bundle.threshold)
        sens_old.append(s)
        spec_old.append(c)

    def entry(point: float, values: list[float]) -> dict[str, float]:
        low, high = percentile_interval(np.asarray(values, dtype=np.float64), alpha)
        return {"value": float(point), "low": low, "high": high}

    s_new, c_new = sensitivity_specificity(y, p, threshold)
    s_old, c_old = sensitivity_specificity(y, old, bundle.threshold)
    notes = list(cal.notes)
    if s_old >= target:
        notes.append(
            f"The bundle's threshold already reaches the target here ({s_old:.3f} >= "
            f"{target:.3f}); the proposal changes the operating point all the same."
        )
    return Recalibration(
        site=site,
        bundle=f"{bundle.name}-v{bundle.version}",
        n=n,
        n_positive=n_pos,
        calibration=cal,
        threshold=float(threshold),
        threshold_interval=percentile_interval(np.asarray(chosen, dtype=np.float64), alpha),
        previous_threshold=bundle.threshold,
        target_sensitivity=float(target),
        target_source=source,
        sensitivity=entry(s_new, sens_new),
        specificity=entry(c_new, spec_new),
        previous_sensitivity=entry(s_old, sens_old),
        previous_specificity=entry(c_old, spec_old),
        alpha=alpha,
        notes=notes,
    )


def write_recalibrated(
    bundle: Bundle, rec: Recalibration, out: Path, signer: SigningKey | None
) -> Path:
    """The recalibrated bundle at ``out`` (a folder: the file is named as export names it, with
    its version): same network, new map and threshold, reference probabilities through the new
    map, the card's new section, the manifest's ``recalibration``; signed with ``signer``."""
    members = dict(bundle.members)
    members[CALIBRATION_MEMBER] = (json.dumps(rec.calibration.to_json(), indent=1) + "\n").encode()
    reference = bundle.manifest.get("monitor", {}).get("reference")
    if reference in members:
        members[reference] = _recalibrated_reference(members[reference], rec.calibration)
    card = members.get(CARD_MEMBER, b"").decode("utf-8")
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("version", "members")}
    manifest["threshold"] = rec.threshold
    manifest["calibration"] = {
        "member": CALIBRATION_MEMBER,
        "method": rec.calibration.method,
        "fitted_on": rec.calibration.fitted_on,
        "n": rec.calibration.n,
    }
    manifest["recalibration"] = {"from_version": bundle.version, **rec.to_dict()}
    version = content_version(manifest, members)
    section = "\n".join(
        ["", f"## Site recalibration (version {version}, from {bundle.version})", ""]
        + [f"- {line}" for line in rec.lines()]
    )
    title = f"# Model card: {bundle.name} v{bundle.version}"
    card = card.replace(title, f"# Model card: {bundle.name} v{version}", 1)
    members[CARD_MEMBER] = (card.rstrip("\n") + "\n" + section + "\n").encode()
    manifest = {"name": bundle.name, "version": version, **manifest}
    out.mkdir(parents=True, exist_ok=True)
    path = out / bundle_file_name(bundle.name, version)
    return write_bundle(path, manifest, members, signer=signer, stored=(CARD_MEMBER,))


def _recalibrated_reference(data: bytes, calibration: Calibration) -> bytes:
    """The reference table with ``probability`` (and its ``entropy``) recomputed through
    ``calibration`` from ``raw_probability``; unchanged where that column is missing."""
    table = pd.read_csv(io.BytesIO(data))
    if "raw_probability" not in table:
        return data
    raw = pd.to_numeric(table["raw_probability"], errors="coerce").to_numpy(dtype=np.float64)
    known = np.isfinite(raw)
    p = np.where(known, calibration.apply(np.where(known, raw, 0.5)), np.nan)
    table["probability"] = np.where(known, p, table["probability"])
    if "entropy" in table:
        table["entropy"] = [
            output_features(v, None)["entropy"] if math.isfinite(v) else e
            for v, e in zip(table["probability"], table["entropy"], strict=True)
        ]
    return table.to_csv(index=False, lineterminator="\n").encode()


RECALIBRATE_RUN_TAG = "shiftguard.recalibrate_run"


def track(rec: Recalibration, path: Path, bundle: Bundle, root: Path | None = None) -> str | None:
    """Record the proposal in MLflow: a ``recalibrate`` run (the evidence as metrics, the proposal
    and the bundle as artifacts) and a new version of the bundle's registered model, from the
    same logged network as the version the bundle was exported from, tagged with the new bundle
    (``bundle_version`` and the others export sets, ``recalibrated_from``), described by the new
    model card and aliased ``challenger``. Returns the new version's number (``None``, said in the
    log, when the registry has no version the bundle came from)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from shiftguard.tracking import (
        BUNDLE_VERSION_TAG,
        CHALLENGER,
        bundle_model_version,
        file_sha256,
        link_run,
        stage_run,
        tracking_uri,
    )

    client = MlflowClient(tracking_uri(root))
    source = bundle_model_version(client, bundle.name, bundle.version)
    new = open_bundle(path)
    params = {
        "recalibrate": {
            "site": rec.site,
            "bundle": rec.bundle,
            "method": rec.calibration.method,
            "target_sensitivity": rec.target_sensitivity,
        }
    }
    with stage_run("recalibrate", params, root=root, name=f"recalibrate {rec.site}") as run:
        flat = {
            "n": rec.n,
            "n_positive": rec.n_positive,
            "threshold": rec.threshold,
            "previous_threshold": rec.previous_threshold,
            **{f"sensitivity.{k}": v for k, v in rec.sensitivity.items()},
            **{f"specificity.{k}": v for k, v in rec.specificity.items()},
            **{f"previous_sensitivity.{k}": v for k, v in rec.previous_sensitivity.items()},
            **{f"previous_specificity.{k}": v for k, v in rec.previous_specificity.items()},
        }
        mlflow.log_metrics({k: float(v) for k, v in flat.items() if math.isfinite(float(v))})
        mlflow.log_dict(rec.to_dict(), "recalibration.json")
        mlflow.log_artifact(str(path), artifact_path="bundle")
    if source is None:
        log.warning(
            "recalibrate: no version of %s in the registry at %s is tagged %s=%s; the proposal "
            "is logged (run %s) but not registered",
            bundle.name, tracking_uri(root), BUNDLE_VERSION_TAG, bundle.version, run.info.run_id,
        )  # fmt: skip
        return None
    origin = client.get_model_version(bundle.name, source)
    version = client.create_model_version(
        bundle.name,
        source=str(origin.source),
        run_id=origin.run_id,
        tags={
            "bundle": path.name,
            BUNDLE_VERSION_TAG: new.version,
            "bundle_sha256": file_sha256(path),
            "bundle_signer": new.signer or "",
            "bundle_uri": f"runs:/{run.info.run_id}/bundle/{path.name}",
            "recalibrated_from": f"{bundle.version} (registry version {source})",
            "recalibration_site": rec.site,
        },
        description=new.text(CARD_MEMBER) if CARD_MEMBER in new.members else "",
    ).version
    client.set_registered_model_alias(bundle.name, CHALLENGER, str(version))
    link_run(client, bundle.name, str(version), run.info.run_id, RECALIBRATE_RUN_TAG)
    log.info(
        "recalibrate: %s version %s (bundle %s) registered as @%s", bundle.name, version,
        new.version, CHALLENGER,
    )  # fmt: skip
    return str(version)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value
