"""Collecting feature records: validation, the edge's spool and shipper, the collector and its
durable store, end to end on the loopback interface (fast backoff, small limits)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tls_certs import self_signed

from shiftguard.edge import shipper as shipper_module
from shiftguard.edge.shipper import Shipper, Spool
from shiftguard.monitor.collect import Collector, RecordStore
from shiftguard.records.contract import InvalidRecordError, validate_record
from shiftguard.records.features import (
    AGE_BANDS,
    ENVELOPE,
    FEATURE_NAMES,
    N_EMBEDDING,
    SCHEMA_VERSION,
    make_record,
)

TOKEN = "collector-token-7f3a"
FAST = {"backoff_s": 0.01, "max_backoff_s": 0.05, "poll_s": 0.05, "timeout_s": 2.0}
#: small enough to reach in a test: 20 records of about 1.2 kB fit, 21 do not
MAX_BATCH, MAX_BODY = 20, 64 << 10
DROP = object()

MakeEdge = Callable[..., tuple[Spool, Shipper]]


RECORD_KEY = b"site secret for the tests, 32 byte"


def _features(i: int) -> dict[str, Any]:
    """Plausible features of a 3D T1 brain MRI series (echo time unknown on every 5th)."""
    return {
        "manufacturer": ("SIEMENS", "GE MEDICAL SYSTEMS", "Philips")[i % 3],
        "scanner_model": ("Skyra", "DISCOVERY MR750", "Ingenia")[i % 3],
        "field_strength": (3.0, 1.5)[i % 2],
        "slice_thickness": 1.0,
        "pixel_spacing_row": 0.9375,
        "pixel_spacing_col": 0.9375,
        "rows": 256,
        "cols": 256,
        "n_slices": 176,
        "repetition_time": 2300.0,
        "echo_time": None if i % 5 == 0 else 2.98,
        "flip_angle": 9.0,
        "mean": 118.0 + i,
        "std": 81.5,
        "p01": 0.0,
        "p50": 97.0,
        "p99": 612.0,
        "foreground_fraction": 0.31,
        "snr": 21.4 + i / 10,
        "noise": 0.012,
        "sharpness": 0.081,
        "bias_cv": 0.052,
        "probability": (i % 10) / 10 + 0.05,
        "entropy": 0.6,
        **{f"emb_{k}": (k - 3.5) / 4 + i / 100 for k in range(N_EMBEDDING)},
        "age_band": AGE_BANDS[i % len(AGE_BANDS)],
        "sex": "FM"[i % 2],
    }


def _record(i: int, site: str = "north") -> dict[str, Any]:
    return make_record(
        _features(i),
        site=site,
        bundle="brain-mri",
        bundle_version="1.2.0",
        series_uid=f"1.2.826.0.1.3680043.{i}",
        processed_at=f"2026-11-28T10:{i % 60:02d}:16Z",
        record_key=RECORD_KEY,
    )


def _changed(record: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = {**record, **{k: v for k, v in changes.items() if v is not DROP}}
    for k in [k for k, v in changes.items() if v is DROP]:
        del out[k]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _request(
    url: str,
    path: str = "/v1/records",
    *,
    body: bytes | None = None,
    token: str | None = TOKEN,
    method: str | None = None,
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), json.loads(exc.read())


def _post(url: str, records: list[Any], token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    return _request(url, body=json.dumps({"records": records}).encode(), token=token)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours proxy variables, even for 127.0.0.1 when no_proxy does not name it."""
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    c = Collector(tmp_path / "records.db", TOKEN, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY)
    c.start()
    yield c
    c.stop()


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[MakeEdge]:
    """Makes a site's spool and shipper (fast backoff); stops and closes them afterwards."""
    made: list[tuple[Spool, Shipper]] = []

    def make(url: str, site: str = "north", **kwargs: Any) -> tuple[Spool, Shipper]:
        spool = Spool(tmp_path / f"spool-{site}-{len(made)}.db")
        token = kwargs.pop("token", TOKEN)
        shipper = Shipper(spool, url, token, **{**FAST, **kwargs})
        made.append((spool, shipper))
        return spool, shipper

    yield make
    for spool, shipper in made:
        shipper.stop()
        spool.close()


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


