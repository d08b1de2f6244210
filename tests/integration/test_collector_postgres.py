"""The collector's record store on a real PostgreSQL server: the same records, duplicates and
frame as the embedded SQLite store, through the real HTTP path from several sites' shippers."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest

from shiftguard.edge.shipper import Shipper, Spool
from shiftguard.errors import CollectorStoreError
from shiftguard.monitor.collect import (
    Collector,
    PostgresRecordStore,
    RecordStore,
    open_record_store,
    safe_url,
)
from shiftguard.records.features import make_record

if TYPE_CHECKING:
    from .conftest import Postgres

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

KEY = b"the site's secret, 32 bytes long"


def _records(site: str, n: int) -> list[dict[str, object]]:
    return [
        make_record(
            {"snr": 20.0 + i, "scanner_model": "Skyra", "probability": i / n},
            site=site,
            bundle="brain",
            bundle_version="1",
            series_uid=f"1.2.{site}.{i}",
            processed_at=f"2026-12-05T10:{i % 60:02d}:00Z",
            record_key=KEY,
        )
        for i in range(n)
    ]


@pytest.fixture
def url(postgres: Postgres) -> str:
    name = f"records_{uuid.uuid4().hex[:12]}"
    conn = postgres.connect()
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        conn.cursor().execute(f"CREATE DATABASE {name}")
    finally:
        conn.close()
    return f"postgresql://{postgres.user}@{postgres.host}:{postgres.port}/{name}"


def test_three_sites_ship_to_a_postgres_backed_collector_nothing_lost_nothing_twice(
    url: str, tmp_path: Path
) -> None:
    store = open_record_store(url)
    assert isinstance(store, PostgresRecordStore)
    collector = Collector(store, token="s3cret", max_batch=50)
    collector.start()
    spools, shippers = [], []
    try:
        for site in ("north", "south", "east"):
            spool = Spool(tmp_path / f"{site}.db")
            records = _records(site, 120)
            spool.add(records)
            spool.add(records[:30])  # re-processed series: the spool keeps them once
            spools.append(spool)
            shipper = Shipper(spool, collector.url, token="s3cret", batch_size=25)
            shipper.start()
            shippers.append(shipper)
        for shipper in shippers:
            assert shipper.flush(timeout=60)
        # a batch sent again (a lost answer): counted as duplicates, stored once
        assert store.insert(_records("north", 10)) == (0, 10)
        assert store.counts_by_site() == {"east": 120, "north": 120, "south": 120}
        assert store.sites() == ["east", "north", "south"] and store.count("south") == 120
        got = store.frame(site="north")
        assert got["seq"].is_monotonic_increasing and len(store.frame(since_seq=100)) < 360
        # the same records in the embedded store read back as the same frame
        embedded = RecordStore(tmp_path / "records.db")
        embedded.insert(_records("north", 120))
        want = embedded.frame(site="north")
        embedded.close()
        columns = [c for c in want.columns if c not in ("seq", "received_at")]
        pd.testing.assert_frame_equal(
            got[columns].sort_values("record_id").reset_index(drop=True),
            want[columns].sort_values("record_id").reset_index(drop=True),
        )
        assert list(got.dtypes) == list(want.dtypes)
    finally:
        for shipper in shippers:
            shipper.stop()
        for spool in spools:
            spool.close()
        collector.stop()
        store.close()
    # reopened: the table is there, nothing added twice
    again = PostgresRecordStore(url)
    assert again.count() == 360
    again.close()


def test_an_unreachable_server_is_a_clear_error_without_the_password() -> None:
    url = "postgresql://sg:hunter2@127.0.0.1:9/records?connect_timeout=2"
    with pytest.raises(CollectorStoreError, match=r"sg:\*\*\*@127\.0\.0\.1:9") as err:
        PostgresRecordStore(url)
    assert "hunter2" not in str(err.value)
    assert safe_url("postgresql://u@h/db") == "postgresql://u@h/db"


@pytest.mark.slow(seconds=20)
def test_fifty_sites_at_once_lose_nothing_and_store_nothing_twice(postgres: Postgres) -> None:
    """The load benchmark, bounded (50 sites x 40 records, one round), as a check: it exits 1 when
    a record is missing, stored twice, or a duplicate or heartbeat is not counted."""
    conn = postgres.connect(connect_timeout=5)
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE load_check")
    finally:
        conn.close()
    url = f"postgresql://{postgres.user}@{postgres.host}:{postgres.port}/load_check"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "collector_load.py"), "--sites", "50",
         "--records", "40", "--rounds", "1", "--heartbeat-s", "0.5", "--timeout", "120",
         "--postgres", url],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("round 1")]
    assert len(lines) == 2
    for line in lines:
        assert (
            "nothing lost, nothing duplicated: 2000 of 2000 unique stored once, 200 duplicates counted"
            in line
        )
