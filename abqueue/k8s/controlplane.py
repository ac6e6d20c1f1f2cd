"""A real Kubernetes control plane and KEDA on this machine, as processes: etcd, kube-apiserver (with the
aggregation layer, so that KEDA can serve external.metrics.k8s.io), kube-controller-manager (its HPA
controller), and KEDA's operator, metrics apiserver and admission webhooks, each under its own
service-account token and KEDA's own RBAC. No kubelet: pods stay Pending, and what is real is the API
server, KEDA and the HPA, which is what scales a variant's workers on lag.

Binaries come from scripts/controlplane.sh (built from the Go modules pinned under controlplane/). The
state (certificates, etcd's data, kubeconfigs, logs, and the pids `abq k8s down` stops) lives in one
directory."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from abqueue.errors import AbqError, UsageError
from abqueue.k8s import pki
from abqueue.localkafka.broker import alive, free_port, port_open, reap, write_private

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "controlplane.sh"
VENDORED_CRDS = Path(__file__).resolve().parents[1] / "deploy" / "crds"
NO_GO_TOOLCHAIN = "no Go toolchain on PATH: install Go 1.26 or later (https://go.dev/dl/) to build the control plane"
NAMESPACE = "keda"
PORTS = ("etcd", "etcd-peer", "apiserver", "controller-manager", "keda-grpc", "keda-metrics", "keda-probe", "adapter",
         "adapter-metrics", "webhooks", "webhooks-metrics", "webhooks-probe")  # fmt: skip
# The order things start in; `down` stops them in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "keda-operator", "keda-adapter", "keda-webhooks")


class ControlPlaneError(AbqError):
    pass


def default_dir() -> Path:
    return Path(os.environ.get("ABQ_K8S_DIR") or Path.home() / ".local" / "state" / "abqueue" / "k8s")


def build() -> Path:
    """The folder scripts/controlplane.sh builds (once, ~25 minutes on 2 cores, with progress on stderr;
    cached after)."""
    if not BUILD_SCRIPT.exists():
        raise UsageError(f"{BUILD_SCRIPT} is missing: abq k8s builds the control plane from a checkout of abqueue")
    if shutil.which("go") is None:
        raise UsageError(NO_GO_TOOLCHAIN)
    r = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    if r.returncode:
        raise ControlPlaneError(f"building the control plane failed (exit {r.returncode}); its output is above")
    return Path(r.stdout.strip().splitlines()[-1])


def advertise_address() -> str:
    """A non-loopback address of this host: kube-apiserver refuses to advertise a loopback one."""
    try:
        out = subprocess.run(
            ["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True
        ).stdout
    except FileNotFoundError:
        out = ""
    for line in out.splitlines():  # "2: eth0    inet 192.0.2.2/24 brd ..."
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
        if not str(info[4][0]).startswith("127."):
            return str(info[4][0])
    raise ControlPlaneError("this host has no non-loopback IPv4 address for kube-apiserver to advertise")


@dataclass
class ControlPlane:
    dir: Path = field(default_factory=default_dir)
    hpa_sync_s: int = 5  # the HPA controller's sync period (Kubernetes' default is 15 s)
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    bin: Path | None = None

    # -- paths ---------------------------------------------------------------------------------
    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def kubeconfig(self) -> Path:
        """The cluster admin's kubeconfig (system:masters): what `kubectl` and the tests use."""
        return self.dir / "admin.kubeconfig"

    @property
    def kubectl_path(self) -> Path:
        """kubectl of the server's version (kubectl supports one minor version of skew either way)."""
        assert self.bin is not None, "the control plane has not been started from this directory"
        return self.bin / "bin" / "kubectl"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def log_file(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    # -- state ---------------------------------------------------------------------------------
    def _save(self) -> None:
        state = {"ports": self.ports, "pids": self.pids, "bin": str(self.bin)}
        (self.dir / "state.json").write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, d: Path | None = None) -> ControlPlane:
        cp = cls(dir=d or default_dir())
        try:
            state = json.loads((cp.dir / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            return cp
        cp.ports, cp.pids, cp.bin = state["ports"], state["pids"], Path(state["bin"])
        return cp

    def running(self) -> dict[str, bool]:
        return {name: _alive(pid) for name, pid in self.pids.items()}

    # -- start ---------------------------------------------------------------------------------
    def start(self, bin_dir: Path, log=print, timeout: float = 120.0) -> None:
        """Starts every component (each waits for the one before to answer) and installs KEDA."""
        if any(self.running().values()):
            raise UsageError(f"a control plane already runs from {self.dir}: `abq k8s down` stops it")
        self.bin = bin_dir
        started = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        (self.dir / "logs").mkdir(exist_ok=True)
        address = advertise_address()
        pki.make(self.pki, address)
        self.ports = {}
        while len(set(self.ports.values())) < len(PORTS):  # free ports, each its own
            self.ports = {n: free_port() for n in PORTS}
        self.pids = {}
        try:
            self._start_kubernetes(address, log, started + timeout)
            hooks = self._install_keda(log)
            self._start_keda(log, started + timeout, hooks)
            self._install_crds(log)
        except BaseException:
            self.stop()
            raise
        log(f"control plane ready in {time.monotonic() - started:.1f} s: {self.server}")

    def _launch(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        assert self.bin is not None
        with self.log_file(name).open("ab") as out:
            proc = subprocess.Popen(
                [str(self.bin / "bin" / name), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # `abq k8s up` returns; the components go on until `down`
            )
        self.pids[name] = proc.pid
        self._save()

    def _wait(self, name: str, ready, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not _alive(self.pids[name]):
                tail = self.log_file(name).read_text(errors="replace").splitlines()[-5:]
                raise ControlPlaneError(
                    f"{name} exited at start; the end of {self.log_file(name)}:\n" + "\n".join(tail)
                )
            if ready():
                return
            time.sleep(0.2)
        raise ControlPlaneError(f"{name} was not ready in time; see {self.log_file(name)}")

    def _start_kubernetes(self, address: str, log, deadline: float) -> None:
        p, d = self.ports, self.pki
        peer = f"http://127.0.0.1:{p['etcd-peer']}"
        log("starting etcd")
        self._launch(
            "etcd",
            [
                "--name=abq", f"--data-dir={self.dir / 'etcd'}", "--log-level=warn",
                f"--listen-client-urls=http://127.0.0.1:{p['etcd']}",
                f"--advertise-client-urls=http://127.0.0.1:{p['etcd']}",
                f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}", f"--initial-cluster=abq={peer}",
            ],
        )  # fmt: skip
        self._wait("etcd", lambda: port_open("127.0.0.1", p["etcd"]), deadline)
        log("starting kube-apiserver")
        self._launch(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
                "--bind-address=127.0.0.1", f"--secure-port={p['apiserver']}", f"--advertise-address={address}",
                f"--tls-cert-file={d / 'apiserver.crt'}", f"--tls-private-key-file={d / 'apiserver.key'}",
                f"--client-ca-file={d / 'ca.crt'}",
                f"--kubelet-client-certificate={d / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={d / 'apiserver-kubelet-client.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={d / 'sa.pub'}", f"--service-account-signing-key-file={d / 'sa.key'}",
                "--service-cluster-ip-range=10.96.0.0/16", "--authorization-mode=RBAC", "--profiling=false",
                # The aggregation layer: how the API server forwards external.metrics.k8s.io to KEDA.
                f"--requestheader-client-ca-file={d / 'front-proxy-ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={d / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={d / 'front-proxy-client.key'}",
            ],
        )  # fmt: skip
        self._kubeconfig(self.kubeconfig, "kubernetes-admin", cert="admin")
        self._wait("kube-apiserver", self._apiserver_ready, deadline)
        log("starting kube-controller-manager")
        cm = self.dir / "controller-manager.kubeconfig"
        self._kubeconfig(cm, "system:kube-controller-manager", cert="controller-manager")
        self._launch(
            "kube-controller-manager",
            [
                f"--kubeconfig={cm}", f"--authentication-kubeconfig={cm}", f"--authorization-kubeconfig={cm}",
                f"--service-account-private-key-file={d / 'sa.key'}", f"--root-ca-file={d / 'ca.crt'}",
                "--use-service-account-credentials=true", "--leader-elect=false",
                "--bind-address=127.0.0.1", f"--secure-port={p['controller-manager']}",
                f"--horizontal-pod-autoscaler-sync-period={self.hpa_sync_s}s",
            ],
        )  # fmt: skip
        self._wait("kube-controller-manager", lambda: port_open("127.0.0.1", p["controller-manager"]), deadline)

    def _apiserver_ready(self) -> bool:
        r = self.kubectl("get", "--raw=/readyz", check=False, timeout=10)
        return r.returncode == 0 and r.stdout.strip() == "ok"

    def _kubeconfig(self, path: Path, user: str, cert: str | None = None, token: str | None = None) -> None:
        creds = (
            {"client-certificate": str(self.pki / f"{cert}.crt"), "client-key": str(self.pki / f"{cert}.key")}
            if cert
            else {"token": token}
        )
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "abq-local",
                    "cluster": {"server": self.server, "certificate-authority": str(self.pki / "ca.crt")},
                }
            ],
            "users": [{"name": user, "user": creds}],
            "contexts": [{"name": "abq-local", "context": {"cluster": "abq-local", "user": user}}],
            "current-context": "abq-local",
        }
        write_private(path, yaml.safe_dump(config))  # KEDA's holds its token

    # -- KEDA ----------------------------------------------------------------------------------
    def _keda_manifests(self) -> list[dict]:
        """KEDA's own install (config/default), less the Deployments (its programs run here as
        processes), with its Services made ExternalNames to localhost and its APIService and webhooks
        pointed at the ports they listen on: without kube-proxy no ClusterIP answers."""
        assert self.bin is not None
        r = subprocess.run(
            [str(self.kubectl_path), "kustomize", str(self.bin / "keda" / "config" / "default")],
            capture_output=True,
            text=True,
            check=True,
        )
        ca = base64.b64encode((self.pki / "keda-ca.crt").read_bytes()).decode()
        out = []
        for doc in yaml.safe_load_all(r.stdout):
            if not doc or doc["kind"] == "Deployment":
                continue
            if doc["kind"] == "Service":
                doc["spec"] = {"type": "ExternalName", "externalName": "localhost"}
            elif doc["kind"] == "APIService":
                doc["spec"]["service"]["port"] = self.ports["adapter"]
                doc["spec"]["caBundle"] = ca
                doc["spec"].pop("insecureSkipTLSVerify", None)
            elif doc["kind"] == "ValidatingWebhookConfiguration":
                for hook in doc["webhooks"]:
                    path = hook["clientConfig"]["service"]["path"]
                    hook["clientConfig"] = {"url": f"https://localhost:{self.ports['webhooks']}{path}", "caBundle": ca}
                    hook["failurePolicy"] = "Fail"  # accepted means KEDA's validation passed, not that it was skipped
            out.append(doc)
        return out

    def _install_keda(self, log) -> list[dict]:
        """Installs all of KEDA's objects but its webhook configuration, which it returns: registered
        once the webhooks answer, or every write they check would fail until then."""
        log("installing KEDA's CRDs, RBAC and APIService")
        docs = self._keda_manifests()
        hooks = [d for d in docs if d["kind"] == "ValidatingWebhookConfiguration"]
        rest = [d for d in docs if d not in hooks]
        self.apply(rest)
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        token = self.kubectl("-n", NAMESPACE, "create", "token", "keda-operator", "--duration=8760h").stdout.strip()
        self._kubeconfig(self.dir / "keda.kubeconfig", "system:serviceaccount:keda:keda-operator", token=token)
        return hooks

    def _start_keda(self, log, deadline: float, hooks: list[dict]) -> None:
        p, keda = self.ports, self.pki / "keda"
        kc = str(self.dir / "keda.kubeconfig")
        env = {
            "KUBECONFIG": kc,
            "KEDA_CLUSTER_OBJECT_NAMESPACE": NAMESPACE,
            "WATCH_NAMESPACE": "",
            "POD_NAMESPACE": NAMESPACE,
        }
        log("starting KEDA: operator, metrics apiserver, admission webhooks")
        self._launch(
            "keda-operator",
            [
                "--leader-elect=false", "--enable-cert-rotation=false", f"--cert-dir={keda}",
                "--enable-webhook-patching=false", "--enable-apiservice-patching=false",
                f"--metrics-bind-address=127.0.0.1:{p['keda-metrics']}",
                f"--health-probe-bind-address=127.0.0.1:{p['keda-probe']}",
                f"--metrics-service-bind-address=127.0.0.1:{p['keda-grpc']}",
                "--zap-log-level=info", "--zap-encoder=console",
            ],
            env,
        )  # fmt: skip
        self._launch(
            "keda-adapter",
            [
                f"--secure-port={p['adapter']}", "--bind-address=127.0.0.1", f"--port={p['adapter-metrics']}",
                f"--cert-dir={keda}", f"--tls-cert-file={keda / 'tls.crt'}", f"--tls-private-key-file={keda / 'tls.key'}",
                f"--client-ca-file={self.pki / 'ca.crt'}",
                f"--lister-kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                f"--metrics-service-address=localhost:{p['keda-grpc']}", "--zap-log-level=error",
            ],
            env,
        )  # fmt: skip
        self._launch(
            "keda-webhooks",
            [
                f"--cert-dir={keda}", f"--port={p['webhooks']}",
                f"--metrics-bind-address=127.0.0.1:{p['webhooks-metrics']}",
                f"--health-probe-bind-address=127.0.0.1:{p['webhooks-probe']}",
                "--zap-log-level=info", "--zap-encoder=console",
            ],
            env,
        )  # fmt: skip
        self._wait("keda-operator", lambda: port_open("127.0.0.1", p["keda-grpc"]), deadline)
        self._wait("keda-webhooks", lambda: port_open("127.0.0.1", p["webhooks"]), deadline)
        self.apply(hooks)
        self._wait("keda-adapter", self._metrics_api_ready, deadline)

    def _metrics_api_ready(self) -> bool:
        r = self.kubectl("get", "--raw=/apis/external.metrics.k8s.io/v1beta1", check=False, timeout=10)
        return r.returncode == 0

    def _install_crds(self, log) -> None:
        """Strimzi's KafkaTopic and KafkaUser and prometheus-operator's ServiceMonitor and PrometheusRule,
        as abqueue/deploy/crds vendors them (no operator acts on them here), so that everything `abq
        deploy render` writes applies."""
        log("installing Strimzi's and prometheus-operator's CRDs")
        crds = [p for p in sorted(VENDORED_CRDS.glob("*.yaml")) if not p.name.startswith("keda")]
        self.apply("\n---\n".join(p.read_text() for p in crds))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")

    # -- use -----------------------------------------------------------------------------------
    def kubectl(self, *args: str, check: bool = True, timeout: float = 60, input: str | None = None):
        r = subprocess.run(
            [str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and r.returncode:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed: {r.stderr.strip()}")
        return r

    def apply(self, docs: dict | list[dict] | str, field_manager: str = "abq") -> str:
        """`kubectl apply --server-side` of documents (or YAML text); returns what kubectl printed."""
        text = docs if isinstance(docs, str) else yaml.safe_dump_all([docs] if isinstance(docs, dict) else docs)
        return self.kubectl(
            "apply", "--server-side", f"--field-manager={field_manager}", "--force-conflicts", "-f", "-", input=text
        ).stdout

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    # -- stop ----------------------------------------------------------------------------------
    def stop(self, grace_s: float = 5.0) -> list[str]:
        """Stops what runs, KEDA first and etcd last, each group at once: SIGTERM, then SIGKILL after
        grace_s (kube-apiserver stops listening on SIGTERM but does not exit). Returns the names it
        stopped."""
        stopped: list[str] = []
        for group in (COMPONENTS[3:], COMPONENTS[1:3], COMPONENTS[:1]):
            pids = {n: p for n in reversed(group) if (p := self.pids.get(n)) is not None and _alive(p)}
            for pid in pids.values():
                _signal(pid, signal.SIGTERM)
            end = time.monotonic() + grace_s
            while any(_alive(p) for p in pids.values()) and time.monotonic() < end:
                time.sleep(0.1)
            for pid in pids.values():
                if _alive(pid):
                    _signal(pid, signal.SIGKILL)
            end = time.monotonic() + 5
            while any(_alive(p) for p in pids.values()) and time.monotonic() < end:
                time.sleep(0.05)
            stopped += pids
        self.pids = {}
        if self.dir.exists():
            self._save()
        return stopped


def _signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # each component leads its own session
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    return not reap(pid) and alive(pid)
