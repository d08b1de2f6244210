"""``shiftguard edge serve``: the long-lived edge service beside the PACS.

Threads, all sharing one :class:`~shiftguard.edge.queue.WorkQueue`:

* the Storage SCP (:class:`~shiftguard.edge.receiver.Receiver`): studies in, written and queued
  before they are acknowledged; ready when their association is released;
* a stability timer: studies with no new instance for ``stability_s`` become ready as well;
* workers: claim a ready study, run the champion bundle on its files, write SR and key image, log
  its results in the shadow log and queue its objects for the destinations its mode allows, all
  in the transaction that marks the study done; then the challenger, if any (on the
  ``challenger_fraction`` of studies :func:`sampled` picks), whose results go to the shadow log;
* one sender per destination: C-STOREs its due objects over one association per batch (or
  STOW-RS, HL7 v2 over MLLP, FHIR: one object a request), retrying with exponential backoff, so a
  destination that is down delays only itself; urgent results (``edge.urgency_threshold``) go
  first, and EHR destinations get messages (:mod:`shiftguard.edge.ehr`) written beside the SR;
* an HTTP endpoint (:class:`~shiftguard.endpoint.Endpoint`, loopback by default): ``/healthz`` and
  ``/metrics`` (``prometheus_client``: latency histograms, counters, queue and spool gauges);
* with ``edge.follow.url``, a follower: every ``poll_s`` it asks the registry what the channel
  points at (:mod:`shiftguard.edge.registry`) and, when this site may take it (its rollout wave
  is open, the maintenance window too), fetches, verifies and smoke-tests it
  (:mod:`shiftguard.edge.smoke`) and swaps it in at a study boundary (:meth:`Service.adopt`); a
  watch (:class:`~shiftguard.edge.follow.Watch`) then rolls it back on failures, latency or the
  output rule. The state (last known-good bundle, refused versions) lives in
  ``<storage>/bundles/state.json``;
* the shipper's heartbeats (:meth:`Service.heartbeat`) tell the collector the site's state.

Shadow mode: nothing goes to a ``clinical`` destination; results stay in the shadow log and go to
``research`` destinations only. The challenger's results never go anywhere clinical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from shiftguard.config.deploy import EdgeConfig, EdgeDestination
from shiftguard.edge.bundle import SUFFIX, open_bundle
from shiftguard.edge.dicom_out import warm_up
from shiftguard.edge.dicomweb import StowError, stow, stow_client
from shiftguard.edge.ehr import (
    facts_of,
    fhir_priority_update,
    fhir_report,
    hl7_order_priority,
    hl7_oru,
    study_facts,
)
from shiftguard.edge.fhir import FhirClient, FhirError
from shiftguard.edge.follow import (
    FollowState,
    Installed,
    Watch,
    in_window,
    reference_outputs,
    utc_now,
)
from shiftguard.edge.mllp import MllpError
from shiftguard.edge.mllp import send as send_mllp
from shiftguard.edge.predict import Predictor
from shiftguard.edge.prefetch import Prefetcher, PreparedStudy
from shiftguard.edge.queue import WorkQueue
from shiftguard.edge.receiver import Receiver, no_delay
from shiftguard.edge.registry import ModelVersion, RegistryClient
from shiftguard.edge.shipper import Shipper, Spool
from shiftguard.edge.signing import Trust
from shiftguard.edge.smoke import require_smoke
from shiftguard.endpoint import Endpoint
from shiftguard.errors import BundleError, ConfigError, RegistryError, listening
from shiftguard.records.features import make_record
from shiftguard.tls import client_context
from shiftguard.utils import write_json

log = logging.getLogger(__name__)

CLINICAL, RESEARCH = "clinical", "research"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
#: destinations that take the result objects themselves, and those that take messages about them
DICOM_KINDS, EHR_KINDS = ("dimse", "stow-rs"), ("hl7-mllp", "fhir")
#: C-STORE priority (PS3.7 9.1.1.1): an urgent result is sent HIGH
PRIORITY_MEDIUM, PRIORITY_HIGH = 0x0000, 0x0001
#: latency histogram buckets, seconds
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: the service's own counters (``shiftguard_edge_<name>_total``)
COUNTERS = {
    "processed": "Studies the champion processed",
    "series_streamed": "Series resampled from the slices prepared while the study arrived",
    "failed": "Studies that failed (moved to the failed queue)",
    "challenger_failed": "Studies the challenger failed on (the champion's result stands)",
    "sent": "Result objects delivered to a destination",
    "send_failures": "Failed sends (each retried with backoff)",
    "swaps": "Bundles swapped in from the registry",
    "rollbacks": "Swaps undone by the site's own watch",
    "refused_bundles": "Registry versions refused (signature, hash, load or smoke test)",
    "registry_errors": "Looks at the registry that failed (the site kept serving)",
}
#: the work queue's counts that make its depth: studies waiting or in work, results unsent
QUEUE_DEPTH = ("studies_receiving", "studies_ready", "studies_processing", "deliveries_pending")
BUNDLES = "bundles"
"""The storage folder's sub-folder of fetched bundles and the follower's state."""


def resolve_bundle(path: str | Path) -> Path:
    """A bundle file, or the one ``*.sgbundle`` in a folder.

    Raises:
        BundleError: the path is missing, or the folder holds none or several bundles.
    """

    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob(f"*{SUFFIX}"))
        if len(found) != 1:
            raise BundleError(
                f"{path}: holds {len(found)} bundles ({', '.join(p.name for p in found) or 'none'}); "
                "name the bundle file instead"
            )
        return found[0]
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle file or folder")
    return path


def _number(value: Any) -> float | None:
    """A results row's number, ``None`` where it has none (an empty CSV cell)."""
    return None if value in (None, "") else float(value)


