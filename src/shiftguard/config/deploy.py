"""Schemas of the deployment sections: ``export`` (what goes into the edge bundle) and ``edge``
(the service a site runs).

Kept apart from :mod:`shiftguard.config.schema` so that the DVC stages that train and validate do not
depend on them: changing how models are shipped does not re-run training.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator

from shiftguard.config.schema import StrictModel


class SeriesSelection(StrictModel):
    """Which series the exported model is for; the edge runner skips the rest, saying why."""

    modalities: list[str] = Field(default_factory=lambda: ["MR"], min_length=1)
    series_description: str | None = Field(
        None, description="regular expression the SeriesDescription must contain (case-blind)"
    )
    min_slices: Annotated[int, Field(ge=1)] = 8
    orientations: list[str] = Field(
        default_factory=list, description="allowed orientation labels; empty: any"
    )

    @model_validator(mode="after")
    def _pattern(self) -> SeriesSelection:
        if self.series_description is not None:
            try:
                re.compile(self.series_description)
            except re.error as exc:
                raise ValueError(
                    f"export.series_selection.series_description {self.series_description!r} "
                    f"is not a regular expression: {exc}"
                ) from exc
        return self


class ExportConfig(StrictModel):
    """What the export stage writes into the edge bundle and how it checks it."""

    opset: Annotated[int, Field(ge=13, le=21)] = 17
    parity_tolerance: Annotated[float, Field(gt=0, le=0.01)] = 1e-4
    torchscript: bool = True
    class_names: tuple[str, str] = ("no finding", "finding")
    finding: str = "focal brain lesion"
    intended_use: str = Field(
        "Research and shadow-mode evaluation: flags T1-weighted brain MR series that may show a "
        "focal lesion, for comparison with the verified radiology report. Not a medical device.",
        min_length=1,
    )
    series_selection: SeriesSelection = Field(default_factory=SeriesSelection)
    signing_key: str | None = Field(
        None,
        description="the private key export signs the bundle with; null: $SHIFTGUARD_SIGNING_KEY, "
        "else the development key (`shiftguard keys generate --development`). Never a file in git",
    )


class EdgeDestination(StrictModel):
    """A node the edge service sends results to:

    * ``kind: dimse`` (the default): a PACS by C-STORE at ``ae_title``, ``host``, ``port``;
    * ``kind: stow-rs``: a VNA or PACS by DICOMweb STOW-RS at ``url`` (the service root);
    * ``kind: hl7-mllp``: an EHR or RIS interface engine by HL7 v2.5.1 ORU^R01 over MLLP at
      ``host``, ``port`` (TLS when ``ca`` or ``cert`` is set);
    * ``kind: fhir``: a FHIR R4 server at ``url`` (its base), a ``DiagnosticReport`` and its
      ``Observation`` per result.

    ``url`` destinations take a bearer token (``token_env``) and/or a client certificate
    (``cert``, ``key``), the server checked against ``ca``. ``priority_update``: how an urgent
    result raises its study's priority on the worklist (``ORM^O01`` or ``OMI^O23`` for
    hl7-mllp, ``ServiceRequest`` for fhir; see :mod:`shiftguard.edge.ehr`)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    kind: Literal["dimse", "stow-rs", "hl7-mllp", "fhir"] = "dimse"
    ae_title: str = Field("", max_length=16, description="DIMSE: the called AE title")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 4242
    url: str | None = Field(
        None,
        description="STOW-RS: the DICOMweb service root, e.g. https://vna.example/dicom-web "
        "(results are POSTed to {url}/studies); FHIR: the server's base, e.g. "
        "https://ehr.example/fhir; http:// on loopback only",
    )
    token_env: str | None = Field(
        None, description="STOW-RS, FHIR: the environment variable holding a bearer token"
    )
    ca: str | None = Field(None, description="CA bundle the server is checked against")
    cert: str | None = Field(None, description="client certificate (PEM)")
    key: str | None = Field(None, description="the client certificate's key (PEM)")
    role: Literal["clinical", "research"] = "clinical"
    receiving_application: str = Field(
        "", max_length=227, description="HL7: MSH-5, the receiving application"
    )
    receiving_facility: str = Field(
        "", max_length=227, description="HL7: MSH-6, the receiving facility"
    )
    priority_update: Literal["none", "ORM^O01", "OMI^O23", "ServiceRequest"] = Field(
        "none",
        description="an urgent result also raises its study's order to stat: by HL7 ORM^O01 or "
        "OMI^O23 (hl7-mllp) or by the FHIR ServiceRequest's priority (fhir); none: only the "
        "result's own priority fields",
    )
    timeout_s: Annotated[float, Field(gt=0, description="HL7, FHIR: seconds one send may take")] = (
        30.0
    )

    @model_validator(mode="after")
    def _kind(self) -> EdgeDestination:
        where = f"edge.destinations {self.name!r}"
        if self.kind == "dimse" and not self.ae_title:
            raise ValueError(f"{where}: a dimse destination needs its ae_title")
        if self.kind in ("dimse", "hl7-mllp"):
            if self.url is not None:
                raise ValueError(
                    f"{where}: url is for kinds stow-rs and fhir; a {self.kind} one has host, port"
                )
        elif not self.url or not self.url.startswith(("https://", "http://")):
            raise ValueError(
                f"{where}: a {self.kind} destination needs url, https://host[:port]/path "
                "(http:// on loopback only)"
            )
        allowed = {"hl7-mllp": ("ORM^O01", "OMI^O23"), "fhir": ("ServiceRequest",)}
        if self.priority_update != "none" and self.priority_update not in allowed.get(
            self.kind, ()
        ):
            raise ValueError(
                f"{where}: priority_update {self.priority_update} does not go by {self.kind}; "
                "use ORM^O01 or OMI^O23 with hl7-mllp, ServiceRequest with fhir"
            )
        if (self.cert is None) != (self.key is None):
            raise ValueError(f"{where}: cert and key go together")
        return self


