"""Seeded, bounded fuzzing of the asyncio Storage SCP (:mod:`shiftguard.edge.scp`).

Two levels. In-process, thousands of broken byte streams go through the connection's PDU
reassembly, A-ASSOCIATE-RQ decoding, P-DATA handling and DIMSE parsing (no exception may escape,
nothing is stored once the connection decided to close). Over a real loopback socket, a running
:class:`~shiftguard.edge.receiver.Receiver` gets an association that stores an instance and then
breaks: the SCP ends that association, keeps the acknowledged instance, and keeps serving (a
following pynetdicom C-ECHO and C-STORE succeed). ``scripts/fuzz_campaign.py`` runs the
in-process properties for longer.
"""

from __future__ import annotations

import io
import itertools
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fuzz_targets import (
    ABORT,
    EXPLICIT,
    FIRST_SOP,
    RELEASE_RQ,
    UID_ROOT,
    ConnectionHarness,
    associate_rq,
    c_echo_rq,
    check_associate_decode,
    check_connection,
    check_parse_command,
    commands,
    file_meta,
    fuzz,
    p_data,
    pdu,
    pdu_streams,
    read_pdus,
    store_dataset,
    store_pdus,
)
from hypothesis import given
from hypothesis import strategies as st

from shiftguard.config import EdgeConfig
from shiftguard.edge import scp
from shiftguard.edge.queue import WorkQueue
from shiftguard.edge.receiver import Receiver


@pytest.fixture
def harness() -> Iterator[ConnectionHarness]:
    made = ConnectionHarness()
    yield made
    made.close()


# in-process: the parser and the state machine --------------------------------------------------


def test_any_stream_is_answered_or_aborted_never_raised(harness: ConnectionHarness) -> None:
    @fuzz(500)
    @given(pdu_streams())
    def run(chunks: list[bytes]) -> None:
        check_connection(harness, chunks)

    run()


def test_a_stream_broken_after_a_store_keeps_the_store(harness: ConnectionHarness) -> None:
    @fuzz(400)
    @given(pdu_streams(tail_only=True))
    def run(chunks: list[bytes]) -> None:
        outcome = check_connection(harness, chunks)
        assert outcome.stored[:1] == [FIRST_SOP]

    run()


@fuzz(300)
@given(pdu_streams().map(lambda chunks: b"".join(chunks)[6:]))
def test_associate_request_decodes_or_raises_protocol_error(body: bytes) -> None:
    check_associate_decode(body)


@fuzz(300)
@given(commands())
def test_command_sets_parse_or_raise_protocol_error(data: bytes) -> None:
    check_parse_command(data)


def test_a_valid_stream_in_any_segmentation_is_served(harness: ConnectionHarness) -> None:
    stream = b"".join(
        [
            associate_rq(),
            p_data([(3, 0x03, c_echo_rq(1))]),
            *store_pdus(1, 2, f"{UID_ROOT}.5", fragment=100),
            RELEASE_RQ,
        ]
    )

    @fuzz(100)
    @given(st.lists(st.integers(0, len(stream)), max_size=8))
    def run(cuts: list[int]) -> None:
        bounds = [0, *sorted(set(cuts)), len(stream)]
        chunks = [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]
        outcome = check_connection(harness, chunks)
        kinds = [kind for kind, _ in outcome.pdus]
        assert kinds == [scp.ASSOCIATE_AC, scp.P_DATA, scp.P_DATA, scp.RELEASE_RP]
        assert outcome.stored == [f"{UID_ROOT}.5"] and outcome.ended == ["released"]

    run()


# regressions: the minimal examples the fuzzing found -------------------------------------------


def _with_byte(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) >= 1
    return data.replace(old, new, 1)


@pytest.mark.parametrize(
    "stream",
    [
        # a non-ASCII byte in a proposed transfer syntax (echoed in the A-ASSOCIATE-AC)
        pytest.param(
            [_with_byte(associate_rq(), b"1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.\xb1")],
            id="transfer-syntax",
        ),
        # ... in the affected SOP class UID of a C-ECHO (echoed in the C-ECHO-RSP)
        pytest.param(
            [associate_rq(), p_data([(3, 0x03, _with_byte(c_echo_rq(1), b"1.1\0", b"1.\xb1\0"))])],
            id="echo-sop-class",
        ),
    ],
)
def test_a_non_ascii_uid_aborts_the_association(
    harness: ConnectionHarness, stream: list[bytes]
) -> None:
    outcome = check_connection(harness, stream)
    assert outcome.closed and outcome.pdus[-1][0] == scp.ABORT


def test_nothing_after_an_a_abort_is_processed(harness: ConnectionHarness) -> None:
    stores = store_pdus(1, 1, f"{UID_ROOT}.7")
    outcome = check_connection(harness, [b"".join([associate_rq(), stores[0], ABORT, stores[1]])])
    assert outcome.stored == [] and outcome.ended == ["aborted"]


