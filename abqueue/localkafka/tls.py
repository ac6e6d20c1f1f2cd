"""A throwaway CA, a broker certificate for 127.0.0.1 and a client certificate, made with openssl,
so the local broker can offer an mTLS listener to try (and test) TLS client settings."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from abqueue.errors import AbqError


@dataclass
class TlsFiles:
    ca: Path  # CA certificate: the client's ssl_cafile and the broker's truststore
    broker_keystore: Path  # the broker's key and certificate chain, one PEM file
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AbqError(f"openssl {args[0]} failed: {proc.stderr.strip().splitlines()[-1:]}")


def _signed(name: str, subject: str, extensions: str, d: Path) -> None:
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d
    )
    (d / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "30",
        "-extfile",
        f"{name}.ext",
        cwd=d,
    )


def make_tls_files(directory: Path) -> TlsFiles:
    if shutil.which("openssl") is None:
        raise AbqError("openssl is not on PATH; install it (apt-get install openssl) to use --ssl-port")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "30",
        "-subj",
        "/CN=abqueue local test CA",
        cwd=d,
    )
    _signed("broker", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost\n", d)
    _signed("client", "/CN=abqueue-client", "extendedKeyUsage=clientAuth\n", d)
    keystore = d / "broker-keystore.pem"
    keystore.write_text((d / "broker.key").read_text() + (d / "broker.pem").read_text())
    return TlsFiles(
        ca=d / "ca.pem", broker_keystore=keystore, client_cert=d / "client.pem", client_key=d / "client.key"
    )
