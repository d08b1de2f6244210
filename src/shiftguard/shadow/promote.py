"""The promotion gate: the MLflow alias ``champion`` moves to the challenger only when its shadow
evaluation passes every condition of ``shadow.gate`` (``conf/shadow/``).

One vocabulary for the registry, the edge and the shadow report
(:data:`~shiftguard.tracking.CHALLENGER`, :data:`~shiftguard.tracking.CHAMPION`): training
registers each new version aliased ``challenger``; the edge runs it in shadow mode (beside the
champion, or alone before there is one), and the shadow report calls it the challenger; when the
gate passes, the alias ``champion`` moves to it and its ``challenger`` alias is removed. The version
judged is the shadow log's challenger (or, when the log holds one role only, that role's bundle).

Bundles carry a content version, not the registry's number: the model version a bundle came from is
the one the export stage tagged ``bundle_version`` with it (the newest, if several were); a bundle
exported before bundles had content versions carries the registry's number itself. Conditions, each
reported with the evidence:

* ``min_studies``: at least ``min_studies`` of its studies have a verified diagnosis;
* ``flagged_segments``: at most ``max_flagged_segments`` segments flagged (significantly below the
  overall figure or below the validation figure for that segment);
* ``champion``: the log's champion is the bundle of the registry's current champion (the comparison
  is against what is serving), or there is no champion yet and ``first_champion`` allows one;
* ``noninferior``: for each of ``noninferiority_metrics``, the lower CI bound of the paired
  difference (challenger - champion) is above ``-noninferiority_margin``;
* ``no_segment_worse``: no segment where the challenger is significantly worse than the champion.

Every decision, promoted or refused (dry runs too), is an MLflow run (``shiftguard.stage =
promote``) with the checks as tags and the decision as an artifact, and is tagged on the
challenger's model version; the decision's run is tagged with the evaluation's MLflow run
(:func:`~shiftguard.shadow.report.evaluation_run`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shiftguard.config.shadow import GateConfig, RolloutConfig
from shiftguard.errors import PromotionError
from shiftguard.shadow.rollout import start as start_rollout
from shiftguard.tracking import (
    BUNDLE_VERSION_TAG,
    CHALLENGER,
    CHAMPION,
    bundle_model_version,
    set_store,
    stage_run,
    tracking_uri,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Decision:
    registered_model: str
    challenger: str  # model version
    champion: str | None  # the registry's champion before the decision
    checks: list[Check]
    dry_run: bool = False
    run_id: str | None = None
    promoted: bool = field(init=False)

    def __post_init__(self) -> None:
        self.promoted = all(c.passed for c in self.checks) and not self.dry_run

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        return out

    def lines(self) -> list[str]:
        verdict = (
            "PROMOTED" if self.promoted else ("passes (dry run)" if self.passed else "REFUSED")
        )
        head = f"{self.registered_model} v{self.challenger}: {verdict}"
        if self.champion:
            head += f" (champion was v{self.champion})"
        return [head] + [
            f"  [{'pass' if c.passed else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks
        ]


def load_summary(report: Path | str) -> dict[str, Any]:
    """``summary.json`` of a ``shadow evaluate`` report folder (or the file itself)."""
    path = Path(report)
    path = path / "summary.json" if path.is_dir() else path
    if not path.is_file():
        raise PromotionError(
            f"{path}: no shadow evaluation summary; run `shiftguard shadow evaluate`"
        )
    try:
        figures = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PromotionError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(figures, dict) or not figures.get("roles"):
        raise PromotionError(f"{path}: holds no evaluated role; is it a shadow evaluation summary?")
    return figures


def challenger_role(figures: Mapping[str, Any]) -> str:
    """The role of the shadow log judged for promotion: the challenger, or the only role."""
    roles = figures["roles"]
    if CHALLENGER in roles:
        return CHALLENGER
    if len(roles) == 1:
        return next(iter(roles))
    raise PromotionError(f"the summary has roles {sorted(roles)} and no challenger; name --role")


def registry_version(client: Any, name: str, bundle_version: str) -> str:
    """The registry's version number of ``name`` that the bundle of version ``bundle_version`` was
    exported from: the newest one tagged ``bundle_version`` with it, else (a bundle exported before
    bundles had content versions) the version numbered ``bundle_version``.

    Raises:
        PromotionError: no such version in the registry.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    tagged = bundle_model_version(client, name, bundle_version)
    if tagged is not None:
        return tagged
    try:
        client.get_model_version(name, bundle_version)
    except MlflowException as exc:
        raise PromotionError(
            f"{name or '(no model name)'} version {bundle_version or '?'} is not in the MLflow "
            f"registry at {mlflow.get_tracking_uri()}: no model version is tagged "
            f"{BUNDLE_VERSION_TAG}={bundle_version or '?'}; export the bundle from a registered "
            "model (the export stage tags it)"
        ) from exc
    return bundle_version


