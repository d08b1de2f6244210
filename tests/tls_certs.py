"""Self-signed certificates for the TLS tests, made with the real ``openssl`` (tests that use it
declare ``@pytest.mark.peers("openssl")``)."""

from __future__ import annotations

import subprocess
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
