"""`abq k8s up|down|status`: a local Kubernetes control plane with KEDA, to apply what `abq deploy
render` writes and watch KEDA and the HPA scale it on a broker's lag (abqueue/k8s/controlplane.py)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from abqueue.cli.exits import OK, ExitCode
from abqueue.errors import UsageError

NOT_RUNNING = ExitCode(3, "`k8s status`: a component of the control plane is not running")


def register(sub) -> None:
    p = sub.add_parser(
        "k8s",
        help="run a local Kubernetes control plane with KEDA (no kubelet: the API server, KEDA and the HPA)",
        description="Builds etcd, kube-apiserver, kube-controller-manager and KEDA from the Go modules pinned "
        "under controlplane/ (once, ~25 minutes on 2 cores; cached), then runs them as local processes.",
    )
    ksub = p.add_subparsers(dest="k8s_cmd", required=True, metavar="{up,down,status,env}")
    for name, help_ in (
        ("up", "build (once) and start the control plane and KEDA, and print how to reach them"),
        ("down", "stop every component; the state directory stays for the next `up`"),
        ("status", "each component and whether it runs (exit 0 if all do, 3 if not)"),
        ("env", 'print the shell lines that point kubectl at the cluster: eval "$(abq k8s env)"'),
    ):
        sp = ksub.add_parser(name, help=help_, description=help_)
        sp.add_argument(
            "--dir",
            type=Path,
            default=None,
            help="state directory: certificates, etcd's data, kubeconfigs, logs (env ABQ_K8S_DIR; default "
            "~/.local/state/abqueue/k8s)",
        )
        if name == "up":
            sp.add_argument(
                "--hpa-sync",
                type=int,
                default=15,
                metavar="SECONDS",
                help="the HPA controller's sync period (default 15, Kubernetes' own)",
            )
            sp.add_argument("--fresh", action="store_true", help="delete the state directory first: a new cluster")
        sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shutil

    from abqueue.k8s.controlplane import COMPONENTS, ControlPlane, build, default_dir

    d = args.dir or default_dir()
    cp = ControlPlane.load(d)
    if args.k8s_cmd == "env":
        if cp.bin is None:
            raise UsageError(f"no control plane was started from {d}: `abq k8s up` first")
        # The cluster admin's kubeconfig, and kubectl of the server's version first on PATH.
        print(f"export KUBECONFIG={shlex.quote(str(cp.kubeconfig))}")
        print(f'export PATH={shlex.quote(str(cp.bin / "path"))}:"$PATH"')
        return OK
    if args.k8s_cmd == "down":
        stopped = cp.stop()
        print(f"stopped {', '.join(stopped)}" if stopped else f"nothing was running from {d}")
        return OK
    if args.k8s_cmd == "status":
        running = cp.running()
        for name in COMPONENTS:
            state = "running" if running.get(name) else "not running"
            print(f"{name:<24} {state}" + (f" (pid {cp.pids[name]})" if running.get(name) else ""))
        if cp.ports:
            print(f"API server: {cp.server}; kubeconfig: {cp.kubeconfig}")
        return OK if running and all(running.get(n) for n in COMPONENTS) else NOT_RUNNING
    if any(cp.running().values()):
        raise UsageError(f"a control plane already runs from {d}: `abq k8s down` first (or `abq k8s status`)")
    if args.fresh and d.exists():
        shutil.rmtree(d)
    bin_dir = build()
    cp = ControlPlane(dir=d, hpa_sync_s=args.hpa_sync)
    cp.start(bin_dir)
    print(
        f'kubectl: eval "$(abq k8s env{f" --dir {args.dir}" if args.dir else ""})" (the admin\'s kubeconfig {cp.kubeconfig})'
    )
    print(f"logs: {d / 'logs'}; stop with: abq k8s down" + (f" --dir {args.dir}" if args.dir else ""))
    return OK
