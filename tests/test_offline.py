"""A hub model that cannot be fetched is exit 2 before anything runs: one line naming it and what to do."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO, write_jsonl

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the README's first single-job example
NO_NETWORK = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused at once


def _sdbatch(tmp_path: Path, *args: str, offline: bool) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "empty-hf-home"), HF_ENDPOINT=NO_NETWORK, PYTHONPATH=str(REPO))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "batch.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    return done, time.perf_counter() - started


def _refused_before_anything_ran(done: subprocess.CompletedProcess, seconds: float, out: Path) -> str:
    assert done.returncode == 2, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and SD15 in errors[0], done.stderr
    assert SD15 not in done.stderr.replace(errors[0], ""), f"the model is named on more than one line:\n{done.stderr}"
    assert "hf download" in errors[0], errors[0]  # says what to do
    assert not list((out / "images").glob("*")) and not (out / "checkpoint.sqlite").exists(), sorted(out.rglob("*"))
    assert seconds < 30, f"took {seconds:.1f}s"
    return errors[0]


@pytest.mark.parametrize("offline", [False, True], ids=["HF_HUB_OFFLINE-unset", "HF_HUB_OFFLINE=1"])
def test_uncached_hub_model_without_network_is_one_line_exit_2(tmp_path, offline):
    out = tmp_path / "out"
    done, seconds = _sdbatch(tmp_path, "--prompt", "a red fox in snow", "--num", "2", "--steps", "30", "--cfg", "7",
                             "--seed", "42", "--width", "512", "--height", "768", "--model", SD15,
                             "--device", "cpu", "--out", str(out), offline=offline)
    error = _refused_before_anything_ran(done, seconds, out)
    assert ("HF_HUB_OFFLINE" in error) == offline, error
    assert offline or NO_NETWORK in error, error  # online: says which Hub it could not reach


def test_validate_catches_an_uncached_hub_model(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "prompt": "a red fox"}])
    done, seconds = _sdbatch(tmp_path, "validate", str(manifest), "--model", SD15, "--device", "cpu", offline=False)
    _refused_before_anything_ran(done, seconds, tmp_path / "out")


def _resolve(tmp_path: Path, name: str, endpoint: str = NO_NETWORK) -> subprocess.CompletedProcess:
    code = f"from batch.models import resolve_model; s = resolve_model({name!r}); print(s.kind, s.location)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "empty-hf-home"), HF_ENDPOINT=endpoint, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def test_cached_hub_model_resolves_without_network(tmp_path):
    # A cache entry as huggingface_hub writes one: refs/main names a snapshot holding model_index.json.
    entry = tmp_path / "empty-hf-home" / "hub" / "models--someone--cached-model"
    (entry / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (entry / "snapshots" / ("0" * 40) / "model_index.json").write_text("{}")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)
    done = _resolve(tmp_path, "someone/cached-model")
    assert done.returncode == 0 and done.stdout.strip() == "hub someone/cached-model", done.stderr


@pytest.fixture
def fake_hub():
    """A local Hub that knows one model, answering model_info as huggingface.co does."""

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):
            known = self.path.startswith("/api/models/someone/known")
            body = json.dumps({"id": "someone/known", "sha": "0" * 40} if known else {"error": "Repository not found"})
            self.send_response(200 if known else 404)
            if not known:
                self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_hub_is_asked_when_a_model_is_not_cached(tmp_path, fake_hub):
    known = _resolve(tmp_path, "someone/known", fake_hub)
    assert known.returncode == 0 and known.stdout.strip() == "hub someone/known", known.stderr
    unknown = _resolve(tmp_path, "someone/no-such-model", fake_hub)
    assert unknown.returncode == 1 and "Traceback" in unknown.stderr  # a bare resolve_model call: the ModelError
    message = unknown.stderr.strip().splitlines()[-1]
    assert "someone/no-such-model" in message and "no such model on the Hugging Face Hub" in message, message
