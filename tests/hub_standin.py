"""A local stand-in for the Hugging Face hub (the real one is unreachable from our machines).

It serves model and dataset repositories from local directories with the few endpoints that
huggingface_hub and datasets use to download them: repository info (`/api/{models,datasets}/<id>[/...]`),
the file tree (`/api/.../<id>/tree/<rev>[/<folder>]`) and file resolution (`[datasets/]<id>/resolve/<rev>/<file>`,
HEAD for metadata and GET for content). Point HF_ENDPOINT at `url`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from hpclora.catalog.hub import OFFLINE_VARS


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


@contextmanager
def staged_offline_job(tmp_path: Path, model_dir: Path, image: Path, shared: Path | None = None, **sections):
    """A run whose model and dataset live on a hub stand-in, staged with `hpclora stage` into cache.hf_home
    (jobs offline), to run inside the container `image` (tests/apptainer/image.py). Its run directories, HF cache and
    logs are under `shared` (default: tmp_path). Yields (config path, the stand-in still serving, the submitting
    shell's environment: no HF_HOME and no offline switches of its own, HF_ENDPOINT at the stand-in, this
    interpreter's `hpclora` on PATH). A job that asks the hub shows in `hub.requests`; one that misses the cache fails."""
    from conftest import alpaca_rows, tiny_run_yaml, write_jsonl

    shared = shared or tmp_path
    data_repo = tmp_path / "data-repo"
    data_repo.mkdir()
    write_jsonl(data_repo / "train.jsonl", alpaca_rows(12))
    container = {"image": str(image), "env": {"HPCLORA_IN_IMAGE": "yes"}, **sections.pop("container", {})}
    cfg = tiny_run_yaml(
        tmp_path, model_dir, model={"name": "lab/tiny-llama"}, data={"path": "lab/tiny-data"},
        run={"output_root": str(shared / "runs")}, slurm={"log_dir": str(shared / "logs")},
        cache={"hf_home": str(shared / "hf"), "offline_jobs": True}, container=container, **sections,
    )
    with HubStandIn({"lab/tiny-llama": model_dir}, {"lab/tiny-data": data_repo}) as hub:
        env = {key: value for key, value in os.environ.items() if key not in ("HF_HOME", *OFFLINE_VARS)}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        staged = subprocess.run([sys.executable, "-m", "hpclora", "stage", str(cfg)], env=env, capture_output=True, text=True)
        assert staged.returncode == 0, staged.stderr
        hub.requests.clear()
        yield cfg, hub, env
