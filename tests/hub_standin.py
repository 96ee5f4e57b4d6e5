"""A local stand-in for the Hugging Face hub (the real one is unreachable from our machines).

It serves model repositories from local directories with the few endpoints huggingface_hub uses to
download a snapshot: repository info (`/api/models/<id>[/revision/<rev>]`), the file tree
(`/api/models/<id>/tree/<rev>`) and file resolution (`/<id>/resolve/<rev>/<file>`, HEAD for metadata
and GET for content). Point HF_ENDPOINT at `url`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class HubStandIn:
    def __init__(self, repos: dict[str, Path], commit: str = "0123456789abcdef0123456789abcdef01234567"):
        self.repos, self.commit, self.requests = repos, commit, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

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

            def _serve(self, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo = "/".join(parts[2:4])
                    if repo in hub.repos:
                        root = hub.repos[repo]
                        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
                        if len(parts) >= 5 and parts[4] == "tree":  # file listing, one page
                            tree = [{"type": "file", "path": f, "size": (root / f).stat().st_size,
                                     "oid": hashlib.sha1((root / f).read_bytes()).hexdigest()} for f in files]
                            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
                        info = {"id": repo, "modelId": repo, "sha": hub.commit, "siblings": [{"rfilename": f} for f in files]}
                        return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, file = "/".join(parts[:2]), "/".join(parts[4:])
                    local = hub.repos.get(repo, Path("/nonexistent")) / file
                    if local.is_file():
                        body = local.read_bytes()
                        etag = hashlib.sha256(body).hexdigest()
                        headers = {"X-Repo-Commit": hub.commit, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
                        return self._send(200, body, headers, head)
                self._send(404, b'{"error": "not found"}', {"Content-Type": "application/json", "X-Error-Code": "EntryNotFound"}, head)

            def do_GET(self):
                self._serve(head=False)

            def do_HEAD(self):
                self._serve(head=True)

        return Handler
