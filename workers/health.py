"""The worker's HTTP endpoints: /metrics for Prometheus, /healthz and /readyz for probes."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


class Probes(ThreadingHTTPServer):
    """Serves from process start; until `worker` is set (the engine is still loading) the process is
    alive but not ready, so Kubernetes neither restarts it nor sends it traffic."""

    worker: Any = None


def serve(worker, port: int, host: str = "0.0.0.0") -> Probes:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            worker = server.worker
            if worker is None:
                body, ctype, code = b"starting: loading the engine\n", "text/plain", 200
                if self.path.startswith("/metrics"):
                    body, ctype = b"", CONTENT_TYPE_LATEST
                elif self.path.startswith("/readyz"):
                    code = 503
                elif not self.path.startswith("/healthz"):
                    body, code = b"not found; try /metrics, /healthz or /readyz\n", 404
            elif self.path.startswith("/metrics"):
                body, ctype, code = generate_latest(worker.registry), CONTENT_TYPE_LATEST, 200
            elif self.path.startswith("/healthz"):
                ok, why = worker.alive()
                body, ctype, code = why.encode(), "text/plain", 200 if ok else 503
            elif self.path.startswith("/readyz"):
                ok, why = worker.ready()
                body, ctype, code = why.encode(), "text/plain", 200 if ok else 503
            else:
                body, ctype, code = b"not found; try /metrics, /healthz or /readyz\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # probes every few seconds would drown the worker's log
            pass

    server = Probes((host, port), Handler)
    server.worker = worker
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="abq-http", daemon=True).start()
    return server