def sampled(study_uid: str, fraction: float) -> bool:
    """Whether a study is among the ``fraction`` the challenger reads: decided by a hash of its
    UID, so the same studies are chosen after a restart and by every edge with that fraction.

    >>> sampled("1.2.3", 1.0), sampled("1.2.3", 0.5) == sampled("1.2.3", 0.5)
    (True, True)
    """
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(study_uid.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


RECORD_KEY = "record.key"
"""The site secret's file in the storage folder when ``record_key`` is not set."""


def load_record_key(path: Path | str) -> bytes:
    """The site secret that keys drift record ids (32 random bytes), made on first use.

    The file is created with mode 0600 and never leaves the site; keep it with the storage folder
    (a new secret gives every series a new record id, so the collector would count a re-sent
    series twice). Several edges of one site that must agree share one file.

    Raises:
        ConfigError: the file exists but is unreadable or shorter than 16 bytes.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: read theirs
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
                fh.flush()
                os.fsync(fh.fileno())
            log.info("edge: made the site's record key %s (keep it with the storage)", path)
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"edge.record_key {path}: cannot read it ({exc.strerror})") from None
    if len(key) < 16:
        raise ConfigError(
            f"edge.record_key {path}: {len(key)} bytes; a record key is at least 16 random bytes "
            "(delete the file to have a new one made)"
        )
    return key


def read_collector_token(cfg: EdgeConfig) -> str | None:
    """The collector's token from the environment variable ``edge.collector_token_env`` names;
    None when no collector is set.

    Raises:
        ConfigError: a collector is set but the variable is empty.
    """
    if not cfg.collector_url:
        return None
    token = os.environ.get(cfg.collector_token_env) or None
    if not token:
        raise ConfigError(
            f"edge.collector_url is set ({cfg.collector_url}) but ${cfg.collector_token_env} is "
            "empty: export the collector's token there (edge.collector_token_env names the "
            "variable), or set edge.collector_url=null to keep records in the spool"
        )
    return token


def trust(cfg: EdgeConfig) -> Trust:
    """The keys this site's bundles must be signed by."""
    return Trust(keys=tuple(cfg.trusted_keys), allow_unsigned=cfg.allow_unsigned)


class _ScrapeFigures:
    """Figures read when ``/metrics`` is scraped: the receiver's counters, the work queue and the
    drift record spool."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        stats = self.service.receiver.stats
        for name, value, text in (
            ("received", stats.received, "Instances received and queued"),
            ("received_bytes", stats.bytes, "Bytes of the instances received"),
            ("rejected", stats.rejected, "Instances refused (unusable UIDs, disk full, ...)"),
            ("refused_associations", stats.refused_associations, "Associations refused"),
        ):
            yield CounterMetricFamily(f"shiftguard_edge_{name}", text, value=value)
        queue = GaugeMetricFamily(
            "shiftguard_edge_queue", "Work queue items by state", labels=["item"]
        )
        for name, value in sorted(self.service.queue.counts().items()):
            queue.add_metric([name], value)
        yield queue
        spool = GaugeMetricFamily(
            "shiftguard_edge_drift_records", "Drift records in the spool by state", labels=["state"]
        )
        for name, value in sorted(self.service.spool.counts().items()):
            spool.add_metric([name], value)
        yield spool


class Service:
    """The running service (see the module docstring)."""

    def __init__(
        self,
        settings: EdgeConfig,
        collector_token: str | None = None,
        poll_s: float = 0.05,
    ) -> None:
        """
        Args:
            settings: The validated ``edge`` section (or a site file), used as it is.
            collector_token: The collector's token; None: read from ``edge.collector_token_env``.
            poll_s: How long an idle worker or sender waits before looking at the queue again.

        Raises:
            ConfigError: a collector is set and no token is found.
            BundleError, SignatureError: a bundle cannot be used.
        """
        self.settings = settings
        self.poll_s = poll_s
        self.collector_token = collector_token or read_collector_token(settings)
        root = Path(settings.storage)
        self.queue = WorkQueue(root / "queue.db")
        self.inbox = root / "inbox"
        self.outbox = root / "results"
        keys = self.trust = trust(settings)
        # following a registry channel: the last known-good bundle, a watch after each swap
        self.bundles = root / BUNDLES
        self.follow_state = FollowState.load(self.bundles)
        self._swap_lock = threading.RLock()
        self.watch: Watch | None = None
        self._watched: Predictor | None = None
        self.previous: Predictor | None = None
        self._latencies: deque[float] = deque(maxlen=100)  # the serving bundle's predict times
        self.follow_error: str | None = None
        self.follow_status = "off" if not settings.follow.url else "starting"
        self.channel_version: str | None = None
        self.last_study_at: str | None = None
        self.registry_client = (
            RegistryClient.from_settings(settings.follow) if settings.follow.url else None
        )
        self.champion = self._initial_champion()
        self.challenger = (
            Predictor(open_bundle(resolve_bundle(settings.challenger), keys), shadow=True)
            if settings.challenger
            else None
        )
        if self.challenger is not None and (
            (self.challenger.bundle.name, self.challenger.bundle.version)
            == (self.champion.bundle.name, self.champion.bundle.version)
        ):
            raise BundleError(
                f"{settings.challenger}: the challenger is the champion's bundle "
                f"({self.champion.bundle.name} v{self.champion.bundle.version}); the shadow log "
                "could not tell their results apart: give a different bundle or none"
            )
        # DICOMweb destinations' clients, made now so that a bad URL or certificate stops the start
        self._stow_clients = {
            d.name: stow_client(d) for d in settings.destinations if d.kind == "stow-rs"
        }
        self._fhir_clients = {
            d.name: FhirClient(d) for d in settings.destinations if d.kind == "fhir"
        }
        self._mllp_tls = {
            d.name: client_context(d.ca, d.cert, d.key)
            for d in settings.destinations
            if d.kind == "hl7-mllp" and (d.ca or d.cert)
        }
        # headers read and slices resampled while a study arrives (the worker takes what is done)
        self.prefetch = (
            Prefetcher(lambda: self.champion, settings.prepare_in)
            if settings.prepare_while_receiving
            else None
        )
        self.receiver = Receiver(
            settings, self.queue, self.inbox, on_ready=self._wake,
            on_stored=self.prefetch.add if self.prefetch is not None else None,
        )  # fmt: skip
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "shiftguard_edge_latency_seconds",
            "Seconds per study: predict (both result objects written), deliver (one send), "
            "ready_to_sent (association released to the last result acknowledged)",
            ["stage"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        for stage in ("predict", "deliver", "ready_to_sent"):
            self.latency.labels(stage)
        self.counters = {
            name: Counter(f"shiftguard_edge_{name}", text, registry=self.registry)
            for name, text in COUNTERS.items()
        }
        self._ready_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._stopped = False
        self._work = threading.Event()
        self._threads: list[threading.Thread] = []
        self._http: Endpoint | None = None
        # drift monitoring: a PHI-free record per series, spooled, shipped when a collector is set

        self.spool = Spool(root / "spool.db")
        self.registry.register(_ScrapeFigures(self))
        self.shipper: Shipper | None = None
        self.record_key = load_record_key(settings.record_key or root / RECORD_KEY)
        if settings.collector_url:
            assert self.collector_token is not None  # read_collector_token raised otherwise
            self.shipper = Shipper(
                self.spool, settings.collector_url, self.collector_token,
                tls_ca=settings.collector_ca, tls_cert=settings.collector_cert,
                tls_key=settings.collector_key, heartbeat=self.heartbeat,
                heartbeat_s=settings.heartbeat_s,
            )  # fmt: skip

    # bundles: the one served, swaps from the registry, the watch and rollback ------------------

    def _load(self, path: Path) -> Predictor:
        """A verified bundle made ready, after its smoke test (BundleError, SignatureError or
        SmokeTestError when it cannot be served)."""
        predictor = Predictor(open_bundle(path, self.trust), shadow=self.settings.shadow)
        require_smoke(predictor)
        return predictor

    def _initial_champion(self) -> Predictor:
        """What to serve at start: following a channel, the last known-good bundle (the state's
        current one; still under observation: with the previous one loaded to go back to);
        otherwise, or when there is none yet, ``edge.bundle``."""
        state = self.follow_state
        if self.settings.follow.url and state.current and Path(state.current.path).is_file():
            try:
                predictor = self._load(Path(state.current.path))
            except Exception as exc:
                log.error("follow: the last bundle %s cannot be served (%s); starting from "
                          "edge.bundle", state.current.label, exc)  # fmt: skip
            else:
                if not state.confirmed and state.previous and Path(state.previous.path).is_file():
                    try:
                        self.previous = self._load(Path(state.previous.path))
                    except Exception as exc:
                        log.error("follow: the previous bundle %s cannot be loaded (%s); no "
                                  "rollback possible", state.previous.label, exc)  # fmt: skip
                    self._watch(predictor)  # the observation starts again after a restart
                log.info("follow: serving %s (the last known-good bundle)", state.current.label)
                return predictor
        path = resolve_bundle(self.settings.bundle)
        predictor = self._load(path)
        if self.settings.follow.url:
            state.current = Installed(str(path), predictor.bundle.name, predictor.bundle.version)
            state.previous, state.confirmed = None, True
            state.save()
        return predictor

    def _watch(self, predictor: Predictor) -> None:
        bundle = predictor.bundle
        reference = bundle.members.get("reference.csv")
        self.watch = Watch(
            self.settings.rollback,
            reference_outputs(reference) if reference else {},
            baseline=list(self._latencies),
        )
        self._watched = predictor
        self._latencies.clear()

    def adopt(self, path: Path, version: ModelVersion | None = None) -> bool:
        """Load, check and smoke-test the bundle at ``path``, then make it the champion for
        every study claimed from now on (studies in flight finish on the one they started with);
        the previous bundle stays loaded until the watch confirms the new one (a bundle adopted
        while another is observed replaces that one; the bundle to go back to stays the last
        confirmed one). False when it is the bundle already served.

        Raises:
            BundleError, SignatureError, SmokeTestError: the bundle cannot be served (nothing
                changes).
        """
        predictor = self._load(path)
        state = self.follow_state
        registry = version.version if version is not None else None
        with self._swap_lock:
            if predictor.bundle.version == self.champion.bundle.version:
                if state.current is not None:
                    state.current.registry_version = registry
                    state.save()
                return False
            if (
                self.challenger is not None
                and self.challenger.bundle.version == predictor.bundle.version
            ):
                log.warning("follow: the challenger %s v%s is now the champion; it is no longer "
                            "run a second time", predictor.bundle.name, predictor.bundle.version)  # fmt: skip
                self.challenger = None
            new = Installed(str(path), predictor.bundle.name, predictor.bundle.version, registry)
            if self.watch is None:  # the served bundle is confirmed: it is the one to go back to
                self.previous = self.champion
                state.previous = state.current
            # else a newer version came while the last one was observed: that one is dropped,
            # the bundle to go back to stays the last confirmed one
            self._count("swaps")  # first: whoever sees the new champion sees the swap counted
            self.champion = predictor
            self._watch(predictor)
            state.current, state.confirmed = new, False
            state.event("swapped", f"{new.label} swapped in", version=new.version,
                        registry_version=registry)  # fmt: skip
            state.save()
        log.info("follow: %s swapped in; watching it (%s)", new.label, self._watch_terms())
        return True

    def _watch_terms(self) -> str:
        r = self.settings.rollback
        return (f"{r.observe_studies} studies and {r.observe_hours:g} h; back on more than "
                f"{r.max_failures} failures, {r.latency_factor:g} x latency or output score "
                f"over {r.output_score:g}")  # fmt: skip

    def _observed(self, predictor: Predictor, seconds: float | None, rows: Sequence[Any]) -> None:
        """One study done (``seconds`` None: failed) by ``predictor``: the watch judges."""
        with self._swap_lock:
            if predictor is not self._watched or self.watch is None:
                if seconds is not None and predictor is self.champion:
                    self._latencies.append(seconds)
                return
            watch = self.watch
            if seconds is None:
                watch.failed()
            else:
                watch.record(seconds, rows)
            reason = watch.verdict()
            if reason is not None:
                self.rollback(reason)
            elif watch.done():
                self._confirm()

    def _confirm(self) -> None:
        state = self.follow_state
        assert self.watch is not None and state.current is not None
        state.confirmed = True
        state.event("confirmed", f"{state.current.label} passed its observation",
                    version=state.current.version, **self.watch.summary())  # fmt: skip
        state.save()
        state.prune(self.settings.follow.keep)
        log.info(
            "follow: %s passed its observation (%s)", state.current.label, self.watch.summary()
        )
        self.watch, self._watched, self.previous = None, None, None

    def rollback(self, reason: str) -> bool:
        """Go back to the previous bundle (False when there is none loaded); the bundle left is
        never taken again from the registry."""
        with self._swap_lock:
            state = self.follow_state
            if self.previous is None or state.current is None:
                log.error("follow: %s, but no previous bundle is loaded to go back to", reason)
                return False
            left = state.current
            summary = self.watch.summary() if self.watch is not None else {}
            self._count("rollbacks")  # first, as for swaps
            self.champion, self.previous = self.previous, None
            self.watch, self._watched = None, None
            state.refused[left.registry_version or f"bundle {left.version}"] = (
                f"rolled back: {reason}"
            )
            state.current, state.previous, state.confirmed = state.previous, None, True
            state.event("rolled_back", reason, version=left.version,
                        registry_version=left.registry_version, **summary)  # fmt: skip
            state.save()
        log.error("follow: rolled back from %s to %s: %s", left.label,
                  state.current.label if state.current else "?", reason)  # fmt: skip
        return True

    def poll_registry(self) -> str:
        """One look at the channel: fetch, check and swap in what it points at when this site
        may take it now. Returns what happened, in words; never raises for the registry."""
        cfg, state, client = self.settings.follow, self.follow_state, self.registry_client
        if client is None:
            return "off"
        try:
            version = client.resolve(cfg.model, cfg.channel)
        except RegistryError as exc:
            return self._registry_failed(exc)
        self.channel_version = version.version
        label = f"{cfg.model}@{cfg.channel} = version {version.version}"
        current = state.current
        if current is not None and current.registry_version == version.version:
            return self._status(f"serving {label}")
        if version.version in state.refused:
            return self._status(f"{label} refused: {state.refused[version.version]}")
        wave = version.open_wave
        if wave is not None and cfg.wave > wave:
            opened = "halted" if wave < 0 else f"open to waves up to {wave}"
            return self._status(
                f"{label} waits: its rollout is {opened}, this site is wave {cfg.wave}"
            )
        if not in_window(cfg.maintenance_window, datetime.now().time()):
            return self._status(
                f"{label} waits for the maintenance window {cfg.maintenance_window}"
            )
        try:
            path = client.download(version, self.bundles)
        except RegistryError as exc:
            return self._registry_failed(exc)
        self.follow_error = None
        try:
            swapped = self.adopt(path, version)
        except Exception as exc:  # BundleError, SignatureError, SmokeTestError, a model that breaks
            reason = f"{type(exc).__name__}: {exc}"
            self._count("refused_bundles")  # first: whoever sees the refusal sees it counted
            state.refused[version.version] = reason
            state.event("refused", reason, registry_version=version.version)
            state.save()
            log.error("follow: %s refused, still serving %s: %s", label,
                      self.champion.bundle.version, reason)  # fmt: skip
            return self._status(f"{label} refused: {reason}")
        return self._status(f"{label} {'swapped in' if swapped else 'is the bundle served'}")

    def _status(self, text: str) -> str:
        self.follow_status = text
        return text

    def _registry_failed(self, exc: Exception) -> str:
        self.follow_error = str(exc)
        self._count("registry_errors")
        log.warning("follow: %s; still serving %s", exc, self.champion.bundle.version)
        return self._status(f"registry unavailable: {exc}")

    def _follower(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_registry()
            except Exception:  # a bug must not stop the service from serving
                log.exception("follow: unexpected error; trying again at the next poll")
            self._stop.wait(self.settings.follow.poll_s)

    def heartbeat(self) -> dict[str, Any]:
        """What this site tells the collector about itself (``POST /v1/heartbeats``): no study,
        no patient, only the service's state."""
        state, cfg = self.follow_state, self.settings.follow
        bundle = self.champion.bundle
        counts = self.queue.counts()
        return {
            "site": self.settings.site,
            "sent_at": utc_now(),
            "interval_s": self.settings.heartbeat_s,
            "bundle": bundle.name,
            "bundle_version": bundle.version,
            "registry_version": state.current.registry_version if state.current else None,
            "channel": f"{cfg.model}@{cfg.channel}" if cfg.url else None,
            "channel_version": self.channel_version,
            "wave": cfg.wave,
            "state": "observing" if self.watch is not None else "serving",
            "observation": self.watch.summary() if self.watch is not None else None,
            "follow": self.follow_status,
            "registry_error": self.follow_error,
            "queue": counts,
            "queue_depth": sum(counts.get(k, 0) for k in QUEUE_DEPTH),
            "processed": self.count("processed"),
            "studies_on_bundle": self.queue.studies_by(bundle.version),
            "failed": self.count("failed"),
            "last_study_at": self.last_study_at,
            "disk_free_bytes": shutil.disk_usage(self.settings.storage).free,
            "spool_pending": self.spool.counts().get("pending", 0),
            "rolled_back": state.last("rolled_back"),
            "refused": dict(state.refused),
        }

    # ---------------------------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name].inc(n)

    def _wake(self, studies: Sequence[str] = ()) -> None:
        """Note when each study's association was released (for the latency histogram); the
        workers poll the queue, which the receiver updates right after this call."""
        now = time.monotonic()
        for uid in studies:
            self._ready_at.setdefault(uid, now)
        self._work.set()

    def _routes(self) -> list[EdgeDestination]:
        """Where the champion's results go: research destinations always, clinical ones unless in
        shadow mode."""
        return [
            d for d in self.settings.destinations if d.role == RESEARCH or not self.settings.shadow
        ]

    def process(self, study_uid: str, champion: Predictor | None = None) -> None:
        """Run the bundle(s) on one claimed study and queue its deliveries; ``champion``: the
        bundle the study was claimed for (None: the one served now)."""
        champion = champion or self.champion
        began = time.monotonic()
        revision = self.queue.study_revision(study_uid)  # before the files: an instance that
        files = self.queue.study_files(study_uid)  # comes between is then processed again
        out = self.outbox / study_uid
        if revision:
            log.info("study %s gained instances after or while it was processed: revision %d",
                     study_uid, revision)  # fmt: skip
        prepared = self.prefetch.take(study_uid) if self.prefetch is not None else None
        summary = champion.predict_files(files, out, revision=revision, prepared=prepared)
        deliveries: list[tuple[str, str, str, bool]] = []
        results = []
        routes = self._routes()
        for row in summary.results:
            urgent = self.urgent(row)
            for dest in routes:
                if dest.kind in DICOM_KINDS:
                    deliveries.append((dest.name, row["sr_uid"], str(out / row["sr_file"]), urgent))
                    deliveries.append((dest.name, row["sc_uid"], str(out / row["sc_file"]), urgent))
            results.append(self._log_row(study_uid, row, "champion", routes))
        deliveries += self._messages(study_uid, summary.results, routes, out)
        note = "; ".join(
            f"skipped {s['series_description'] or Path(s['path']).name}: {s['reason']}"
            for s in summary.skipped
        )
        if summary.results:  # spooled first: a crash before finish_study re-sends a duplicate,
            self._spool(summary.results)  # which the collector ignores, rather than losing one
        self.queue.finish_study(study_uid, deliveries, results, note=note, revision=revision)
        if not deliveries:  # nothing will be sent (shadow mode, or nothing selected)
            self._ready_at.pop(study_uid, None)
        elapsed = time.monotonic() - began
        self.latency.labels("predict").observe(elapsed)
        self._count("processed")
        if summary.streamed:
            self._count("series_streamed", summary.streamed)
        self.last_study_at = utc_now()
        self._observed(champion, elapsed, summary.results)
        if note:
            log.info("study %s: %s", study_uid, note)
        if self.challenger is not None and sampled(study_uid, self.settings.challenger_fraction):
            self._challenge(study_uid, files, prepared)

    def urgent(self, row: dict[str, Any]) -> bool:
        """Whether a result row is urgent: finding present, probability at or above
        ``edge.urgency_threshold``."""
        bar = self.settings.urgency_threshold
        p = float(row["probability"])
        return bar is not None and p >= float(row["threshold"]) and p >= bar

    def _messages(
        self,
        study_uid: str,
        rows: Sequence[dict[str, Any]],
        routes: Sequence[EdgeDestination],
        out: Path,
    ) -> list[tuple[str, str, str, bool]]:
        """The EHR messages of a study's results for the EHR destinations among ``routes``,
        written beside the SR (one file a message and destination), as deliveries ``(destination,
        key, path, urgent)``: an ORU^R01 or a FHIR report per result, and one priority update per
        study and destination when a result is urgent and the destination asks for it."""
        ehr = [d for d in routes if d.kind in EHR_KINDS]
        if not ehr or not rows:
            return []
        now = time.time()
        site = self.settings.site
        queued: list[tuple[str, str, str, bool]] = []
        facts, urgent = None, False
        for row in rows:
            facts = study_facts(out / row["sr_file"])
            result = facts_of(row, self.urgent(row))
            urgent = urgent or result.urgent
            stem = Path(row["sr_file"]).stem
            for dest in ehr:
                if dest.kind == "hl7-mllp":
                    key, path = f"ORU^R01:{result.sr_uid}", out / f"{stem}.{dest.name}.oru.hl7"
                    receiving = (dest.receiving_application, dest.receiving_facility)
                    path.write_bytes(hl7_oru(facts, result, site, receiving, now).encode())
                else:
                    key, path = f"fhir:{result.sr_uid}", out / f"{stem}.{dest.name}.fhir.json"
                    write_json(path, fhir_report(facts, result, site, now))
                queued.append((dest.name, key, str(path), result.urgent))
        if facts is None or not urgent:
            return queued
        for dest in ehr:
            update = dest.priority_update
            if update == "none":
                continue
            if not facts.accession:  # the order cannot be named: nothing to raise
                log.warning("study %s is urgent but has no accession number: no %s to %s",
                            study_uid, update, dest.name)  # fmt: skip
                continue
            key = f"{update}:{study_uid}"
            path = out / f"priority.{dest.name}.{'json' if update == 'ServiceRequest' else 'hl7'}"
            if update == "ServiceRequest":
                write_json(path, fhir_priority_update(facts))
            else:
                receiving = (dest.receiving_application, dest.receiving_facility)
                path.write_bytes(hl7_order_priority(update, facts, site, receiving, now).encode())
            queued.insert(0, (dest.name, key, str(path), True))
        return queued

    def _challenge(
        self, study_uid: str, files: Sequence[str], prepared: PreparedStudy | None = None
    ) -> None:
        """The challenger on a study whose champion results are already queued: it never delays
        them, and its failure costs the shadow log one study, never the champion's results."""
        assert self.challenger is not None
        try:
            ch = self.challenger.predict_files(
                files, self.outbox / "challenger" / study_uid, prepared=prepared
            )
            self.queue.log_results(
                [self._log_row(study_uid, r, "challenger", []) for r in ch.results]
            )
        except Exception:
            log.exception("challenger failed on study %s (the champion's results stand)", study_uid)
            self._count("challenger_failed")

    def _spool(self, rows: Sequence[dict[str, Any]]) -> None:

        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        records = [
            make_record(
                {k: (None if v == "" else v) for k, v in row.items()},
                site=self.settings.site,
                bundle=str(row["model"]),
                bundle_version=str(row["model_version"]),
                series_uid=str(row["series_uid"]),
                processed_at=stamp,
                record_key=self.record_key,
            )
            for row in rows
        ]
        self.spool.add(records)
        if self.shipper is not None:
            self.shipper.wake()

    def _log_row(
        self, study_uid: str, row: dict[str, Any], role: str, routes: Sequence[EdgeDestination]
    ) -> dict[str, Any]:
        return {
            "study_uid": study_uid,
            "series_uid": row["series_uid"],
            "bundle": f"{row['model']}-v{row['model_version']}",
            "role": role,
            "probability": float(row["probability"]),
            "raw_probability": _number(row.get("raw_probability")),
            "threshold": float(row["threshold"]),
            "result": row["result"],
            "routed": ",".join(d.name for d in routes) or "shadow log only",
            "model": str(row["model"]),
            "model_version": str(row["model_version"]),
            "site": self.settings.site,
            "institution": row.get("institution", ""),
            "manufacturer": row.get("manufacturer", ""),
            "scanner_model": row.get("scanner_model", ""),
            "sex": row.get("sex", ""),
            "age_band": row.get("age_band", ""),
            "patient_age": None if row.get("patient_age") in (None, "") else row["patient_age"],
        }

    def _worker(self) -> None:
        while not self._stop.is_set():
            uid = self.queue.claim_study()
            if uid is None:
                self._work.wait(self.poll_s)
                self._work.clear()
                continue
            champion = self.champion  # a swap takes over at a study boundary
            try:
                self.process(uid, champion)
            except Exception as exc:  # a study that breaks the runner must not stop the service
                log.exception("study %s failed", uid)
                self.queue.fail_study(uid, f"{type(exc).__name__}: {exc}")
                self._count("failed")
                self._observed(champion, None, ())

    def _stability(self) -> None:
        while not self._stop.wait(min(1.0, self.settings.stability_s / 4)):
            if self.queue.mark_stable(self.settings.stability_s):
                self._work.set()

    def _delivered(self, delivery: Any, began: float) -> None:
        self.queue.delivered(delivery.id)
        self._count("sent")
        self.latency.labels("deliver").observe(time.monotonic() - began)
        ready = self._ready_at.pop(delivery.study_uid, None)
        if ready is not None:
            self.latency.labels("ready_to_sent").observe(time.monotonic() - ready)

    def _send_one(self, dest: EdgeDestination, delivery: Any) -> None:
        """Deliver one object to a STOW-RS, HL7 or FHIR destination.

        Raises:
            StowError, MllpError, FhirError, OSError: it was not delivered.
        """
        if dest.kind == "stow-rs":
            stow(self._stow_clients[dest.name], delivery.path)
        elif dest.kind == "hl7-mllp":
            message = Path(delivery.path).read_bytes().decode("utf-8")  # keeps the \r
            context = self._mllp_tls.get(dest.name)
            send_mllp(dest.host, dest.port, message, None, dest.timeout_s, context)
        else:
            payload = json.loads(Path(delivery.path).read_bytes())
            client = self._fhir_clients[dest.name]
            if payload.get("action") == "raise-priority":
                client.raise_priority(payload["accession"], payload["priority"])
            else:
                client.transaction(payload)

    def _one_by_one(self, dest: EdgeDestination) -> None:
        """Deliver ``dest``'s queue one object a request (STOW-RS, HL7 over MLLP, FHIR), each
        retried with the queue's backoff until the destination acknowledges it; one it can never
        take (a FHIR order that is not there) is given up, with the reason."""
        while not self._stop.is_set():
            due = self.queue.due(dest.name)
            if not due:
                self._stop.wait(self.poll_s)
                continue
            for d in due:
                if self._stop.is_set():
                    return
                began = time.monotonic()
                try:
                    self._send_one(dest, d)
                except (StowError, MllpError, FhirError) as exc:
                    self._backoff(d, str(exc), give_up=getattr(exc, "permanent", False))
                    continue
                except (OSError, ValueError) as exc:  # the file cannot be read
                    self._backoff(d, f"{type(exc).__name__}: {exc}")
                    continue
                self._delivered(d, began)

    def _sender(self, dest: EdgeDestination) -> None:
        if dest.kind != "dimse":
            self._one_by_one(dest)
            return
        from pydicom import dcmread
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.settings.ae_title)
        for sop_class in (COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE):  # what the runner writes
            ae.add_requested_context(sop_class, EXPLICIT_VR_LITTLE_ENDIAN)
        while not self._stop.is_set():
            due = self.queue.due(dest.name)
            if not due:
                self._stop.wait(self.poll_s)
                continue
            assoc = ae.associate(
                dest.host,
                dest.port,
                ae_title=dest.ae_title,
                evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: no_delay(event.assoc))],
            )
            if not assoc.is_established:
                for d in due:
                    self._backoff(d, f"no association with {dest.name} ({dest.host}:{dest.port})")
                continue
            try:
                for d in due:
                    began = time.monotonic()
                    try:
                        priority = PRIORITY_HIGH if d.urgent else PRIORITY_MEDIUM
                        status = assoc.send_c_store(dcmread(d.path), priority=priority)
                        ok = bool(status) and int(status.Status) in (0x0000, 0xB000, 0xB007, 0xB006)
                        error = (
                            "" if ok else f"status 0x{int(getattr(status, 'Status', 0xFFFF)):04X}"
                        )
                    except Exception as exc:  # connection dropped mid-batch
                        ok, error = False, f"{type(exc).__name__}: {exc}"
                    if ok:
                        self._delivered(d, began)
                    else:
                        self._backoff(d, error)
                        if not assoc.is_established:
                            break
            finally:
                if assoc.is_established:
                    assoc.release()

    def _backoff(self, delivery: Any, error: str, give_up: bool = False) -> None:
        delay = min(self.settings.retry_base_s * 2**delivery.attempts, self.settings.retry_max_s)
        self.queue.retry_later(delivery.id, error, delay, give_up=give_up)
        self._count("send_failures")
        if give_up:
            log.error("delivery of %s to %s given up: %s", delivery.sop_uid,
                      delivery.destination, error)  # fmt: skip
            return
        log.warning(
            "delivery of %s to %s failed (%s); retry in %.0f s",
            delivery.sop_uid,
            delivery.destination,
            error,
            delay,
        )

    # ---------------------------------------------------------------------------------------------

    def count(self, name: str) -> int:
        """One of the service's counters (:data:`COUNTERS`), as ``/metrics`` shows it."""
        return int(self.registry.get_sample_value(f"shiftguard_edge_{name}_total") or 0)

    def health(self) -> dict[str, int]:
        """What ``/healthz`` serves: the work queue's counts."""
        return self.queue.counts()

    @property
    def http_port(self) -> int:
        return self._http.port if self._http is not None else self.settings.http_port

    def start(self) -> None:
        recovered = self.queue.recover()
        if recovered:
            log.info("resuming %d studies interrupted by the last shutdown", recovered)
        self._http = Endpoint(
            self.settings.http_host,
            self.settings.http_port,
            "edge.http_port",
            health=self.health,
            registry=self.registry,
            name="edge",
        )
        if self.prefetch is not None:
            self.prefetch.start()
        threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
        try:
            with listening(self.settings.host, self.settings.port, "edge.port"):
                self.receiver.start()
        except BaseException:
            self._http.stop()
            self._http = None
            if self.prefetch is not None:
                self.prefetch.stop()
            raise
        self._http.start()
        targets = [self._stability] + [self._worker] * self.settings.workers
        self._threads = [threading.Thread(target=t, daemon=True) for t in targets]
        self._threads += [
            threading.Thread(target=self._sender, args=(d,), daemon=True)
            for d in self.settings.destinations
        ]
        if self.registry_client is not None:
            self._threads.append(threading.Thread(target=self._follower, daemon=True))
        for thread in self._threads:
            thread.start()
        if self.shipper is not None:
            self.shipper.start()
        self._work.set()

    def stop(self) -> None:
        """Stop serving and close the stores (a second call does nothing)."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._work.set()
        self.receiver.stop()
        if self.prefetch is not None:
            self.prefetch.stop()
        if self._http is not None:
            self._http.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        if self.shipper is not None:
            self.shipper.stop()
        self.spool.close()
        self.queue.close()
