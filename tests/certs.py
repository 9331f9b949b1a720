"""Throwaway TLS material for tests: a CA and certificates it signs, made at run time with
the ``openssl`` command (skips the test if there is none).

    ca = make_ca(tmp_path)
    server = make_cert(ca, tmp_path, "node1", ips=["127.0.0.1", "::1"], dns=["localhost"])
    client = make_cert(ca, tmp_path, "pfctl-admin")
    server.cert, server.key, ca.cert   # PEM file paths
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Pem:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(where: Path, name: str = "pfsyncd test CA") -> Pem:
    """A self-signed CA (EC P-256, valid one day); its files are named after it."""
    slug = name.replace(" ", "-")
    ca = Pem(where / f"{slug}.crt", where / f"{slug}.key")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(ca.key), "-out", str(ca.cert), "-days", "1", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return ca


def make_cert(
    ca: Pem,
    where: Path,
    name: str,
    ips: list[str] = (),
    dns: list[str] = (),  # type: ignore[assignment]
) -> Pem:
    """A certificate for ``name`` (its CN and a DNS SAN) signed by ``ca``; usable by servers
    (with ``ips``/``dns`` SANs to match the address clients dial) and clients alike."""
    pem = Pem(where / f"{name}.crt", where / f"{name}.key")
    csr = where / f"{name}.csr"
    ext = where / f"{name}.ext"
    sans = [f"DNS:{name}", *(f"DNS:{d}" for d in dns), *(f"IP:{ip}" for ip in ips)]
    ext.write_text(
        f"subjectAltName={','.join(sans)}\n"
        "basicConstraints=CA:FALSE\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(pem.key), "-out", str(csr), "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-out", str(pem.cert), "-days", "1", "-extfile", str(ext),
    )  # fmt: skip
    return pem
