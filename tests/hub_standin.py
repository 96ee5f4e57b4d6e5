"""A local stand-in for the Hugging Face hub (the real one is unreachable from our machines).

It serves model and dataset repositories from local directories with the few endpoints that
huggingface_hub and datasets use to download them: repository info (`/api/{models,datasets}/<id>[/...]`),
the file tree (`/api/.../<id>/tree/<rev>[/<folder>]`) and file resolution (`[datasets/]<id>/resolve/<rev>/<file>`,
HEAD for metadata and GET for content). Point HF_ENDPOINT at `url`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class HubStandIn:
    def __init__(self, models: dict[str, Path], datasets: dict[str, Path] | None = None,
                 commit: str = "0123456789abcdef0123456789abcdef01234567"):
        self.repos = {("models", k): v for k, v in models.items()} | {("datasets", k): v for k, v in (datasets or {}).items()}
        self.commit, self.requests = commit, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, kind: str, repo: str) -> list[str]:
        root = self.repos[(kind, repo)]
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict, head: bool) -> None:
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, value, head: bool) -> None:
                self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"}, head)

            def _serve(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                parts = path.strip("/").split("/")
                if parts[0] == "api" and len(parts) >= 4 and (parts[1], "/".join(parts[2:4])) in hub.repos:
                    kind, repo = parts[1], "/".join(parts[2:4])
                    root, files = hub.repos[(kind, repo)], hub.files(kind, repo)
                    if len(parts) >= 6 and parts[4] == "tree":  # file listing of a folder, one page
                        prefix = "/".join(parts[6:])
                        entries = [f for f in files if f.startswith(prefix.rstrip("/") + "/" if prefix else "")]
                        return self._json([{"type": "file", "path": f, "size": (root / f).stat().st_size,
                                            "oid": hashlib.sha1((root / f).read_bytes()).hexdigest()} for f in entries], head)
                    info = {"id": repo, "sha": hub.commit, "private": False, "siblings": [{"rfilename": f} for f in files]}
                    return self._json(info, head)
                kind = "datasets" if parts[0] == "datasets" else "models"
                parts = parts[1:] if kind == "datasets" else parts
                if len(parts) >= 5 and parts[2] == "resolve" and (kind, "/".join(parts[:2])) in hub.repos:
                    local = hub.repos[(kind, "/".join(parts[:2]))] / "/".join(parts[4:])
                    if local.is_file():
                        body = local.read_bytes()
                        headers = {"X-Repo-Commit": hub.commit, "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                                   "Content-Type": "application/octet-stream"}
                        return self._send(200, body, headers, head)
                self._send(404, b'{"error": "not found"}', {"Content-Type": "application/json", "X-Error-Code": "EntryNotFound"}, head)

            def do_GET(self):
                self._serve(head=False)

            def do_HEAD(self):
                self._serve(head=True)

            def do_POST(self):
                self._serve(head=False)

        return Handler