def gate_checks(
    figures: Mapping[str, Any], gate: GateConfig, role: str, champion: str | None
) -> list[Check]:
    """The gate's conditions on an evaluation summary; ``champion``: the version of the bundle
    exported from the registry's champion, as the shadow log names bundles (``None``: there is no
    champion)."""
    cand = figures["roles"][role]
    checks = [
        Check(
            "min_studies",
            cand["judged"] >= gate.min_studies,
            f"{cand['judged']} studies with a verified diagnosis (need {gate.min_studies}); "
            f"{cand['pending']} pending",
        )
    ]
    flagged = cand.get("flagged", [])
    checks.append(
        Check(
            "flagged_segments",
            len(flagged) <= gate.max_flagged_segments,
            f"{len(flagged)} flagged (at most {gate.max_flagged_segments})"
            + "".join(f"; {f['column']}={f['segment']}: {f['flag_reason']}" for f in flagged[:5]),
        )
    )
    logged_champion = figures["roles"].get(CHAMPION) if role != CHAMPION else None
    paired = figures.get("paired")
    if champion is None:
        checks.append(
            Check(
                "champion",
                gate.first_champion,
                "no champion yet"
                + ("" if gate.first_champion else "; shadow.gate.first_champion is false"),
            )
        )
        return checks
    if str(cand.get("model_version")) == str(champion):
        checks.append(Check("champion", False, f"v{champion} is already the champion"))
        return checks
    logged = None if logged_champion is None else str(logged_champion.get("model_version"))
    checks.append(
        Check(
            "champion",
            logged == str(champion),
            f"the registry's champion is v{champion}; the shadow log's champion is "
            + (f"v{logged}" if logged else "absent (the challenger ran without the champion)"),
        )
    )
    if paired is None:
        checks.append(Check("noninferior", False, "no paired comparison with the champion"))
        return checks
    overall = {r["metric"]: r for r in paired["overall"]}
    for metric in gate.noninferiority_metrics:
        row = overall.get(metric, {})
        low = row.get("diff_low")
        ok = low is not None and low > -gate.noninferiority_margin
        checks.append(
            Check(
                f"noninferior:{metric}",
                ok,
                f"{metric} {row.get('champion', float('nan')):.3f} -> "
                f"{row.get('challenger', float('nan')):.3f}, difference "
                f"{row.get('diff', float('nan')):+.3f} (CI low "
                f"{'n/a' if low is None else f'{low:+.3f}'}; must be above "
                f"{-gate.noninferiority_margin:+.3f}) on {paired['n']} paired studies",
            )
        )
    if gate.no_segment_worse:
        worse = paired.get("worse_segments", [])
        checks.append(
            Check(
                "no_segment_worse",
                not worse,
                "no segment significantly worse than the champion"
                if not worse
                else "significantly worse than the champion on "
                + ", ".join(f"{w['column']}={w['segment']} (n={w['n']})" for w in worse),
            )
        )
    return checks


def promote(
    report: Path | str,
    gate: GateConfig,
    registered_model: str | None = None,
    role: str | None = None,
    dry_run: bool = False,
    experiment: str = "shiftguard",
    root: Path | None = None,
    rollout: RolloutConfig | None = None,
) -> Decision:
    """Judge the challenger of the evaluation in ``report`` against the gate; move the alias
    ``champion`` to it (and remove its ``challenger`` alias) when every condition passes (not on a
    dry run); record the decision. With a ``rollout`` plan, the new champion's staged rollout
    starts (:func:`shiftguard.shadow.rollout.start`).

    Raises:
        PromotionError: no usable summary, or the challenger is not a version in the registry.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from shiftguard.shadow.report import SUMMARY, evaluation_run

    figures = load_summary(report)
    role = role or challenger_role(figures)
    if role not in figures["roles"]:
        raise PromotionError(f"{report}: no role {role!r} (it has {sorted(figures['roles'])})")
    cand = figures["roles"][role]
    name = registered_model or cand.get("model") or ""
    bundle_version = str(cand.get("model_version") or "")
    set_store(tracking_uri(root))
    client = MlflowClient()
    version = registry_version(client, name, bundle_version)
    try:
        serving = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        serving = None
    champion = None if serving is None else str(serving.version)
    champion_bundle = None
    if serving is not None:
        champion_bundle = (serving.tags or {}).get(BUNDLE_VERSION_TAG) or champion
    decision = Decision(
        name, version, champion, gate_checks(figures, gate, role, champion_bundle), dry_run
    )
    summary_json = Path(report) / SUMMARY if Path(report).is_dir() else Path(report)
    verdict = (
        "promoted" if decision.promoted else ("passed-dry-run" if decision.passed else "refused")
    )
    tags = {
        "shiftguard.decision": verdict,
        "shiftguard.challenger": f"{name} v{version}",
        "shiftguard.challenger_bundle": bundle_version,
        "shiftguard.champion_before": f"v{champion}" if champion else "none",
        "shiftguard.evaluation_run": evaluation_run(summary_json, root) or "",
        **{f"shiftguard.check.{c.name}": "pass" if c.passed else "fail" for c in decision.checks},
    }
    params = {"gate": gate.model_dump(mode="json"), "role": role, "dry_run": dry_run}
    with stage_run(
        "promote", params, root=root, experiment=experiment, tags=tags,
        name=f"promote {name} v{version}: {verdict}",
    ) as run:  # fmt: skip
        decision.run_id = run.info.run_id
        mlflow.log_dict(decision.to_dict(), "promotion/decision.json")
    if decision.promoted:
        if rollout is not None:
            # the wave tags first: a site polling between the two calls must not see a
            # champion without them and take it whatever its wave
            start_rollout(client, name, version, rollout)
        client.set_registered_model_alias(name, CHAMPION, version)
        if CHALLENGER in (client.get_model_version(name, version).aliases or []):
            client.delete_registered_model_alias(name, CHALLENGER)
        if champion:
            client.set_model_version_tag(name, champion, "shiftguard.replaced_by", f"v{version}")
    if not dry_run:
        client.set_model_version_tag(name, version, "shiftguard.promotion", verdict)
        client.set_model_version_tag(name, version, "shiftguard.promotion_run", decision.run_id)
        if not decision.passed:
            client.set_model_version_tag(
                name,
                version,
                "shiftguard.promotion_failed",
                ",".join(c.name for c in decision.failed),
            )
    log.info("promotion of %s v%s: %s", name, version, verdict)
    return decision
