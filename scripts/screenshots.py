"""Screenshots of what people read after ``make demo``, taken with headless Chromium.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots]

Pages, each checked for the text it must show before its screenshot is kept:

- ``mlflow-model-version.png``: the registered model version of ``artifacts/train/model.pt`` in the
  MLflow UI (``mlflow ui`` on the demo's store, started here on a free loopback port);
- ``mlflow-runs.png``: the experiment's runs list;
- ``evidently-dashboard.png``: the drift dashboard (``evidently ui`` on
  ``artifacts/monitor/workspace``);
- ``drift-report.png``: ``reports/monitor/drift.html``;
- ``shadow-report.png``: ``reports/shadow/report.html``;
- ``dvc-plots.png``: ``dvc plots show`` rendered into a temporary folder, which must load no script
  from the network (the page is opened with networking cut off).

Exit status 0 when every page rendered and showed its text, 1 otherwise (each failure named), 2 when
a prerequisite is missing (no Chromium, no demo outputs). Servers listen on 127.0.0.1 only and are
stopped on exit. Chromium is a system package (``scripts/setup.sh`` installs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
#: the browser's names on Debian/Ubuntu and elsewhere, first found wins
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDTH = 1600


@dataclass(frozen=True)
class Page:
    """One screenshot: what to open, the file to write and the text the page must show."""

    name: str
    url: str
    expect: tuple[str, ...]
    height: int = 1200
    offline: bool = False


class MissingError(Exception):
    """A prerequisite (a browser, a demo output) is not there."""


def browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    raise MissingError(
        f"no Chromium found (tried {', '.join(BROWSERS)}); scripts/setup.sh installs it"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server(argv: Sequence[str], url: str, log: Path, timeout: float = 120.0) -> Iterator[None]:
    """Run ``argv`` until the block ends; wait until ``url`` answers 200 first."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    tail = log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{argv[0]} exited with {proc.returncode}:\n{tail}")
                try:
                    with urllib.request.urlopen(url, timeout=5) as answer:
                        if answer.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} did not answer {url} within {timeout:.0f} s")
                time.sleep(0.5)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def chromium(exe: str, page: Page, *args: str) -> list[str]:
    argv = [
        exe,
        "--headless=new",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-dev-shm-usage",
        # without it, headless frames may skip sticky elements (MLflow's table headers)
        "--run-all-compositor-stages-before-draw",
        # charts draw at once instead of animating (a shot mid-animation misses points)
        "--force-prefers-reduced-motion",
        f"--window-size={WIDTH},{page.height}",
        "--virtual-time-budget=20000",
        *args,
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--no-sandbox")  # Chromium refuses to run its sandbox as root
    if page.offline:
        # every request but the local file's fails: a page that needs the network shows it
        argv.append("--host-resolver-rules=MAP * ~NOTFOUND")
    return [*argv, page.url]


def shoot(exe: str, page: Page, out: Path, profile: Path) -> list[str]:
    """The page's problems (empty when its screenshot was written and it shows its text)."""
    common = (f"--user-data-dir={profile}",)
    dom = subprocess.run(
        chromium(exe, page, *common, "--dump-dom"), capture_output=True, text=True, timeout=180
    )
    text = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", dom.stdout)  # shown text only
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))
    problems = [
        f"{page.name}: the page does not show {want!r}" for want in page.expect if want not in text
    ]
    target = out / f"{page.name}.png"
    target.unlink(missing_ok=True)
    shot = subprocess.run(
        chromium(exe, page, *common, f"--screenshot={target}"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    if shot.returncode != 0 or not target.is_file():
        problems.append(f"{page.name}: no screenshot ({shot.stderr.strip()[-300:]})")
    return problems


def registered_version() -> tuple[str, str, str]:
    """(registered model, version, experiment id) of the demo's trained model."""
    from shiftguard.tracking import trained_model

    model = ROOT / "artifacts/train/model.pt"
    if not model.is_file():
        raise MissingError(f"{model}: no trained model; run make demo first")
    os.chdir(ROOT)  # the embedded store lives at the repository root
    info = trained_model(model)
    if info is None or info.registered_model is None:
        raise MissingError(f"{model}: no registered MLflow model version was trained from it")
    import mlflow

    run = mlflow.get_run(info.run_id)
    return info.registered_model, str(info.version), run.info.experiment_id


def evidently_project(workspace: Path) -> tuple[str, str]:
    """(id, name) of the workspace's one project."""
    for meta in sorted(workspace.glob("*/metadata.json")):
        data = json.loads(meta.read_text())
        return str(data.get("id") or meta.parent.name), str(data.get("name", ""))
    raise MissingError(f"{workspace}: no Evidently project; run make demo first")


def dvc_plots(folder: Path) -> Path:
    """``dvc plots show`` into ``folder``; its page must fetch no script over the network."""
    subprocess.run(
        [str(BIN / "dvc"), "plots", "show", "--out", str(folder)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return remote_scripts_refused(folder / "index.html")


def remote_scripts_refused(index: Path) -> Path:
    """``index``, unless it loads a script over the network (``RuntimeError`` naming them)."""
    remote = re.findall(r"<script[^>]+src=[\"'](https?://[^\"']+)", index.read_text())
    if remote:
        raise RuntimeError(f"{index}: loads scripts from the network: {', '.join(remote)}")
    return index


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/screenshots")
    args = parser.parse_args(argv)
    try:
        exe = browser()
        model, version, experiment = registered_version()
        project, project_name = evidently_project(ROOT / "artifacts/monitor/workspace")
        for report in ("reports/monitor/drift.html", "reports/shadow/report.html"):
            if not (ROOT / report).is_file():
                raise MissingError(f"{ROOT / report}: missing; run make demo first")
    except MissingError as err:
        print(f"screenshots: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="shiftguard-shots-") as tmp_dir:
        tmp = Path(tmp_dir)
        mlflow_port, evidently_port = free_port(), free_port()
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        evidently_url = f"http://127.0.0.1:{evidently_port}"
        from shiftguard.tracking import tracking_uri, ui_url

        mlflow_cmd = [str(BIN / "mlflow"), "ui", "--backend-store-uri", tracking_uri(ROOT)]
        mlflow_cmd += ["--host", "127.0.0.1", "--port", str(mlflow_port)]
        evidently_cmd = [str(BIN / "evidently"), "ui", "--host", "127.0.0.1"]
        evidently_cmd += ["--port", str(evidently_port)]
        evidently_cmd += ["--workspace", str(ROOT / "artifacts/monitor/workspace")]
        pages = [
            Page(
                "mlflow-model-version",
                ui_url(mlflow_url, f"models/{model}/versions/{version}"),
                (model, f"Version {version}"),
                height=1800,
            ),
            Page(
                "mlflow-runs",
                ui_url(mlflow_url, f"experiments/{experiment}/runs"),
                ("validate",),
            ),
            Page(
                "evidently-dashboard",
                f"{evidently_url}/projects/{project}",
                (project_name,),
                height=2400,
            ),
            Page(
                "drift-report",
                (ROOT / "reports/monitor/drift.html").as_uri(),
                ("ShiftGuard",),
                height=2400,
                offline=True,
            ),
            Page(
                "shadow-report",
                (ROOT / "reports/shadow/report.html").as_uri(),
                ("Shadow",),
                height=2400,
                offline=True,
            ),
        ]
        try:
            index = dvc_plots(tmp / "plots")
            pages.append(Page("dvc-plots", index.as_uri(), ("roc",), height=2400, offline=True))
        except (RuntimeError, subprocess.CalledProcessError) as err:
            problems.append(f"dvc-plots: {err}")
        with (
            server(mlflow_cmd, f"{mlflow_url}/health", tmp / "mlflow.log"),
            server(evidently_cmd, f"{evidently_url}/api/projects", tmp / "evidently.log"),
        ):
            for page in pages:
                problems += shoot(exe, page, args.out, tmp / "profile")
                print(f"screenshots: {page.name}.png")
    for problem in problems:
        print(f"screenshots: {problem}", file=sys.stderr)
    failed = {problem.split(":")[0] for problem in problems}
    total = len({page.name for page in pages} | failed)
    print(f"screenshots: {total - len(failed)} of {total} pages shown as expected, in {args.out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