_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


class FollowConfig(StrictModel):
    """Following a channel of the MLflow registry: the site fetches, checks and swaps in the
    bundle the channel points at (``url`` null: the site serves ``edge.bundle`` only)."""

    url: str | None = Field(
        None,
        description="the MLflow tracking server, e.g. https://mlflow.example:5000 (its REST API "
        "and artifact proxy; no MLflow package at the edge); http:// on loopback only",
    )
    model: str = Field("shiftguard-classifier", min_length=1, description="registered model")
    channel: str = Field(
        "champion",
        min_length=1,
        pattern=r"^[A-Za-z0-9_\-]+$",
        description="an alias (champion, challenger...) or a version number to pin",
    )
    poll_s: Annotated[float, Field(gt=0, description="seconds between two looks")] = 300.0
    maintenance_window: str | None = Field(
        None,
        description="HH:MM-HH:MM, local time, when a new bundle may be swapped in (it may span "
        "midnight); null: any time",
    )
    wave: Annotated[
        int,
        Field(ge=0, description="this site's rollout wave: 0 the canaries, then 1, 2..."),
    ] = 0
    token_env: str = Field(
        "MLFLOW_TRACKING_TOKEN", description="environment variable holding a bearer token"
    )
    ca: str | None = Field(None, description="CA bundle the registry's certificate must chain to")
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    keep: Annotated[
        int, Field(ge=2, description="bundles kept on disk (the current and the previous ones)")
    ] = 3

    @model_validator(mode="after")
    def _window(self) -> FollowConfig:
        if self.maintenance_window is not None and not _WINDOW.match(self.maintenance_window):
            raise ValueError(
                f"edge.follow.maintenance_window {self.maintenance_window!r}: expected "
                "HH:MM-HH:MM, e.g. 01:00-05:00"
            )
        return self


class RollbackConfig(StrictModel):
    """What the site watches after it swaps a bundle in, and when it goes back by itself."""

    observe_studies: Annotated[
        int, Field(ge=1, description="the observation lasts at least this many studies ...")
    ] = 50
    observe_hours: Annotated[float, Field(ge=0, description="... and at least this long")] = 24.0
    max_failures: Annotated[
        int, Field(ge=0, description="failed studies tolerated in the observation")
    ] = 2
    latency_factor: Annotated[
        float,
        Field(gt=1, description="p95 predict latency over the previous bundle's: beyond, back"),
    ] = 3.0
    min_latency_studies: Annotated[int, Field(ge=1)] = 10
    output_score: Annotated[
        float,
        Field(
            gt=0,
            description="the monitor's output rule at the site: z of the outputs' distance to "
            "the bundle's held-out reference; beyond, back",
        ),
    ] = 3.0
    min_output_studies: Annotated[
        int, Field(ge=5, description="studies before the output rule is judged")
    ] = 20


