"""Self-signed certificates for the TLS tests, made with the real ``openssl`` (tests that use it
declare ``@pytest.mark.peers("openssl")``)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
from pathlib import Path

from shiftguard.peers import tool


def self_signed(folder: Path, name: str, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """``folder/NAME.crt`` and ``folder/NAME.key``: an RSA certificate for ``host`` (its CN and
    subjectAltName), valid for one day."""
    key, crt = folder / f"{name}.key", folder / f"{name}.crt"
    subprocess.run(
        [tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", f"/CN={host}", "-addext", f"subjectAltName=IP:{host}",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt, key


class TlsFront:
    """TLS in front of a loopback HTTP server, as a site's reverse proxy puts it in front of a VNA:
    a client must present a certificate ``client_ca`` signed; the bytes are then relayed both ways
    (Python's ssl; Debian's Orthanc 1.10.1 crashes when it serves HTTPS itself)."""

    def __init__(self, target: int, chain: tuple[Path, Path], client_ca: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(*map(str, chain))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(str(client_ca))
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            try:
                conn.settimeout(10)
                front = self.context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                self.refused += 1
                conn.close()
                continue
            back = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((front, back), (back, front)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self.server.close()
