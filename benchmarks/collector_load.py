"""Many sites at once against the collector: records per second on PostgreSQL beside SQLite.

``--sites`` simulated edges (50 by default), each with its own spool and shipper (the same classes
an edge service runs) and a heartbeat every ``--heartbeat-s``, ship ``--records`` records each to
one collector at the same moment; a share (``--duplicates``) of each site's records is queued twice,
as a re-processed series or a lost answer would send it. Per store and round: the wall time from
the start to the last record acknowledged, records (sent, duplicates included) per second, and the
check that nothing was lost and nothing stored twice: the store holds each record exactly once, the
collector counted every repeat as a duplicate, and every site's heartbeat arrived. A failed check
exits 1.

The PostgreSQL store is a throwaway cluster started here (Debian package ``postgresql``), or the
server ``--postgres URL`` names (a new database is made in it per round). Both servers' durability
settings are printed: the throwaway cluster runs with ``fsync=off``, SQLite with WAL and
``synchronous=FULL`` (every commit on disk): the two do not pay the same for durability here; for
a production comparison point ``--postgres`` at a server set up as it will run.

    python benchmarks/collector_load.py                    # 50 sites x 200 records, 3 rounds
    python benchmarks/collector_load.py --sites 10 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from shiftguard.edge.shipper import Shipper, Spool
from shiftguard.monitor.collect import Collector, open_record_store
from shiftguard.peers import PostgresServer
from shiftguard.records.features import make_record

TOKEN = "load-test-token"
KEY = b"a site secret of 32 bytes, test!!"


def _records(site: str, n: int, seed: int) -> list[dict[str, Any]]:
    return [
        make_record(
            {
                "snr": 15.0 + (i % 20),
                "probability": (i % 100) / 100,
                "scanner_model": "Skyra",
                "slice_thickness": 1.0,
            },
            site=site,
            bundle="brain",
            bundle_version="abc123",
            series_uid=f"2.25.{seed}{i}",
            processed_at=f"2026-12-05T{i % 24:02d}:{i % 60:02d}:00Z",
            record_key=KEY,
        )
        for i in range(n)
    ]


def one_round(store: str, folder: Path, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One load round against the collector on ``store``: the figures and the checks."""
    collector = Collector(open_record_store(store), TOKEN, max_batch=args.batch)
    collector.start()
    sites: list[tuple[Spool, Shipper]] = []
    unique = duplicates = 0
    try:
        for s in range(args.sites):
            name = f"site-{s:03d}"
            records = _records(name, args.records, seed * 1000 + s)
            repeat = records[: int(len(records) * args.duplicates)]
            spool = Spool(folder / f"{name}.db")
            spool.add(records + repeat)
            unique += len(records)
            duplicates += len(repeat)
            beat = {"site": name, "interval_s": args.heartbeat_s, "bundle_version": "abc123",
                    "state": "serving"}  # fmt: skip
            shipper = Shipper(
                spool, collector.url, TOKEN, batch_size=args.batch, poll_s=0.05,
                heartbeat=lambda beat=beat: beat, heartbeat_s=args.heartbeat_s,
            )  # fmt: skip
            sites.append((spool, shipper))
        began = time.perf_counter()
        for _, shipper in sites:
            shipper.start()
        waits = [
            threading.Thread(target=shipper.flush, args=(args.timeout,)) for _, shipper in sites
        ]
        for thread in waits:
            thread.start()
        for thread in waits:
            thread.join()
        seconds = time.perf_counter() - began
        pending = sum(spool.counts()["pending"] for spool, _ in sites)
        rejected = sum(spool.counts()["rejected"] for spool, _ in sites)
        time.sleep(min(args.heartbeat_s, 2.0))  # the last heartbeats
        stored = collector.store.count()
        counted = collector.registry.get_sample_value(
            "shiftguard_collector_records_received_total", {"outcome": "duplicate"}
        )
        per_site = collector.store.counts_by_site()
        beats = {row["site"] for row in collector.store.heartbeats()}
    finally:
        for spool, shipper in sites:
            shipper.stop()
            spool.close()
        collector.stop()
    problems = []
    if pending or rejected:
        problems.append(f"{pending} records still pending, {rejected} rejected")
    if stored != unique:
        problems.append(f"{stored} records stored of {unique} unique")
    if int(counted or 0) != duplicates:
        problems.append(f"{counted} duplicates counted of {duplicates} sent twice")
    if any(n != args.records for n in per_site.values()) or len(per_site) != args.sites:
        problems.append("a site's records are not all stored once")
    if len(beats) != args.sites:
        problems.append(f"heartbeats from {len(beats)} of {args.sites} sites")
    return {
        "seconds": seconds,
        "sent": unique + duplicates,
        "unique": unique,
        "duplicates": duplicates,
        "stored": stored,
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--records", type=int, default=200, help="records per site")
    parser.add_argument("--duplicates", type=float, default=0.1, help="share queued twice")
    parser.add_argument("--batch", type=int, default=50, help="records per request")
    parser.add_argument("--heartbeat-s", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0, help="per round, seconds")
    parser.add_argument("--postgres", default=None, help="a server's URL (default: start one)")
    args = parser.parse_args(argv)

    server = None
    if args.postgres is None:
        server = PostgresServer()
        server.start()
    results: dict[str, list[dict[str, Any]]] = {"sqlite": [], "postgresql": []}
    failed = False
    try:
        with tempfile.TemporaryDirectory(prefix="collector-load-") as tmp:
            for r in range(args.rounds):
                for backend in results:
                    folder = Path(tmp) / f"{backend}-{r}"
                    folder.mkdir()
                    if backend == "sqlite":
                        store = str(folder / "records.db")
                    else:
                        name = f"load_{uuid.uuid4().hex[:8]}"
                        if server is not None:
                            store = server.create_database(name)
                        else:
                            import psycopg

                            with psycopg.connect(args.postgres, autocommit=True) as conn:
                                conn.execute(f'CREATE DATABASE "{name}"')
                            store = args.postgres.rsplit("/", 1)[0] + f"/{name}"
                    outcome = one_round(store, folder, args, seed=r)
                    results[backend].append(outcome)
                    check = "; ".join(outcome["problems"]) or (
                        f"nothing lost, nothing duplicated: {outcome['stored']} of "
                        f"{outcome['unique']} unique stored once, {outcome['duplicates']} "
                        "duplicates counted"
                    )
                    print(f"round {r + 1} {backend:<10} {outcome['seconds']:7.2f} s  "
                          f"{outcome['sent'] / outcome['seconds']:8.0f} records/s  {check}")  # fmt: skip
                    failed |= bool(outcome["problems"])
    finally:
        if server is not None:
            server.stop()
    print(f"\n{args.sites} sites x {args.records} records (+{args.duplicates:.0%} sent twice), "
          f"batches of {args.batch}, heartbeat every {args.heartbeat_s:g} s; median of "
          f"{args.rounds} round(s)")  # fmt: skip
    print("PostgreSQL: throwaway cluster, fsync=off, synchronous_commit=off"
          if server is not None else f"PostgreSQL: {args.postgres}")  # fmt: skip
    print("SQLite: WAL, synchronous=FULL (shiftguard.store)")
    rates = {}
    for backend, outcomes in results.items():
        rates[backend] = statistics.median(o["sent"] / o["seconds"] for o in outcomes)
        seconds = statistics.median(o["seconds"] for o in outcomes)
        print(f"  {backend:<10} {seconds:7.2f} s  {rates[backend]:8.0f} records/s")
    print(f"  ratio PostgreSQL / SQLite: {rates['postgresql'] / rates['sqlite']:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