def test_nothing_after_an_a_release_is_processed(harness: ConnectionHarness) -> None:
    again = b"".join([associate_rq(), *store_pdus(1, 1, f"{UID_ROOT}.8")])
    outcome = check_connection(harness, [associate_rq() + RELEASE_RQ + again])
    assert outcome.stored == [] and outcome.ended == ["released"]


# over a real socket: the running service ------------------------------------------------------


def _serve(tmp_path: Path) -> tuple[Receiver, WorkQueue]:
    queue = WorkQueue(tmp_path / "queue.db")
    receiver = Receiver(
        EdgeConfig(port=0, calling_ae_titles=["MODALITY"], network_timeout_s=5.0),
        queue,
        tmp_path / "inbox",
    )
    receiver.start()
    return receiver, queue


def _dataset(sop: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(file_meta(EXPLICIT, sop=sop) + store_dataset(sop)))


def _pynetdicom_store(port: int, sop: str) -> None:
    from pynetdicom import AE

    ds = _dataset(sop)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context(scp.VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="SHIFTGUARD")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()


def _exchange(port: int, chunks: list[bytes], half_close: bool) -> tuple[bytes, bool]:
    """Send ``chunks``; read until the SCP closes. (bytes read, whether it ended cleanly)."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while True:
                got = sock.recv(65536)
                if not got:
                    return bytes(received), True
                received += got
        except (ConnectionResetError, BrokenPipeError):  # it closed with our bytes unread
            return bytes(received), False


def _store_status(pdus: list[tuple[int, bytes]], message_id: int) -> int | None:
    for kind, body in pdus:
        if kind != scp.P_DATA:
            continue
        command = scp.parse_command(body[6:])
        if struct.unpack("<H", command[0x0120])[0] == message_id:
            return int(struct.unpack("<H", command[0x0900])[0])
    return None


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom, reading the broken data sets
def test_the_service_survives_broken_associations_and_keeps_what_it_acknowledged(
    tmp_path: Path,
) -> None:
    receiver, queue = _serve(tmp_path)
    try:
        _pynetdicom_store(receiver.port, f"{UID_ROOT}.200000")  # accepted before any of it
        acknowledged = [f"{UID_ROOT}.200000"]
        counter = iter(range(100001, 200000))

        @fuzz(60)
        @given(pdu_streams(tail_only=True))
        def run(chunks: list[bytes]) -> None:
            sop = f"{UID_ROOT}.{next(counter)}"  # as long as FIRST_SOP: no length changes
            stream = b"".join(chunks).replace(FIRST_SOP.encode(), sop.encode())
            cut = len(chunks[0])
            received, clean = _exchange(receiver.port, [stream[:cut], stream[cut:]], True)
            if clean:
                pdus = read_pdus(received)
                assert pdus[0][0] == scp.ASSOCIATE_AC
                if _store_status(pdus, 1) == 0:
                    acknowledged.append(sop)
            paths = queue.instance_paths()
            for uid in acknowledged:  # acknowledged, then the association broke: still there
                assert any(Path(p).name == f"{uid}.dcm" and Path(p).is_file() for p in paths), uid

        run()
        _pynetdicom_store(receiver.port, f"{UID_ROOT}.200001")  # and it still serves
        assert len(acknowledged) > 1
        assert queue.counts()["instances"] >= len(acknowledged) + 1
    finally:
        receiver.stop()
        queue.close()


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(pdu(0x09, bytes(10)), id="unknown-pdu-type"),
        pytest.param(b"\x04\x00\xff\xff\xff\xff", id="pdu-claiming-4-GB"),
        pytest.param(pdu(scp.P_DATA, struct.pack(">IBB", 200, 1, 3) + bytes(10)), id="pdv-overrun"),
        pytest.param(p_data([(5, 0x03, c_echo_rq(9))]), id="unaccepted-context"),
        pytest.param(p_data([(3, 0x03, b"\x08\x00" + c_echo_rq(9)[2:])]), id="not-a-command"),
        pytest.param(p_data([(1, 0x02, bytes(16))]), id="dataset-before-command"),
        pytest.param(associate_rq(), id="second-associate-rq"),
        pytest.param(
            p_data([(3, 0x03, c_echo_rq(9).replace(b"1.1\0", b"1.\xb1\0"))]), id="non-ascii-uid"
        ),
    ],
)
def test_a_malformed_pdu_is_answered_with_an_abort(tmp_path: Path, broken: bytes) -> None:
    receiver, queue = _serve(tmp_path)
    try:
        first = store_pdus(1, 1, f"{UID_ROOT}.300000")
        received, _ = _exchange(receiver.port, [associate_rq(), *first, broken], False)
        pdus = read_pdus(received)
        assert [k for k, _ in pdus] == [scp.ASSOCIATE_AC, scp.P_DATA, scp.ABORT]
        assert _store_status(pdus, 1) == 0
        assert any(p.endswith(f"{UID_ROOT}.300000.dcm") for p in queue.instance_paths())
        _pynetdicom_store(receiver.port, f"{UID_ROOT}.300001")
    finally:
        receiver.stop()
        queue.close()
