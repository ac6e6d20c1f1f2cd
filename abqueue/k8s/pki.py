"""Certificates for a local control plane, made with openssl: a cluster CA (the API server's serving
certificate and the clients' certificates), a front-proxy CA (the aggregation layer, through which the
API server reaches KEDA's metrics apiserver), a service-account key pair, and a CA for KEDA's own
connections (its operator's gRPC metrics service and its metrics apiserver). Keys are written
owner-only; nothing secret is passed on a command line."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from abqueue.errors import UsageError

DAYS = "3650"


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"openssl {args[0]} failed: {r.stderr.strip()}")


def _key(d: Path, name: str) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key", cwd=d)
    os.chmod(d / f"{name}.key", 0o600)


def _ca(d: Path, name: str, cn: str) -> None:
    _key(d, name)
    _openssl(
        "req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}", "-days", DAYS,
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", f"{name}.crt", cwd=d,
    )  # fmt: skip


def _cert(d: Path, name: str, ca: str, subject: str, usage: str, sans: list[str] | None = None) -> None:
    """A certificate signed by `ca`; usage: serverAuth, clientAuth or both."""
    _key(d, name)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=d)
    ext = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature", f"extendedKeyUsage={usage}"]
    if sans:
        ext.append("subjectAltName=" + ",".join(sans))
    (d / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-days", DAYS, "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d,
    )  # fmt: skip
    (d / f"{name}.csr").unlink()
    (d / f"{name}.ext").unlink()


def make(d: Path, advertise: str) -> None:
    """Writes every certificate and key the control plane needs into d (once: an existing set is kept)."""
    if (d / ".complete").exists():
        return
    if shutil.which("openssl") is None:
        raise UsageError("openssl is not on PATH: install it (Debian: apt-get install openssl) to make certificates")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    _ca(d, "ca", "abqueue-local-cluster-ca")
    sans = ["IP:127.0.0.1", f"IP:{advertise}", "IP:10.96.0.1", "DNS:localhost", "DNS:kubernetes"]
    sans += ["DNS:kubernetes.default", "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local"]
    _cert(d, "apiserver", "ca", "/CN=kube-apiserver", "serverAuth", sans)
    _cert(d, "apiserver-kubelet-client", "ca", "/O=system:masters/CN=kube-apiserver-kubelet-client", "clientAuth")
    _cert(d, "admin", "ca", "/O=system:masters/CN=kubernetes-admin", "clientAuth")
    _cert(d, "controller-manager", "ca", "/CN=system:kube-controller-manager", "clientAuth")
    _ca(d, "front-proxy-ca", "abqueue-local-front-proxy-ca")
    _cert(d, "front-proxy-client", "front-proxy-ca", "/CN=front-proxy-client", "clientAuth")
    _key(d, "sa")
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
    # KEDA: the operator serves gRPC to the metrics apiserver, which serves the aggregation layer;
    # both present this certificate to each other, and the APIService trusts its CA.
    _ca(d, "keda-ca", "abqueue-local-keda-ca")
    keda_sans = ["IP:127.0.0.1", "DNS:localhost", "DNS:keda-operator.keda.svc", "DNS:keda-metrics-apiserver.keda.svc"]
    keda_sans.append("DNS:keda-admission-webhooks.keda.svc")
    _cert(d, "keda", "keda-ca", "/CN=keda", "serverAuth,clientAuth", keda_sans)
    keda = d / "keda"
    keda.mkdir(exist_ok=True)
    for src, dst in (("keda-ca.crt", "ca.crt"), ("keda.crt", "tls.crt"), ("keda.key", "tls.key")):
        shutil.copy(d / src, keda / dst)
    os.chmod(keda / "tls.key", 0o600)
    (d / ".complete").touch()