class EdgeConfig(StrictModel):
    """``shiftguard edge serve``: the DICOM service a site runs beside its PACS."""

    bundle: str = Field("artifacts/export", description="a .sgbundle file, or a folder holding one")
    challenger: str | None = Field(None, description="a second bundle run in shadow beside it")
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="public key files (.pub) a bundle may be signed by, besides "
        "$SHIFTGUARD_TRUSTED_KEYS (else the user's trust folder)",
    )
    allow_unsigned: bool = Field(
        False,
        description="development only: load an unsigned bundle, or one signed by a key not "
        "trusted, with a warning on every load; a clinical site leaves it false",
    )
    challenger_fraction: Annotated[
        float,
        Field(
            gt=0,
            le=1,
            description="share of studies the challenger reads too, chosen by a hash of the "
            "study UID (the same studies after a restart)",
        ),
    ] = 1.0
    storage: str = Field("edge-data", description="queue database, received studies, results")
    shadow: bool = Field(True, description="send nothing to clinical destinations")
    ae_title: str = Field("SHIFTGUARD", min_length=1, max_length=16, description="our AE title")
    host: str = Field(
        "127.0.0.1", description="listen address: the hospital LAN interface on a real site"
    )
    port: Annotated[int, Field(ge=0, le=65535, description="DICOM port (0: any free one)")] = 11112
    calling_ae_titles: list[str] = Field(
        default_factory=list, description="AE titles allowed to send; empty: any"
    )
    allowed_addresses: list[str] = Field(
        default_factory=list, description="addresses or CIDR networks allowed; empty: any"
    )
    tls_cert: str | None = Field(None, description="PEM certificate: DICOM over TLS when set")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert")
    tls_ca: str | None = Field(None, description="CA bundle; set to require client certificates")
    engine: Literal["asyncio", "pynetdicom"] = Field(
        "asyncio", description="the Storage SCP: ShiftGuard's asyncio one (fast) or pynetdicom's"
    )
    durability: Literal["association", "instance"] = Field(
        "association",
        description="fsync before acknowledging each C-STORE (instance) or before acknowledging "
        "the release of the association that brought it (association)",
    )
    network_timeout_s: Annotated[
        float, Field(gt=0, description="an association silent this long is aborted")
    ] = 60.0
    max_pdu: Annotated[
        int,
        Field(ge=0, description="largest P-DATA PDU the SCP accepts, in bytes; 0: unlimited"),
    ] = 0
    destinations: list[EdgeDestination] = Field(
        default_factory=list,
        description="where results go: {name, ae_title, host, port, role} by C-STORE; {name, "
        "kind: stow-rs, url, token_env, ca, cert, key, role} by DICOMweb STOW-RS; {name, kind: "
        "hl7-mllp, host, port, receiving_application, receiving_facility, priority_update} by "
        "HL7 v2 over MLLP; {name, kind: fhir, url, token_env, ca, cert, key, priority_update} to "
        "a FHIR R4 server",
    )
    urgency_threshold: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None,
        description="a result whose finding is present with at least this probability is urgent: "
        "it is delivered first, C-STORE priority HIGH, HL7 priority S (stat), and destinations "
        "with priority_update raise its study's order to stat; null: nothing is urgent",
    )
    max_study_mb: Annotated[
        float,
        Field(
            ge=0,
            description="a study past this many MiB is refused (instances answered 0xA700, the "
            "study marked failed with the reason) rather than filling the disk or the memory "
            "(a series resampled whole takes about 2.4x its pixel bytes; one prepared while it "
            "arrived, a few percent); 0: no limit",
        ),
    ] = 2048.0
    workers: Annotated[int, Field(ge=1, le=64, description="studies processed at once")] = 1
    prepare_while_receiving: bool = Field(
        True,
        description="read each image's header and resample its slice onto the bundle's grid while "
        "the rest of the study arrives, so that after the release only the last slices, "
        "inference and the result objects remain; false: all of it after the release",
    )
    prepare_in: Literal["process", "thread"] = Field(
        "process",
        description="where that preparing runs: a child process (the receiver keeps the "
        "interpreter to itself) or a thread of the service (no second process; receiving is "
        "slower while a study is prepared)",
    )
    stability_s: Annotated[
        float, Field(gt=0, description="a study with no new image this long is processed")
    ] = 30.0
    retry_base_s: Annotated[
        float, Field(gt=0, description="first delivery retry delay; doubles each time")
    ] = 2.0
    retry_max_s: Annotated[float, Field(gt=0, description="longest delivery retry delay")] = 300.0
    site: str = Field(
        "site", pattern=r"^[A-Za-z0-9_.\-]{1,64}$", description="this site's name in drift records"
    )
    collector_url: str | None = Field(
        None,
        description="the drift collector, e.g. https://10.20.0.7:8765 (http:// on loopback "
        "only); null: spool only",
    )
    collector_token_env: str = Field(
        "SHIFTGUARD_MONITOR_TOKEN", description="environment variable holding the collector token"
    )
    collector_ca: str | None = Field(
        None, description="CA bundle the collector's certificate is checked against (https)"
    )
    collector_cert: str | None = Field(
        None, description="PEM client certificate, when the collector requires one"
    )
    collector_key: str | None = Field(None, description="PEM private key of collector_cert")
    record_key: str | None = Field(
        None,
        description="file holding the site secret that keys drift record ids; null: "
        "<storage>/record.key, made on first start",
    )
    follow: FollowConfig = Field(default_factory=FollowConfig)
    rollback: RollbackConfig = Field(default_factory=RollbackConfig)
    heartbeat_s: Annotated[
        float, Field(gt=0, description="seconds between two heartbeats to the collector")
    ] = 60.0
    http_host: str = Field("127.0.0.1", description="/healthz and /metrics listen here")
    http_port: Annotated[int, Field(ge=0, le=65535, description="0: any free port")] = 8080

    @model_validator(mode="after")
    def _unique_destinations(self) -> EdgeConfig:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError(f"edge.destinations: names must be unique, got {names}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("edge.tls_cert and edge.tls_key go together: set both or neither")
        if bool(self.collector_cert) != bool(self.collector_key):
            raise ValueError(
                "edge.collector_cert and edge.collector_key go together: set both or neither"
            )
        return self


DEPLOY_SCHEMAS: dict[str, type[BaseModel]] = {"export": ExportConfig, "edge": EdgeConfig}