def test_a_record_from_make_record_is_valid_after_a_json_round_trip() -> None:
    record = _record(0)
    assert validate_record(record) == []
    assert validate_record(json.loads(json.dumps(record))) == []
    assert record["echo_time"] is None  # null is a valid numerical value


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"sex": DROP}, "missing field 'sex'"),
        ({"processed_at": DROP}, "missing field 'processed_at'"),
        ({"snr": "abc"}, "snr: expected a number or null, got 'abc'"),
        ({"rows": True}, "rows: expected a number or null, got True"),
        ({"p99": float("nan")}, "p99: expected a number or null, got nan"),
        ({"manufacturer": 3}, "manufacturer: expected a string, got 3"),
        ({"patient_name": "DOE^JANE"}, "unknown field 'patient_name'"),
        ({"scanner_model": "x" * 65}, "scanner_model: expected at most 64 characters, got 65"),
        ({"schema": SCHEMA_VERSION + 1}, "schema 2: this collector reads schema 1"),
        ({"schema": "1"}, "schema: expected an integer, got '1'"),
        ({"record_id": "ABC"}, "record_id: expected 32 lowercase hexadecimal characters"),
        ({"site": "north wing"}, "site: expected 1-64 characters of A-Z a-z 0-9 _ . -"),
        ({"site": "s" * 65}, "site: expected 1-64 characters"),
        ({"processed_at": "2026-11-28T10:04:16"}, "processed_at: expected an ISO-8601 UTC"),
        ({"processed_at": "2026-11-28T11:04:16+01:00"}, "processed_at: expected an ISO-8601 UTC"),
        ({"bundle_version": 1.2}, "bundle_version: expected a string of 1-128 characters"),
    ],
    ids=lambda v: "" if isinstance(v, str) else ",".join(v),
)
def test_each_problem_names_its_field(changes: dict[str, Any], problem: str) -> None:
    problems = validate_record(_changed(_record(1), **changes))
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_every_problem_of_a_record_is_listed() -> None:
    bad = _changed(_record(2), sex=DROP, snr="abc", patient_name="X", schema=2)
    assert validate_record(bad) == [
        "missing field 'sex'",
        "unknown field 'patient_name'",
        "schema 2: this collector reads schema 1",
        "snr: expected a number or null, got 'abc'",
    ]
    assert validate_record([1, 2]) == ["record: expected a JSON object, got list"]


# ------------------------------------------------------------------------------------------------
# the spool
# ------------------------------------------------------------------------------------------------


