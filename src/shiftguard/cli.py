"""The ``shiftguard`` command: a thin layer over the functions the DVC stages call.

Every command that takes configuration composes ``conf/`` with Hydra and accepts Hydra overrides with
full keys, the same ones ``dvc exp run -S`` takes::

    shiftguard cohort generate cohort.n_subjects=40 --out data
    shiftguard ingest /path/to/dicom --out artifacts/ingest ingest.spacing=[1.5,1.5,1.5]
    shiftguard config dump            # regenerate params.yaml from conf/
    shiftguard config check           # exit 1 when params.yaml is out of date
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shiftguard import __version__
from shiftguard.errors import (
    BundleError,
    ConfigError,
    DataSourceError,
    DiagnosisFileError,
    EmptyInputError,
    IngestInputError,
    InputError,
    KeyFileError,
    PacsError,
    ShiftGuardError,
    listening,
)

log = logging.getLogger("shiftguard")


def _cohort_generate(args: argparse.Namespace) -> int:
    from shiftguard.cohort import generate
    from shiftguard.config import CohortConfig, compose_section

    cfg = compose_section("cohort", CohortConfig, args.overrides)
    generate.run(cfg, args.out, workers=args.workers, progress=not args.quiet)  # logs its counts
    return 0


def _ingest(args: argparse.Namespace) -> int:
    import os

    from shiftguard.config import DataConfig, IngestConfig, compose_section
    from shiftguard.data import ingest
    from shiftguard.data.identifiers import pseudonymizer

    cfg = compose_section("ingest", IngestConfig, args.overrides)
    data = compose_section("data", DataConfig, args.overrides)
    ids = pseudonymizer(data.name, data.identifiers, data.key_id)
    if args.input.is_dir() and not any(files for _, _, files in os.walk(args.input)):
        raise IngestInputError(
            f"ingest: {args.input} holds no files (no DICOM to read); pass the root of the "
            "DICOM tree"
        )
    summary = ingest.run(
        cfg, args.input, args.out, workers=args.workers, progress=not args.quiet, identifiers=ids
    )
    log.info(
        "ingest: %d series accepted, %d rejected, %d files quarantined; see %s",
        summary.series_accepted,
        summary.series_rejected,
        summary.files_quarantined,
        args.out / "quarantine.csv",
    )
    return 0


def _data_init(args: argparse.Namespace) -> int:
    from shiftguard.config import (
        DataConfig,
        IngestConfig,
        compose_section,
        find_conf_dir,
        write_params,
    )
    from shiftguard.data import source
    from shiftguard.data.identifiers import generate_key, key_path

    conf = find_conf_dir()
    root = conf.parent
    name = args.name or re.sub(r"[^A-Za-z0-9_.-]+", "_", args.dicom.resolve().name) or "site"
    target = conf / "data" / f"{name}.yaml"
    if target.exists() and not args.force:
        raise DataSourceError(
            f"{target} exists: pass --name for another source, or --force to replace it"
        )
    inventory = source.inspect_dicom(args.dicom, progress=not args.quiet)
    rows = source.inspect_labels(args.labels)
    phi = source.phi_fields(args.dicom)
    fixed: dict[str, object] = {"key": args.key, "finding": args.finding,
                                "positive": args.positive, "negative": args.negative}  # fmt: skip
    for item in args.column:
        field, _, column = item.partition("=")
        fixed[field.strip()] = column.strip()
    min_slices = compose_section("ingest", IngestConfig).min_slices
    proposal = source.propose(inventory, rows, fixed, min_slices)
    external = _external_option(args)
    if args.keep_identifiers:
        identifiers, key_id = "keep", None
    else:
        _, key_id = generate_key(name)
        identifiers = "pseudonymize"
    dvc_file = None if args.no_dvc else source.dvc_file_for(root, args.dicom)
    labels = source.data_path(root, args.labels)
    cfg = DataConfig(
        name=name,
        dicom=source.data_path(root, args.dicom),
        labels=labels,
        ground_truth=labels,
        dvc_file=dvc_file,
        key=proposal.key,
        columns=proposal.columns,
        positive=proposal.positive,
        negative=proposal.negative,
        identifiers=identifiers,
        key_id=key_id,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source.render_config(cfg, inventory, proposal, external), encoding="utf-8")
    config_yaml = conf / "config.yaml"
    text = config_yaml.read_text(encoding="utf-8")
    config_yaml.write_text(
        re.sub(r"(?m)^(\s*- data: ).*$", rf"\g<1>{name}", text), encoding="utf-8"
    )
    write_params(root / "params.yaml", conf_dir=conf)
    if not args.no_dvc:  # after params.yaml: DVC reads dvc.yaml, whose paths come from it
        source.register(root, args.dicom)
        source.register(root, args.labels)

    mapped = ", ".join(f"{k}={v!r}" for k, v in cfg.columns.model_dump(exclude_none=True).items())
    counts = proposal.counts
    print(f"data source {name!r}: {target.relative_to(root)} (now the default in conf/config.yaml)")
    print(f"  export: {inventory.files} files, {len(inventory.studies)} studies, "
          f"{inventory.series} series, {inventory.patients} patients")  # fmt: skip
    print(f"  labels: {len(rows)} rows; columns {source.label_join.columns_of(rows)}")
    print(f"  mapping: key {cfg.key}; {mapped}; positive {cfg.positive}, negative {cfg.negative}")
    print(f"  trial join: {counts['labelled']} studies labelled, {counts['unlabelled']} unlabelled, "
          f"{counts['label_without_study']} label rows without a study, "
          f"{counts['duplicate_label']} duplicates, {counts['conflicting_labels']} conflicting, "
          f"{counts['unreadable_finding']} unreadable findings")  # fmt: skip
    for note in proposal.notes:
        print(f"  note: {note}")
    if phi:
        named = ", ".join(f"{dict(source.PHI_KEYWORDS)[k]} ({k})" for k in phi)
        print(f"  warning: the export is not de-identified: sampled files hold {named}.")
        if identifiers == "pseudonymize":
            print(f"    ShiftGuard writes only pseudonyms, months and capped ages (key {key_path(name)};"
                  " keep it with the data). The DICOM itself stays as it is.")  # fmt: skip
        else:
            print(
                "    --keep-identifiers was given: these reach the manifest and reports as they are."
            )
    if external is None:
        models = ", ".join(f"{v} ({n})" for v, n in inventory.fields["model"].most_common(6))
        print(f"  no external test set chosen: add --external scanner_model=... (scanners: {models})"
              " or --external-dates FROM:TO, or set split.external in the file")  # fmt: skip
    print("  tracked by DVC: " + (dvc_file or "outside the project: a dependency where it is"
                                  if not args.no_dvc else "not (--no-dvc)"))  # fmt: skip
    print("next: dvc repro   (then reports/split/labels.csv says what joined and what did not)")
    return 0


def _external_option(args: argparse.Namespace) -> dict[str, object] | None:
    external: dict[str, object] = {}
    if args.external:
        column, sep, values = args.external.partition("=")
        if not sep or not column.strip() or not values.strip():
            raise DataSourceError(
                f"--external {args.external!r}: write it as FIELD=VALUE[,VALUE...], "
                "e.g. scanner_model=Achieva or site=North"
            )
        external["column"] = column.strip()
        external["values"] = [v.strip() for v in values.split(",") if v.strip()]
    if args.external_dates:
        start, sep, end = args.external_dates.partition(":")
        if not sep:
            raise DataSourceError(
                f"--external-dates {args.external_dates!r}: write it as FROM:TO (either may be "
                "empty), e.g. 2022-01-01: for every study from 2022 on"
            )
        if start.strip():
            external["date_from"] = start.strip()
        if end.strip():
            external["date_to"] = end.strip()
    if not external:
        return None
    from shiftguard.config.schema import ExternalSelector

    try:
        ExternalSelector.model_validate(external)
    except ValueError as err:
        raise DataSourceError(f"--external: {err}") from None
    return external


def _data_lookup(args: argparse.Namespace) -> int:
    from shiftguard.config import DataConfig, compose_section
    from shiftguard.data.identifiers import pseudonymizer
    from shiftguard.dicom.scan import list_files, scan_files

    tokens = [a for a in args.pseudonyms if "=" not in a]  # KEY=VALUE: config overrides
    data = compose_section("data", DataConfig, [a for a in args.pseudonyms if "=" in a])
    ids = pseudonymizer(data.name, data.identifiers, data.key_id)
    wanted = set(tokens)
    found: dict[str, set[str]] = {}
    root = Path(data.dicom)
    if not root.exists():
        raise DataSourceError(f"data.dicom {root}: no such folder (run from the project root)")
    files = list_files(root)
    for path in files:
        rel = Path(os.path.relpath(path, root)).as_posix()
        if ids.path(rel) in wanted:
            found.setdefault(ids.path(rel), set()).add(f"file {rel}")
    for start in range(0, len(files), 256):
        headers, _ = scan_files(files[start : start + 256])
        for h in headers:
            for token, text in ((ids.patient(h.patient_id), f"PatientID {h.patient_id}"),
                                (ids.accession(h.accession_number),
                                 f"AccessionNumber {h.accession_number}")):  # fmt: skip
                if token in wanted:
                    found.setdefault(token, set()).add(text)
    for token in tokens:
        print(
            f"{token}: {'; '.join(sorted(found.get(token, set()))) or 'not found in ' + str(root)}"
        )
    return 0 if set(found) == wanted else 1


def _split(args: argparse.Namespace) -> int:
    from shiftguard.config import DataConfig, SplitConfig, compose_section
    from shiftguard.data import split
    from shiftguard.data.identifiers import pseudonymizer

    cfg = compose_section("split", SplitConfig, args.overrides)
    data = compose_section("data", DataConfig, args.overrides)
    if args.labels is not None:
        data = data.model_copy(update={"labels": str(args.labels)})
    ids = pseudonymizer(data.name, data.identifiers, data.key_id)
    quarantine = args.manifest.parent / "quarantine.csv"
    summary, _ = split.run(
        cfg,
        data,
        args.manifest,
        args.out,
        args.report,
        quarantine if quarantine.is_file() else None,
        ids,
    )
    log.info("split: series per split %s; labels report %s", summary.series, args.report)
    return 0


def _train(args: argparse.Namespace) -> int:
    from shiftguard.config import AugmentConfig, ModelConfig, TrainConfig, compose, validate
    from shiftguard.training import stage
    from shiftguard.utils import write_json

    config = compose(args.overrides)
    summary = stage.run(
        validate("train", config.get("train"), TrainConfig),
        validate("model", config.get("model"), ModelConfig),
        validate("augment", config.get("augment"), AugmentConfig),
        args.dataset,
        args.ingest,
        args.out,
        params=config,
        track=not args.no_track,
        resume=args.resume,
        device=args.device,
    )
    if summary.main_process:
        write_json(args.out / "metrics.json", summary.to_metrics())
        log.info(
            "train: best val AUROC %.3f at epoch %d",
            summary.fit.best_val_auroc,
            summary.fit.best_epoch,
        )
    return 0


def _validate(args: argparse.Namespace) -> int:
    from shiftguard.config import EvaluateConfig, compose, validate
    from shiftguard.evaluation import validate as validation
    from shiftguard.utils import write_json

    config = compose(args.overrides)
    cfg = validate("evaluate", config.get("evaluate"), EvaluateConfig)
    augment = None if args.no_robustness else args.augment
    result = validation.run(
        cfg,
        args.model,
        args.dataset,
        args.ingest,
        augment,
        args.out,
        params=config,
        track=not args.no_track,
        external_sets=[(Path(a), Path(b)) for a, b in args.external_set],
    )
    write_json(args.out / "metrics.json", result.to_metrics())
    return 0


def _experiment_power(args: argparse.Namespace) -> int:
    from shiftguard.experiment.design import class_counts, design_table

    rows = design_table(
        class_counts(args.dataset, split=args.split, by=args.by),
        delta=args.delta,
        auroc=args.auroc,
        correlations=args.correlation,
        power=args.power,
        alpha=args.alpha,
    )
    rs = args.correlation
    print(
        f"paired test of two arms on each {args.split} set: AUROC {args.auroc:.2f} against "
        f"{args.auroc + args.delta:.2f} (difference {args.delta}), two-sided alpha {args.alpha}; "
        f"r = correlation of the two AUROC estimates"
    )
    header = f"{args.by:<24} {'pos':>5} {'neg':>5} " + " ".join(
        f"{f'power r={r:g}':>12}" for r in rs
    )
    header += " " + " ".join(f"{f'n for {args.power:g} r={r:g}':>16}" for r in rs)
    print(header)
    for row in rows:
        line = f"{row.group:<24} {row.n_positive:>5} {row.n_negative:>5} "
        line += " ".join(f"{row.power[r]:>12.2f}" for r in rs)
        line += " " + " ".join(f"{row.cases_needed[r]:>16,}" for r in rs)
        print(line)
    return 0


def _experiment_prepare(args: argparse.Namespace) -> int:
    from shiftguard.config import compose, validate
    from shiftguard.config.schema import DesignConfig, TrainConfig
    from shiftguard.experiment.prepare import prepare

    config = compose([f"+design={args.design}"])
    design = validate("design", config.get("design"), DesignConfig)
    train = validate("train", config.get("train"), TrainConfig)
    for s in prepare(design, workers=args.workers, progress=not args.quiet, train=train):
        state = f"built in {s.seconds / 60:.1f} min" if s.built else "already there"
        if s.inputs is not None:
            state += f"; network inputs {s.inputs.name}"
        log.info(
            "experiment %s: %s set %s in %s (%s)", design.name, s.role, s.cohort, s.folder, state
        )
    return 0


def _experiment_report(args: argparse.Namespace) -> int:
    from shiftguard.experiment.report import run

    result = run(args.runs, args.out, tracking=not args.no_track)
    print((args.out / "table.md").read_text())
    log.info("experiment report of %d runs written to %s", len(result.cells), args.out)
    return 0


def _compare_experiment() -> int:
    from mlflow.tracking import MlflowClient

    from shiftguard.tracking import tracking_uri
    from shiftguard.tracking.compare import experiment_table

    found = experiment_table(MlflowClient(tracking_uri()))
    if found is None:
        log.warning(
            "no augmentation experiment in %s yet: run `make experiment` first", tracking_uri()
        )
        return 1
    run_id, text = found
    print(f"MLflow run {run_id} (the latest `experiment` run)\n")
    print(text)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from shiftguard.tracking import tracking_uri
    from shiftguard.tracking.compare import validation_table

    if args.experiment:
        return _compare_experiment()
    table = validation_table(MlflowClient(tracking_uri()))
    if table.empty:
        log.warning(
            "no validated model in %s yet: run `dvc repro` (or `make demo`) first", tracking_uri()
        )
        return 1
    columns = [
        "dvc_exp",
        "augment",
        "test_auroc",
        "test_auroc_low",
        "test_auroc_high",
        "external_auroc",
        "external_auroc_low",
        "external_auroc_high",
        "robustness_auroc_drop",
    ]
    shown = table.head(args.last)[columns].rename(columns=lambda c: c.replace("_auroc", ""))
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def _config_dump(args: argparse.Namespace) -> int:
    from shiftguard.config import write_params

    path = write_params(args.out, args.overrides)
    log.info("wrote %s", path)
    return 0


def _config_check(args: argparse.Namespace) -> int:
    from shiftguard.config import compose, dump_params

    expected = dump_params(compose())
    if not args.params.is_file():
        raise ConfigError(
            f"{args.params}: no such parameters file; write it with `shiftguard config dump`"
        )
    actual = args.params.read_text(encoding="utf-8")
    if actual == expected:
        print(f"{args.params} is up to date with conf/")
        return 0
    sys.stdout.writelines(
        difflib.unified_diff(
            actual.splitlines(keepends=True),
            expected.splitlines(keepends=True),
            fromfile=str(args.params),
            tofile="composed from conf/",
        )
    )
    print(f"\n{args.params} is out of date: run `shiftguard config dump`", file=sys.stderr)
    return 1


def _config_show(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from shiftguard.config import compose, validate_all

    config = compose(args.overrides)
    validate_all(config)
    if args.section is not None and args.section not in config:
        raise ConfigError(
            f"config show --section {args.section}: no such section; the sections are "
            + ", ".join(sorted(config))
        )
    print(
        OmegaConf.to_yaml(config if args.section is None else {args.section: config[args.section]})
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from shiftguard.config import ExportConfig, IngestConfig, compose, validate
    from shiftguard.export import run

    config = compose(args.overrides)
    summary = run(
        validate("export", config.get("export"), ExportConfig),
        validate("ingest", config.get("ingest"), IngestConfig),
        args.model,
        args.dataset,
        args.ingest,
        args.validation,
        args.out,
        track=not args.no_track,
    )
    log.info(
        "export: %s (version %s, %d bytes, sha256 %s); ONNX parity %.2g, preprocessing parity %.2g",
        summary.bundle,
        summary.version,
        summary.bundle_bytes,
        summary.bundle_sha256[:16],
        summary.onnx_max_abs_diff,
        summary.preprocessing_max_abs_diff,
    )
    return 0


def _trust(args: argparse.Namespace) -> Any:
    """The keys a bundle opened by this command may be signed by (``--trusted-key``, the
    environment, ``--allow-unsigned``)."""
    from shiftguard.edge.signing import Trust

    return Trust(keys=[str(k) for k in args.trusted_key], allow_unsigned=args.allow_unsigned)


def _edge_verify(args: argparse.Namespace) -> int:
    from shiftguard.edge.bundle import describe, open_bundle

    print(describe(open_bundle(args.bundle, _trust(args))))
    return 0


def _keys_generate(args: argparse.Namespace) -> int:
    import shutil

    from shiftguard.edge.signing import (
        DEVELOPMENT,
        development_key_path,
        generate,
        read_signing_key,
        trust_dir,
    )

    if args.development:
        folder, name = development_key_path().parent, DEVELOPMENT
        kept = (folder / f"{name}.key").is_file() and not args.overwrite
        if not kept:
            generate(folder, name, overwrite=args.overwrite)
        trust_dir().mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / f"{name}.pub", trust_dir() / f"{name}.pub")
        key = read_signing_key(folder / f"{name}.key")
        log.info(
            "keys: development key %s (id %s, %s), trusted on this machine via %s; for development "
            "only: a site trusts its lab's release key instead",
            key.path,
            key.key_id,
            "kept" if kept else "new",
            trust_dir() / f"{name}.pub",
        )
        return 0
    if args.out is None:
        raise KeyFileError("shiftguard keys generate: give --out FOLDER, or --development")
    if args.out.exists() and not args.out.is_dir():
        raise KeyFileError(f"keys generate --out {args.out}: not a folder (it is a file)")
    try:
        private, public = generate(args.out, args.name, overwrite=args.overwrite)
    except FileExistsError as exc:
        raise KeyFileError(str(exc)) from None
    key = read_signing_key(private)
    print(f"private key {private} (keep it secret, never in git)")
    print(f"public key  {public} (give it to sites: trusted_keys)")
    print(f"key id      {key.key_id}")
    return 0


def _edge_predict(args: argparse.Namespace) -> int:
    from shiftguard.edge.bundle import open_bundle
    from shiftguard.edge.predict import Predictor

    predictor = Predictor(
        open_bundle(args.bundle, _trust(args)), shadow=args.shadow, providers=args.providers
    )
    if bool(args.dicomweb) == bool(args.dicom):
        raise InputError(
            "edge predict: give DICOM folder(s) or --dicomweb URL --study UID, not both"
        )
    if args.dicomweb and not args.study:
        raise InputError("edge predict: --dicomweb needs the --study UID(s) to fetch")
    with tempfile.TemporaryDirectory(prefix="shiftguard-dicomweb-") as fetched:
        if args.dicomweb:
            from shiftguard.edge.dicomweb import client_for, fetch_study

            client = client_for(
                args.dicomweb, args.token_env, args.ca, args.cert, args.key, "--dicomweb"
            )
            args.dicom = []
            for uid in args.study:
                folder = Path(fetched) / uid
                fetch_study(client, uid, folder)
                args.dicom.append(folder)
        summary = predictor.predict_folder(args.dicom, args.out)
    for row in summary.results:
        log.info(
            "%s %s: %s (probability %.3f, threshold %.3f)",
            row["series_key"],
            row["series_description"],
            row["result"],
            row["probability"],
            row["threshold"],
        )
    log.info(
        "edge predict: %d series predicted, %d skipped (see %s) in %.2f s; results in %s",
        summary.n_predicted,
        len(summary.skipped),
        args.out / "skipped.csv",
        summary.seconds,
        args.out / "results.csv",
    )
    if summary.n_predicted == 0:
        folders = ", ".join(map(str, args.dicom))
        why = (
            f"{len(summary.skipped)} file(s) or series skipped, each with its reason in "
            f"{args.out / 'skipped.csv'}"
            if summary.skipped
            else "no files at all"
        )
        raise EmptyInputError(f"edge predict: no series predicted in {folders}: {why}")
    return 0


def _edge_site(args: argparse.Namespace) -> Any:
    """The ``edge`` settings: a site file (``--config``, no conf/ tree needed) or conf/edge/."""
    from shiftguard.config import EdgeConfig, compose_section

    if args.config is not None:
        from shiftguard.config.site import load_site_config

        return load_site_config(args.config, args.overrides)
    return compose_section("edge", EdgeConfig, args.overrides)


def _edge_check(args: argparse.Namespace) -> int:
    from shiftguard.edge.check import check_destinations

    if args.timeout <= 0:
        raise ConfigError(f"edge check --timeout {args.timeout}: must be more than 0 seconds")
    cfg = _edge_site(args)
    if not cfg.destinations:
        print("no destinations configured (edge.destinations is empty)")
        return 0
    reaches = check_destinations(cfg, args.timeout)
    width = max(len(r.name) for r in reaches)
    for r in reaches:
        print(
            f"{'ok  ' if r.ok else 'FAIL'} {r.name:<{width}} {r.kind:<8} {r.role:<8} "
            f"{1000 * r.seconds:6.0f} ms  {r.detail}"
        )
    failed = [r.name for r in reaches if not r.ok]
    if failed:
        log.error("edge check: cannot reach %s", ", ".join(failed))
        return 1
    return 0


def _edge_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from shiftguard.edge.service import Service

    cfg = _edge_site(args)
    service = Service(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    service.start()
    log.info(
        "edge serve: %s:%d (AE %s), %s mode, metrics on http://%s:%d/metrics",
        service.settings.host,
        service.receiver.port,
        service.settings.ae_title,
        "shadow" if service.settings.shadow else "clinical",
        service.settings.http_host,
        service.http_port,
    )
    stop.wait()
    service.stop()
    return 0


def _edge_config(args: argparse.Namespace) -> int:
    from shiftguard.config.site import site_config_template

    text = site_config_template()
    if args.out is not None and args.out.is_dir():
        raise ConfigError(f"edge config --out {args.out}: is a folder; name the site file to write")
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
        log.info("wrote %s; edit it, then: shiftguard edge serve --config %s", args.out, args.out)
    return 0


def _monitor_config(args: argparse.Namespace) -> Any:
    from shiftguard.config import MonitorConfig, compose_section

    return compose_section("monitor", MonitorConfig, args.overrides)


def _monitor_collect(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading

    from shiftguard.monitor.collect import Collector, open_record_store, safe_url

    cfg = _monitor_config(args)
    token = os.environ.get(cfg.collector.token_env, "")
    if not token:
        raise ConfigError(
            f"monitor collect: set the shared token in ${cfg.collector.token_env} "
            "(the edges send the same one)"
        )
    store = open_record_store(cfg.collector.store)
    collector = Collector(
        store,
        token,
        host=cfg.collector.host,
        port=cfg.collector.port,
        max_batch=cfg.collector.max_batch,
        tls_cert=cfg.collector.tls_cert,
        tls_key=cfg.collector.tls_key,
        tls_ca=cfg.collector.tls_ca,
        rules=cfg.fleet_rules,
        webhook=cfg.webhook,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    collector.start()
    log.info(
        "monitor collect: %s (store %s, %d records)", collector.url,
        safe_url(cfg.collector.store),
        store.count(),
    )  # fmt: skip
    stop.wait()
    collector.stop()
    store.close()
    return 0


def _monitor_run(args: argparse.Namespace, check: bool) -> int:
    from shiftguard.edge.service import resolve_bundle
    from shiftguard.monitor.runner import (
        Monitor,
        bundle_info,
        records_from_results,
        reference_from_bundle,
    )

    cfg = _monitor_config(args)
    bundle_path = resolve_bundle(args.bundle)
    reference = reference_from_bundle(bundle_path)
    if args.results is not None:
        records = records_from_results(args.results, args.site or cfg.site)
    else:
        from shiftguard.monitor.collect import open_record_store

        store = open_record_store(cfg.collector.store)
        records = store.frame()
        store.close()
    monitor = Monitor(
        cfg, reference, cfg.state, cfg.workspace, cfg.reports, bundle=bundle_info(bundle_path)
    )
    try:
        judged = monitor.update(records, judge_open=args.final)
        for result in judged:
            s = result.summary()
            log.info(
                "window %s/%d (%d studies): unified drift score %.2f, %d of %d features drifted "
                "(%.0f%%)%s",
                s["site"], s["window"], s["n"], s["unified_score"], s["n_drifted"],
                len(result.columns), 100 * s["drift_share"],
                f": {', '.join(s['drifted'][:8])}{' ...' if len(s['drifted']) > 8 else ''}"
                if s["drifted"] else "",
            )  # fmt: skip
        if not judged:
            log.info("monitor: no new window to judge (%d records)", len(records))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            history = monitor.history()
            args.json.write_text(
                json.dumps(
                    {site: [w.summary() for w in ws] for site, ws in history.items()}, indent=2
                )
                + "\n"
            )
        _new, active = monitor.check(notify=check)
        for alert in active:
            log.warning("active alert: %s", alert.message())
    finally:
        monitor.close()
    log.info(
        "dashboard: evidently ui --workspace %s   (then open http://127.0.0.1:8000)", cfg.workspace
    )
    return 1 if (check and active) else 0


def _monitor_scenarios(args: argparse.Namespace) -> int:
    from shiftguard.config import CohortConfig, MonitorConfig, SplitConfig, compose, validate
    from shiftguard.edge.service import resolve_bundle
    from shiftguard.monitor.scenarios import run_all, table

    config = compose(args.overrides)
    summary = run_all(
        validate("monitor", config.get("monitor"), MonitorConfig),
        validate("cohort", config.get("cohort"), CohortConfig),
        validate("split", config.get("split"), SplitConfig),
        resolve_bundle(args.bundle),
        args.names,
        args.workers,
    )
    print(table(summary))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(r["met"] is not False for r in summary["scenarios"]) else 1


def _monitor_ui(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    cfg = _monitor_config(args)
    command = [
        "evidently", "ui", "--workspace", cfg.workspace, "--host", args.host,
        "--port", str(args.port),
    ]  # fmt: skip
    if args.print_only:
        print(" ".join(command))
        return 0
    import socket

    with listening(args.host, args.port, "monitor ui --host/--port"), socket.socket() as probe:
        probe.bind((args.host, args.port))  # the UI's server would only say so in its own log
    beside = Path(sys.executable).parent / "evidently"  # an environment not on $PATH
    program = shutil.which("evidently") or (str(beside) if beside.is_file() else None)
    if program is None:
        print(" ".join(command))
        log.warning("monitor ui: evidently is not installed; the command above starts the UI")
        return 0
    return subprocess.call([program, *command[1:]])


def _shadow_evaluate(args: argparse.Namespace) -> int:
    from shiftguard.config import ShadowConfig, compose_section
    from shiftguard.shadow.stage import evaluate_files

    cfg = compose_section("shadow", ShadowConfig, args.overrides)
    book = _pacs_book(args, cfg)
    result, report = evaluate_files(
        args.log, cfg, args.diagnoses, book, args.bundle, args.out, args.site,
        track=not args.no_mlflow,
    )  # fmt: skip
    for role, e in result.evaluations.items():
        overall = e.overall
        log.info(
            "%s %s: %d studies, %d with a verified diagnosis, %d pending; AUROC %s, "
            "%d segment(s) flagged",
            role, e.bundle, e.n_predictions, len(e.joined), e.n_pending,
            f"{overall['auroc']:.3f}" if overall else "n/a", len(e.flagged),
        )  # fmt: skip
        for _, row in e.flagged.iterrows():
            log.warning("  flagged %s=%s: %s", row["column"], row["segment"], row["flag_reason"])
    if result.paired is not None:
        auroc = result.paired.overall.set_index("metric").loc["auroc"]
        log.info(
            "challenger - champion AUROC %+.3f [%+.3f, %+.3f] on %d paired studies; "
            "%d segment(s) significantly worse",
            auroc["diff"], auroc["diff_low"], auroc["diff_high"], result.paired.n,
            len(result.paired.worse),
        )  # fmt: skip
    if report is not None:
        print(f"shadow report: {report}")
    return 0


def _pacs_book(args: argparse.Namespace, cfg: Any) -> Any:
    """A diagnosis book holding the PACS's verified reports when a PACS is named (``--pacs`` or
    ``shadow.pacs.address``); empty otherwise, for ``--diagnoses`` files.

    Raises:
        DiagnosisFileError: neither ``--diagnoses`` nor a PACS is given.
    """
    from shiftguard.shadow.diagnoses import DiagnosisBook

    pacs = args.pacs or args.dicomweb or cfg.pacs.address or cfg.pacs.dicomweb
    if not args.diagnoses and not pacs:
        raise DiagnosisFileError(
            f"shadow {args.action}: give --diagnoses FILE(s) and/or --pacs or --dicomweb (or "
            "shadow.pacs.address, shadow.pacs.dicomweb)"
        )
    book = DiagnosisBook()
    if pacs:
        book.add(*_fetch(args, cfg)[:2])
    return book


def _fetch(args: argparse.Namespace, cfg: Any) -> tuple[Any, Any, Any]:
    """Reports from the PACS (DIMSE) or a DICOMweb server: each setting from its flag, else from
    ``shadow.pacs``."""
    from shiftguard.shadow.pacs import fetch_reports, fetch_reports_dicomweb, parse_pacs

    settings = cfg.pacs.model_copy(
        update={
            name: value
            for name, value in (
                ("address", args.pacs), ("ae_title", args.ae_title),
                ("retrieve", args.retrieve), ("move_host", args.move_host),
                ("move_port", args.move_port), ("dicomweb", args.dicomweb),
                ("token_env", args.token_env), ("ca", args.ca), ("cert", args.cert),
                ("key", args.key),
            )
            if value is not None
        }
    )  # fmt: skip
    if args.dicomweb or (settings.dicomweb and not args.pacs):
        if (settings.cert is None) != (settings.key is None):
            raise PacsError(f"shadow {args.action}: --cert and --key go together")
        where = f"DICOMweb {settings.dicomweb}"
        diagnoses, problems, stats = fetch_reports_dicomweb(
            settings.dicomweb, token_env=settings.token_env, ca=settings.ca,
            cert=settings.cert, key=settings.key, since=args.since,
        )  # fmt: skip
    elif not settings.address:
        raise PacsError(
            f"shadow {args.action}: name the PACS with --pacs AET@host:port or --dicomweb URL "
            "(or shadow.pacs.address, shadow.pacs.dicomweb)"
        )
    else:
        where = f"PACS {settings.address}"
        diagnoses, problems, stats = fetch_reports(
            parse_pacs(settings.address), ae_title=settings.ae_title, retrieve=settings.retrieve,
            move_port=settings.move_port, move_host=settings.move_host, since=args.since,
        )  # fmt: skip
    log.info("%s: %s", where, stats)
    for problem in problems[:20]:
        log.warning("left out: %s", problem)
    return diagnoses, problems, stats


def _shadow_fetch(args: argparse.Namespace) -> int:
    from shiftguard.config import ShadowConfig, compose_section
    from shiftguard.shadow.diagnoses import write_diagnoses

    diagnoses, _, _ = _fetch(args, compose_section("shadow", ShadowConfig, args.overrides))
    write_diagnoses(diagnoses, args.out)
    print(f"{len(diagnoses)} verified diagnoses -> {args.out}")
    return 0


def _shadow_recalibrate(args: argparse.Namespace) -> int:
    from shiftguard.config import ShadowConfig, compose_section
    from shiftguard.edge.bundle import open_bundle
    from shiftguard.edge.service import resolve_bundle
    from shiftguard.edge.signing import SIGNING_KEY_ENV, default_signer, development_key_path
    from shiftguard.shadow.recalibrate import recalibrate, site_evidence, track, write_recalibrated

    cfg = compose_section("shadow", ShadowConfig, args.overrides)
    book = _pacs_book(args, cfg)
    for path in args.diagnoses:
        book.add_file(path)
    signer = default_signer()
    if signer is None:
        raise BundleError(
            f"shadow recalibrate: no signing key: set {SIGNING_KEY_ENV} to a private key, or "
            f"make the development key with `shiftguard keys generate --development` "
            f"({development_key_path()})"
        )
    bundle = open_bundle(resolve_bundle(args.bundle))
    evidence = site_evidence(args.log, book, bundle, args.site)
    site = args.site or "all sites in the log"
    rec = recalibrate(
        evidence, bundle, site, method=args.method, target=args.target_sensitivity,
        min_studies=args.min_studies, min_positive=args.min_positive,
    )  # fmt: skip
    path = write_recalibrated(bundle, rec, args.out, signer)
    for line in rec.lines():
        print(line)
    print(f"recalibrated bundle: {path}")
    if not args.no_mlflow:
        version = track(rec, path, bundle)
        if version is not None:
            print(f"registered as {bundle.name} version {version} (@challenger): run it in shadow "
                  "mode, then `shiftguard shadow evaluate` and `shiftguard promote`")  # fmt: skip
    return 0


def _promote(args: argparse.Namespace) -> int:
    from shiftguard.config import ShadowConfig, compose_section
    from shiftguard.shadow.promote import promote

    cfg = compose_section("shadow", ShadowConfig, args.overrides)
    decision = promote(
        args.report, cfg.gate, args.model or cfg.registered_model, args.role, args.dry_run,
        cfg.experiment, rollout=cfg.rollout,
    )  # fmt: skip
    print("\n".join(decision.lines()))
    print(f"decision recorded in MLflow run {decision.run_id}")
    return 0 if decision.passed else 1


def _collector_url(args: argparse.Namespace, cfg: Any) -> str:
    """``--collector``, else ``monitor.collector.url``, else the collector this machine runs."""
    from shiftguard.endpoint import http_url

    if args.collector:
        return str(args.collector)
    if cfg.collector.url:
        return str(cfg.collector.url)
    return http_url(cfg.collector.host, cfg.collector.port, bool(cfg.collector.tls_cert))


def _fleet_rows(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    import urllib.error

    from shiftguard.monitor.fleet import fetch_fleet
    from shiftguard.tls import client_context

    cfg = _monitor_config(args)
    url = _collector_url(args, cfg)
    context = client_context(args.ca) if url.startswith("https") else None
    try:
        return url, fetch_fleet(url, context=context)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ConfigError(
            f"fleet: the collector {url} cannot be read ({getattr(exc, 'reason', exc)}); is "
            "`shiftguard monitor collect` running there? (--collector URL)"
        ) from None


def _fleet_status(args: argparse.Namespace) -> int:
    from shiftguard.monitor.fleet import format_table

    url, fleet = _fleet_rows(args)
    if args.json:
        print(json.dumps(fleet, indent=2, sort_keys=True))
    else:
        print(f"fleet at {url} (stale after {fleet['stale_after']:g} missed heartbeats)")
        print(format_table(fleet["sites"]))
    return 1 if any(r.get("stale") for r in fleet["sites"]) else 0


def _fleet_rollout(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from shiftguard.config import ShadowConfig, compose_section
    from shiftguard.shadow.rollout import advance
    from shiftguard.tracking import set_store, tracking_uri

    cfg = compose_section("shadow", ShadowConfig, args.overrides)
    _, fleet = _fleet_rows(args)
    name = args.model or cfg.registered_model or "shiftguard-classifier"
    set_store(tracking_uri())
    try:
        step = advance(
            MlflowClient(), name, cfg.rollout, fleet["sites"], args.channel, args.dry_run
        )
    except MlflowException as exc:
        raise ConfigError(f"fleet rollout: {name}@{args.channel}: {exc.message}") from None
    print("\n".join(step.lines()))
    return 1 if step.halted else 0


def _positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number, at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, exposed for tests and shell completion."""
    parser = argparse.ArgumentParser(prog="shiftguard", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"shiftguard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. cohort.n_subjects=20")

    def workers(p: argparse.ArgumentParser) -> None:
        p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    def split_inputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dataset", type=Path, default=Path("artifacts/split/dataset.csv"))
        p.add_argument("--ingest", type=Path, default=Path("artifacts/ingest"))

    def model_inputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", type=Path, default=Path("artifacts/train/model.pt"))
        split_inputs(p)

    cohort = sub.add_parser("cohort", help="the synthetic multi-scanner DICOM cohort")
    cohort_sub = cohort.add_subparsers(dest="action", required=True)
    gen = cohort_sub.add_parser("generate", help="write the cohort (deterministic given the seed)")
    gen.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data)")
    workers(gen)
    overrides(gen)
    gen.set_defaults(func=_cohort_generate)

    ing = sub.add_parser("ingest", help="any DICOM tree -> validated canonical volumes")
    ing.add_argument("input", type=Path, help="folder of DICOM files (searched recursively)")
    ing.add_argument("--out", type=Path, default=Path("artifacts/ingest"))
    workers(ing)
    overrides(ing)
    ing.set_defaults(func=_ingest)

    data = sub.add_parser("data", help="a site's own DICOM export and labels as a data source")
    data_sub = data.add_subparsers(dest="action", required=True)
    init = data_sub.add_parser(
        "init",
        help="inspect an export and a label file, write conf/data/NAME.yaml, track both with DVC",
    )
    init.add_argument("--dicom", type=Path, required=True, help="root of the DICOM export")
    init.add_argument("--labels", type=Path, required=True, help="label file or folder of them")
    init.add_argument("--name", default=None, help="the source's name (default: the folder's)")
    init.add_argument("--key", choices=["study_uid", "accession_number", "patient_id+study_date"],
                      default=None, help="join key (default: the column that matches best)")  # fmt: skip
    init.add_argument("--finding", default=None, help="the label file's finding column")
    init.add_argument("--positive", nargs="+", default=None, help="values meaning positive")
    init.add_argument("--negative", nargs="+", default=None, help="values meaning negative")
    init.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                      help="map a field (study_uid, accession_number, patient_id, study_date, "
                      "patient_sex, patient_age, reader, reported_at) to a column")  # fmt: skip
    init.add_argument(
        "--external",
        default=None,
        metavar="FIELD=VALUE[,VALUE]",
        help="the external test set by a header field, e.g. scanner_model=Achieva",
    )
    init.add_argument(
        "--external-dates",
        default=None,
        metavar="FROM:TO",
        help="the external test set by study date (a temporal split)",
    )
    init.add_argument(
        "--keep-identifiers",
        action="store_true",
        help="write patient IDs, accession numbers and dates as they are (made-up data)",
    )
    init.add_argument("--no-dvc", action="store_true", help="do not track the data with DVC")
    init.add_argument("--force", action="store_true", help="replace conf/data/NAME.yaml")
    init.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    init.set_defaults(func=_data_init)
    look = data_sub.add_parser(
        "lookup", help="turn pseudonyms from a report (P-..., A-..., F-...) back into identifiers"
    )
    look.add_argument("pseudonyms", nargs="+", help="pseudonyms, and config overrides KEY=VALUE")
    look.set_defaults(func=_data_lookup)

    spl = sub.add_parser("split", help="patient-level split with an external test set")
    spl.add_argument("--manifest", type=Path, default=Path("artifacts/ingest/manifest.csv"))
    spl.add_argument(
        "--labels", type=Path, default=None, help="label file or folder (default: data.labels)"
    )
    spl.add_argument("--out", type=Path, default=Path("artifacts/split"))
    spl.add_argument("--report", type=Path, default=Path("reports/split/labels.csv"))
    overrides(spl)
    spl.set_defaults(func=_split)

    trn = sub.add_parser(
        "train", help="train the classifier (runs under torchrun --nproc_per_node N as DDP)"
    )
    split_inputs(trn)
    trn.add_argument("--out", type=Path, default=Path("artifacts/train"))
    trn.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    trn.add_argument("--device", choices=["cpu", "cuda"], default=None)
    trn.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    overrides(trn)
    trn.set_defaults(func=_train)

    val = sub.add_parser("validate", help="judge a trained model: test, unseen scanner, shift")
    model_inputs(val)
    val.add_argument("--augment", type=Path, default=Path("artifacts/augment"))
    val.add_argument("--no-robustness", action="store_true", help="skip the robustness sets")
    val.add_argument(
        "--external-set",
        nargs=2,
        action="append",
        type=Path,
        default=[],
        metavar=("DATASET", "INGEST"),
        help="an unseen-scanner set (cohort=external, ingested and split) judged in place of the "
        "split table's external series; repeatable",
    )
    val.add_argument("--out", type=Path, default=Path("reports/validate"))
    val.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    overrides(val)
    val.set_defaults(func=_validate)

    cmp_ = sub.add_parser("compare", help="validated models side by side, read from MLflow")
    cmp_.add_argument("--last", type=_positive, default=20, help="how many runs, newest first")
    cmp_.add_argument(
        "--experiment",
        action="store_true",
        help="the latest augmentation experiment's table (arms x unseen scanners) instead",
    )
    cmp_.set_defaults(func=_compare)

    xp = sub.add_parser("experiment", help="design and compare the augmentation experiment")
    xp_sub = xp.add_subparsers(dest="action", required=True)
    pw = xp_sub.add_parser(
        "power", help="each unseen set's power to detect an AUROC difference between two arms"
    )
    pw.add_argument("--dataset", type=Path, default=Path("artifacts/split/dataset.csv"))
    pw.add_argument("--split", default="external", help="the split whose series are counted")
    pw.add_argument("--by", default="scanner_model", help="the column that names a set")
    pw.add_argument("--delta", type=float, default=0.05, help="the AUROC difference to detect")
    pw.add_argument("--auroc", type=float, default=0.85, help="the reference arm's AUROC")
    pw.add_argument(
        "--correlation",
        type=float,
        nargs="+",
        default=[0.3, 0.5, 0.7],
        help="assumed correlations of the two arms' AUROC estimates",
    )
    pw.add_argument("--power", type=float, default=0.8)
    pw.add_argument("--alpha", type=float, default=0.05)
    pw.set_defaults(func=_experiment_power)
    prep = xp_sub.add_parser(
        "prepare",
        help="generate, ingest, split and preprocess the cohorts a design is scored on (once)",
    )
    prep.add_argument("--design", default="reduced", help="a conf/design/ choice")
    workers(prep)
    prep.set_defaults(func=_experiment_prepare)
    rep = xp_sub.add_parser(
        "report", help="compare a sweep's arms: table, figure and paired tests, into MLflow"
    )
    rep.add_argument(
        "--runs", type=Path, default=Path("artifacts/experiment/runs/reduced"),
        help="the sweep's folder (hydra.sweep.dir)",
    )  # fmt: skip
    rep.add_argument("--out", type=Path, default=Path("reports/experiment"))
    rep.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    rep.set_defaults(func=_experiment_report)

    exp = sub.add_parser("export", help="ONNX + TorchScript, parity-checked, into an edge bundle")
    model_inputs(exp)
    exp.add_argument("--validation", type=Path, default=Path("reports/validate"))
    exp.add_argument("--out", type=Path, default=Path("artifacts/export"))
    exp.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    overrides(exp)
    exp.set_defaults(func=_export)

    keys = sub.add_parser("keys", help="Ed25519 keys that sign bundles")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    gen = keys_sub.add_parser("generate", help="a new key pair: NAME.key (private) and NAME.pub")
    gen.add_argument("--out", type=Path, default=None, help="folder for the two files")
    gen.add_argument("--name", default="release", help="the key's name (file stem)")
    gen.add_argument(
        "--development",
        action="store_true",
        help="the development key export signs with by default, trusted on this machine "
        "(kept if already there; make demo runs this)",
    )
    gen.add_argument("--overwrite", action="store_true", help="replace an existing key")
    gen.set_defaults(func=_keys_generate)

    edge = sub.add_parser("edge", help="the hospital-side runner (no torch, MONAI, MLflow, DVC)")
    edge_sub = edge.add_subparsers(dest="action", required=True)

    def trust(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--trusted-key",
            type=Path,
            action="append",
            default=[],
            help="a public key (.pub) the bundle may be signed by (repeatable; besides "
            "$SHIFTGUARD_TRUSTED_KEYS, else the user's trust folder)",
        )
        p.add_argument(
            "--allow-unsigned",
            action="store_true",
            help="development only: accept an unsigned bundle or an untrusted key, with a warning",
        )

    ver = edge_sub.add_parser(
        "verify", help="check a bundle's signature and hashes and print its manifest"
    )
    ver.add_argument("bundle", type=Path)
    trust(ver)
    ver.set_defaults(func=_edge_verify)
    pred = edge_sub.add_parser("predict", help="DICOM folder(s) in, DICOM SR + key images out")
    pred.add_argument("--bundle", type=Path, required=True)
    pred.add_argument("dicom", type=Path, nargs="*", help="folder(s) of DICOM files")
    pred.add_argument(
        "--dicomweb", default=None, help="fetch the studies from this DICOMweb root instead "
        "(QIDO-RS, then WADO-RS), e.g. https://vna.example/dicom-web",
    )  # fmt: skip
    pred.add_argument("--study", nargs="+", default=[], help="with --dicomweb: StudyInstanceUIDs")
    pred.add_argument("--token-env", default=None, help="with --dicomweb: bearer token variable")
    pred.add_argument("--ca", default=None, help="with --dicomweb: CA bundle for the server")
    pred.add_argument("--cert", default=None, help="with --dicomweb: client certificate (PEM)")
    pred.add_argument("--key", default=None, help="with --dicomweb: its key (PEM)")
    pred.add_argument("--out", type=Path, required=True, help="folder for the results")
    pred.add_argument(
        "--shadow",
        action="store_true",
        help="shadow mode: results are marked not for clinical use",
    )
    pred.add_argument(
        "--providers", nargs="+", default=None, help="ONNX Runtime execution providers, best first"
    )
    trust(pred)
    pred.set_defaults(func=_edge_predict)
    srv = edge_sub.add_parser("serve", help="the DICOM service: receive, infer, route (conf/edge/)")
    srv.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a site file (see `shiftguard edge config`) instead of the project's conf/edge/",
    )
    overrides(srv)
    srv.set_defaults(func=_edge_serve)
    chk = edge_sub.add_parser(
        "check",
        help="reach each destination without leaving anything there (C-ECHO, QIDO-RS, a TCP or "
        "TLS connection, FHIR metadata): exit 1 when one cannot be reached",
    )
    chk.add_argument("--config", type=Path, default=None, help="a site file, as for serve")
    chk.add_argument("--timeout", type=float, default=10.0, help="seconds per destination")
    overrides(chk)
    chk.set_defaults(func=_edge_check)
    template = edge_sub.add_parser(
        "config", help="print an annotated site file for `edge serve --config` (the defaults)"
    )
    template.add_argument("--out", type=Path, default=None, help="write it here instead")
    template.set_defaults(func=_edge_config)

    mon = sub.add_parser("monitor", help="drift of live studies: collect, report, check, ui")
    mon_sub = mon.add_subparsers(dest="action", required=True)
    col = mon_sub.add_parser("collect", help="the collector service the edges ship records to")
    overrides(col)
    col.set_defaults(func=_monitor_collect)
    for name, helptext, is_check in (
        ("report", "judge new windows: Evidently snapshots, dashboard, HTML", False),
        ("check", "report, then evaluate the alert rules: exit 1 on an active alert", True),
    ):
        cmd = mon_sub.add_parser(name, help=helptext)
        cmd.add_argument("--bundle", default="artifacts/export", help="the reference's bundle")
        cmd.add_argument(
            "--results", type=Path, default=None,
            help="an `edge predict` results.csv instead of the collector's store",
        )  # fmt: skip
        cmd.add_argument("--site", default=None, help="site name for --results records")
        cmd.add_argument(
            "--final", action="store_true", help="judge each site's open (incomplete) window too"
        )
        cmd.add_argument("--json", type=Path, default=None, help="write every window's summary")
        overrides(cmd)
        cmd.set_defaults(func=lambda a, c=is_check: _monitor_run(a, c))
    scn = mon_sub.add_parser(
        "scenarios", help="simulated drift scenarios: detection delay and false alarms (conf/)"
    )
    scn.add_argument("--names", nargs="*", default=[], help="run only these scenarios")
    scn.add_argument("--bundle", default="artifacts/export")
    scn.add_argument("--json", type=Path, default=None, help="write the results here")
    scn.add_argument("--workers", type=int, default=None, help="cohort generator processes")
    overrides(scn)
    scn.set_defaults(func=_monitor_scenarios)
    ui = mon_sub.add_parser("ui", help="open the Evidently UI on the monitor's workspace")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=8000)
    ui.add_argument("--print-only", action="store_true", help="print the command instead")
    overrides(ui)
    ui.set_defaults(func=_monitor_ui)

    def pacs(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--pacs", default=None, help="query this PACS: AET@host:port (shadow.pacs.address)"
        )
        p.add_argument(
            "--ae-title", default=None, help="our AE title at the PACS (shadow.pacs.ae_title)"
        )
        p.add_argument("--retrieve", choices=("move", "get"), default=None,
                       help="how reports come back (shadow.pacs.retrieve; default move)")  # fmt: skip
        p.add_argument(
            "--move-host", default=None,
            help="C-MOVE: the address we receive on, the one the PACS has for our AE "
            "(shadow.pacs.move_host; default 127.0.0.1, 0.0.0.0 for every interface)",
        )  # fmt: skip
        p.add_argument(
            "--move-port", type=int, default=None,
            help="C-MOVE: the port we receive on, the one the PACS has for our AE "
            "(shadow.pacs.move_port)",
        )  # fmt: skip
        p.add_argument(
            "--dicomweb", default=None,
            help="instead of --pacs: a DICOMweb service root, reports by QIDO-RS and WADO-RS "
            "(shadow.pacs.dicomweb)",
        )  # fmt: skip
        p.add_argument("--token-env", default=None,
                       help="DICOMweb: environment variable holding a bearer token")  # fmt: skip
        p.add_argument("--ca", default=None, help="DICOMweb: CA bundle to check the server with")
        p.add_argument("--cert", default=None, help="DICOMweb: client certificate (PEM)")
        p.add_argument("--key", default=None, help="DICOMweb: its private key (PEM)")
        p.add_argument("--since", default=None, help="only studies from this date (YYYYMMDD)")

    sha = sub.add_parser("shadow", help="shadow predictions against verified diagnoses")
    sha_sub = sha.add_subparsers(dest="action", required=True)
    ev = sha_sub.add_parser(
        "evaluate", help="per-segment figures, champion vs challenger, HTML report, MLflow run"
    )
    ev.add_argument("--log", type=Path, required=True, help="the edge's queue.db or results.csv")
    ev.add_argument(
        "--diagnoses", type=Path, nargs="*", default=[],
        help="RIS exports (CSV or JSON lines), in any number and order",
    )  # fmt: skip
    ev.add_argument(
        "--bundle", nargs="*", default=[],
        help="the bundles the roles ran (for their validation figures)",
    )  # fmt: skip
    ev.add_argument("--out", type=Path, default=Path("reports/shadow"), help="report folder")
    ev.add_argument("--site", default=None, help="site for rows whose header names none")
    ev.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    pacs(ev)
    overrides(ev)
    ev.set_defaults(func=_shadow_evaluate)
    rc = sha_sub.add_parser(
        "recalibrate",
        help="a site-specific calibration and threshold from verified shadow studies, as a new "
        "signed bundle for the promotion gate",
    )
    rc.add_argument("--log", type=Path, required=True, help="the edge's queue.db or results.csv")
    rc.add_argument("--diagnoses", type=Path, nargs="*", default=[],
                    help="RIS exports (CSV or JSON lines)")  # fmt: skip
    rc.add_argument("--bundle", required=True, help="the bundle the site ran (file or folder)")
    rc.add_argument("--site", default=None, help="only this site's studies (default: all)")
    rc.add_argument("--out", type=Path, default=Path("artifacts/recalibrated"),
                    help="folder for the new bundle")  # fmt: skip
    rc.add_argument("--method", choices=["platt", "temperature", "isotonic"], default="platt")
    rc.add_argument("--target-sensitivity", type=float, default=None,
                    help="default: the bundle's held-out reference sensitivity")  # fmt: skip
    rc.add_argument("--min-studies", type=_positive, default=100,
                    help="verified studies needed (default 100)")  # fmt: skip
    rc.add_argument("--min-positive", type=_positive, default=20,
                    help="of each class (default 20)")  # fmt: skip
    rc.add_argument("--no-mlflow", action="store_true", help="do not log or register it")
    pacs(rc)
    overrides(rc)
    rc.set_defaults(func=_shadow_recalibrate)
    fetch = sha_sub.add_parser("fetch", help="verified reports from the PACS -> JSON lines")
    pacs(fetch)
    fetch.add_argument("--out", type=Path, required=True)
    overrides(fetch)
    fetch.set_defaults(func=_shadow_fetch)
    pro = sub.add_parser(
        "promote", help="move the MLflow alias champion to a challenger that passes the gate"
    )
    pro.add_argument("--report", type=Path, default=Path("reports/shadow"),
                     help="a `shadow evaluate` report folder")  # fmt: skip
    pro.add_argument("--role", default=None, help="the role judged (default: the challenger)")
    pro.add_argument("--model", default=None, help="registered model (default: the bundle's)")
    pro.add_argument("--dry-run", action="store_true", help="judge and record, move nothing")
    overrides(pro)
    pro.set_defaults(func=_promote)

    fleet = sub.add_parser("fleet", help="the sites: their bundles and heartbeats, the rollout")
    fleet_sub = fleet.add_subparsers(dest="action", required=True)
    for verb, text in (
        ("status", "each site's bundle, state, queue and last heartbeat (exit 1: a site is stale)"),
        ("rollout", "record each site's state, halt on a rollback, open the next wave"),
    ):
        f = fleet_sub.add_parser(verb, help=text)
        f.add_argument("--collector", default=None,
                       help="the collector's URL (monitor.collector.url, else this machine's)")  # fmt: skip
        f.add_argument("--ca", default=None, help="CA bundle of the collector's certificate")
        if verb == "status":
            f.add_argument("--json", action="store_true", help="the fleet as JSON")
            f.set_defaults(func=_fleet_status)
        else:
            f.add_argument("--model", default=None,
                           help="registered model (shadow.registered_model, else the bundle's)")  # fmt: skip
            f.add_argument("--channel", default="champion", help="the alias rolled out")
            f.add_argument("--dry-run", action="store_true", help="judge, record nothing")
            f.set_defaults(func=_fleet_rollout)
        overrides(f)

    config = sub.add_parser("config", help="compose conf/ and manage params.yaml")
    config_sub = config.add_subparsers(dest="action", required=True)
    dump = config_sub.add_parser("dump", help="write the composed config to params.yaml")
    dump.add_argument("--out", type=Path, default=Path("params.yaml"))
    overrides(dump)
    dump.set_defaults(func=_config_dump)
    check = config_sub.add_parser("check", help="exit 1 when params.yaml differs from conf/")
    check.add_argument("--params", type=Path, default=Path("params.yaml"))
    check.set_defaults(func=_config_check)
    show = config_sub.add_parser("show", help="print the composed config or one section")
    show.add_argument("--section", default=None)
    overrides(show)
    show.set_defaults(func=_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input, with the reason on stderr)."""
    from shiftguard.utils import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args))
    except ShiftGuardError as exc:
        print(f"shiftguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        if exc.filename is None:  # not about a path: a bug, keep the traceback
            raise
        problem = {
            FileNotFoundError: "no such file or folder",
            IsADirectoryError: "is a folder, a file was expected",
            NotADirectoryError: "is not a folder",
            PermissionError: "permission denied",
        }[type(exc)]
        print(f"shiftguard {args.command}: error: {exc.filename}: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