def test_the_spool_refuses_an_invalid_record_naming_its_index_and_queues_nothing(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool.db")
    bad = _changed(_record(2), snr="abc")
    with pytest.raises(ValueError, match=r"record 2: snr: expected a number") as caught:
        spool.add([_record(0), _record(1), bad])
    assert isinstance(caught.value, InvalidRecordError)
    assert caught.value.problems == {2: ["snr: expected a number or null, got 'abc'"]}
    assert spool.counts() == {"pending": 0, "sent": 0, "rejected": 0}  # all or nothing

    assert spool.add([_record(0), _record(1), _record(2)]) == 3
    spool.close()
    spool = Spool(tmp_path / "spool.db")  # what add() returned for is on disk
    pending = spool.pending(10)
    assert [r["record_id"] for _, r in pending] == [_record(i)["record_id"] for i in range(3)]
    assert spool.pending(2) == pending[:2]
    assert spool.mark_sent([pending[0][0]]) == 1
    assert spool.mark_rejected({pending[1][0]: "refused"}) == 1
    assert spool.mark_sent([pending[1][0]]) == 0  # only pending records change
    assert spool.counts() == {"pending": 1, "sent": 1, "rejected": 1}
    assert spool.rejected() == [(pending[1][0], pending[1][1]["record_id"], "refused")]
    assert spool.purge_sent() == 1 and spool.counts()["sent"] == 0
    assert spool.requeue_rejected() == 1 and spool.counts()["pending"] == 2
    spool.close()


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------


def test_a_batch_shipped_end_to_end_arrives_once(collector: Collector, edge: MakeEdge) -> None:
    records = [_record(i) for i in range(25)]
    spool, shipper = edge(collector.url, batch_size=10)
    assert spool.add(records) == 25
    shipper.start()
    assert shipper.flush(timeout=10)
    assert spool.counts() == {"pending": 0, "sent": 25, "rejected": 0}
    assert shipper.last_error is None
    assert _request(collector.url, "/healthz", token=None) == (200, {"status": "ok", "records": 25})

    frame = collector.store.frame()
    assert list(frame.columns) == [*ENVELOPE, *FEATURE_NAMES, "seq", "received_at"]
    assert list(frame["record_id"]) == [r["record_id"] for r in records]  # once, in order
    assert frame["seq"].is_monotonic_increasing and frame["seq"].is_unique
    assert frame["snr"].dtype == "float64" and frame["rows"].dtype == "float64"
    assert frame["schema"].dtype == "int64" and set(frame["schema"]) == {SCHEMA_VERSION}
    assert frame["echo_time"].isna().sum() == 5  # the nulls, as NaN
    assert all(isinstance(v, str) for v in frame["manufacturer"])
    assert frame["snr"].tolist() == [r["snr"] for r in records]
    assert frame["received_at"].str.endswith("Z").all()


def test_nothing_is_lost_while_the_collector_is_down(tmp_path: Path, edge: MakeEdge) -> None:
    collector = Collector(tmp_path / "records.db", TOKEN, port=_free_port())  # not started yet
    spool, shipper = edge(collector.url, batch_size=7)
    spool.add([_record(i) for i in range(12)])
    shipper.start()
    _wait(lambda: (shipper.last_error or "").startswith("cannot reach"))
    spool.add([_record(i) for i in range(12, 20)])
    shipper.wake()
    assert not shipper.flush(timeout=0.2)
    assert spool.counts() == {"pending": 20, "sent": 0, "rejected": 0}
    collector.start()  # on the port the shipper keeps trying
    try:
        assert shipper.flush(timeout=10)
        assert spool.counts() == {"pending": 0, "sent": 20, "rejected": 0}
        assert collector.store.count() == 20
        assert list(collector.store.frame()["record_id"]) == [
            _record(i)["record_id"] for i in range(20)
        ]
    finally:
        collector.stop()


def test_a_duplicate_batch_is_counted_not_stored_twice(collector: Collector) -> None:
    records = [_record(i) for i in range(5)]
    assert _post(collector.url, records) == (200, {"accepted": 5, "duplicates": 0})
    assert _post(collector.url, records) == (200, {"accepted": 0, "duplicates": 5})
    new = _record(5)
    assert _post(collector.url, [records[0], new, new]) == (200, {"accepted": 1, "duplicates": 2})
    assert collector.store.count() == 6
    assert collector.store.frame()["record_id"].is_unique


def test_the_collector_restarted_on_the_same_store_keeps_earlier_records(tmp_path: Path) -> None:
    path = tmp_path / "records.db"
    first = Collector(path, TOKEN)
    first.start()
    assert _post(first.url, [_record(i) for i in range(4)])[0] == 200
    first.stop()

    second = Collector(path, TOKEN)
    second.start()
    try:
        assert _request(second.url, "/healthz", token=None)[1]["records"] == 4
        assert _post(second.url, [_record(i) for i in range(3, 7)]) == (
            200,
            {"accepted": 3, "duplicates": 1},
        )
        frame = second.store.frame()
        assert list(frame["record_id"]) == [_record(i)["record_id"] for i in range(7)]
        assert frame["seq"].is_monotonic_increasing
    finally:
        second.stop()

    store = RecordStore(path)  # a store the caller owns stays open after stop()
    third = Collector(store, TOKEN)
    third.start()
    third.stop()
    assert store.count() == 7
    store.close()


def test_several_sites_report_to_one_collector(collector: Collector, edge: MakeEdge) -> None:
    sizes = {"north": 3, "south-2": 5, "east.1": 2}
    shippers = []
    for offset, (site, n) in enumerate(sizes.items()):
        spool, shipper = edge(collector.url, site=site, batch_size=4)
        spool.add([_record(100 * offset + i, site=site) for i in range(n)])
        shipper.start()
        shippers.append(shipper)
    assert all(s.flush(timeout=10) for s in shippers)

    store = collector.store
    assert store.sites() == ["east.1", "north", "south-2"]
    assert store.count() == 10 and store.count("south-2") == 5
    south = store.frame(site="south-2")
    assert set(south["site"]) == {"south-2"}
    assert list(south["record_id"]) == [_record(100 + i, "south-2")["record_id"] for i in range(5)]
    everything = store.frame()
    later = store.frame(since_seq=int(everything["seq"].iloc[3]))
    assert list(later["record_id"]) == list(everything["record_id"].iloc[4:])
    assert len(store.frame(site="nowhere")) == 0


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------


def _padded(size: int) -> bytes:
    return json.dumps({"records": [], "padding": "x" * size}).encode()


@pytest.mark.parametrize(
    ("request_kwargs", "status", "message"),
    [
        ({"token": None}, 401, "missing token: send 'Authorization: Bearer <token>'"),
        ({"token": "wrong"}, 401, "invalid token"),
        ({"body": b"{records: oops"}, 400, "the body is not JSON"),
        ({"body": b"[1, 2]"}, 400, 'expected a JSON object {"records": [...]}'),
        ({"body": json.dumps({"records": [_record(i) for i in range(MAX_BATCH + 1)]}).encode()},
         413, f"21 records in one batch; this collector takes at most {MAX_BATCH}"),
        ({"body": _padded(MAX_BODY)}, 413, f"this collector takes at most {MAX_BODY}"),
        ({"path": "/v1/other", "body": b"{}"}, 404, "no such route: POST /v1/other"),
        ({"path": "/v1/records", "method": "GET"}, 404, "no such route: GET /v1/records"),
    ],
    ids=["no-token", "wrong-token", "not-json", "wrong-shape", "batch-too-long",
         "body-too-large", "unknown-route", "wrong-method"],
)  # fmt: skip
def test_a_bad_request_is_refused_clearly_and_the_collector_keeps_serving(
    collector: Collector, request_kwargs: dict[str, Any], status: int, message: str
) -> None:
    kwargs = {"body": json.dumps({"records": [_record(0)]}).encode(), **request_kwargs}
    code, answer = _request(collector.url, **kwargs)
    assert code == status and message in answer["error"], answer
    assert collector.store.count() == 0
    assert _request(collector.url, "/healthz", token=None) == (200, {"status": "ok", "records": 0})
    assert _post(collector.url, [_record(1)]) == (200, {"accepted": 1, "duplicates": 0})


def test_an_invalid_record_refuses_its_whole_batch_naming_each_problem(
    collector: Collector,
) -> None:
    batch = [
        _record(0),
        _changed(_record(1), sex=DROP),
        _record(2),
        _changed(_record(3), snr="abc", patient_name="DOE^JANE"),
    ]
    code, answer = _post(collector.url, batch)
    assert code == 400
    assert answer["problems"] == {
        "1": ["missing field 'sex'"],
        "3": ["unknown field 'patient_name'", "snr: expected a number or null, got 'abc'"],
    }
    assert "2 of 4 records are invalid; nothing from this batch was stored" in answer["error"]
    assert collector.store.count() == 0  # all or nothing
    assert _post(collector.url, [batch[0], batch[2]]) == (200, {"accepted": 2, "duplicates": 0})


def test_an_empty_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token is empty"):
        Collector(tmp_path / "records.db", "")
    spool = Spool(tmp_path / "spool.db")
    with pytest.raises(ValueError, match="token is empty"):
        Shipper(spool, "http://127.0.0.1:9", "")
    spool.close()


# ------------------------------------------------------------------------------------------------
# the shipper's answers to refusals
# ------------------------------------------------------------------------------------------------


def test_the_shipper_rejects_only_the_bad_record_of_a_mixed_batch(
    collector: Collector, edge: MakeEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, shipper = edge(collector.url, batch_size=10)
    records = [_record(i) for i in range(6)]
    records[2] = _changed(records[2], patient_name="DOE^JANE")
    with monkeypatch.context() as m:  # a record spooled by a runner that did not validate
        m.setattr(shipper_module, "check_records", lambda records, what: None)
        spool.add(records)
    shipper.start()
    assert shipper.flush(timeout=10)
    assert spool.counts() == {"pending": 0, "sent": 5, "rejected": 1}
    [(_, record_id, reason)] = spool.rejected()
    assert record_id == records[2]["record_id"] and reason == "unknown field 'patient_name'"
    stored = list(collector.store.frame()["record_id"])
    assert stored == [r["record_id"] for i, r in enumerate(records) if i != 2]


def test_the_shipper_halves_its_batch_on_413(collector: Collector, edge: MakeEdge) -> None:
    spool, shipper = edge(collector.url, batch_size=64)
    spool.add([_record(i) for i in range(70)])
    shipper.start()
    assert shipper.flush(timeout=10)
    assert shipper.batch_size == 16  # 64 -> 32 -> 16 <= MAX_BATCH
    assert spool.counts() == {"pending": 0, "sent": 70, "rejected": 0}
    assert list(collector.store.frame()["record_id"]) == [
        _record(i)["record_id"] for i in range(70)
    ]


def test_a_wrong_token_keeps_the_records_pending(collector: Collector, edge: MakeEdge) -> None:
    spool, shipper = edge(collector.url, token="not-the-token")
    spool.add([_record(i) for i in range(3)])
    shipper.start()
    _wait(lambda: "answered 401: invalid token" in (shipper.last_error or ""))
    assert not shipper.flush(timeout=0.1)
    assert spool.counts() == {
        "pending": 3,
        "sent": 0,
        "rejected": 0,
    }  # not rejected: a config error
    assert collector.store.count() == 0


@pytest.mark.peers("openssl")
def test_records_travel_over_https_to_a_collector_the_site_trusts(
    tmp_path: Path, edge: MakeEdge
) -> None:
    """The collector serves HTTPS with the SCP's certificate options (cert, key, a CA that makes
    client certificates required); a shipper verifies the collector against its CA, so the
    token never goes to a server it cannot authenticate."""
    server_crt, server_key = self_signed(tmp_path, "collector")
    client_crt, client_key = self_signed(tmp_path, "edge")
    collector = Collector(
        tmp_path / "records.db", TOKEN, tls_cert=str(server_crt), tls_key=str(server_key),
        tls_ca=str(client_crt),
    )  # fmt: skip
    collector.start()
    try:
        assert collector.url.startswith("https://127.0.0.1:")
        records = [_record(i) for i in range(6)]
        spool, shipper = edge(
            collector.url, tls_ca=str(server_crt), tls_cert=str(client_crt),
            tls_key=str(client_key),
        )  # fmt: skip
        spool.add(records)
        shipper.start()
        assert shipper.flush(timeout=10)
        assert collector.store.count() == 6

        # no CA for the collector's certificate: nothing sent, everything kept, the reason named
        untrusting_spool, untrusting = edge(
            collector.url, site="south", tls_cert=str(client_crt), tls_key=str(client_key)
        )
        untrusting_spool.add([_record(i, site="south") for i in range(3)])
        untrusting.start()
        _wait(lambda: "certificate" in (untrusting.last_error or ""))
        assert untrusting_spool.counts()["pending"] == 3
        # no client certificate, or plain HTTP on the TLS port: refused; the collector serves on
        anonymous_spool, anonymous = edge(collector.url, site="west", tls_ca=str(server_crt))
        anonymous_spool.add([_record(i, site="west") for i in range(2)])
        anonymous.start()
        _wait(lambda: anonymous.last_error is not None)
        with pytest.raises(OSError):
            _request(collector.url.replace("https://", "http://"), "/healthz", token=None)
        assert anonymous_spool.counts()["pending"] == 2
        assert collector.store.count() == 6
        spool.add([_record(i) for i in range(6, 9)])
        shipper.wake()
        assert shipper.flush(timeout=10)
        assert collector.store.count() == 9
    finally:
        collector.stop()


def test_a_token_is_never_sent_in_clear_over_the_network(tmp_path: Path) -> None:
    """Plain HTTP is for loopback only: a LAN address needs https://."""
    spool = Spool(tmp_path / "spool.db")
    try:
        with pytest.raises(ValueError, match=r"https://"):
            Shipper(spool, "http://10.20.0.5:8765", TOKEN)
        Shipper(spool, "http://127.0.0.1:8765", TOKEN)  # the same machine: allowed
    finally:
        spool.close()
