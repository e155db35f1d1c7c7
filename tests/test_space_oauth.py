"""The app started as a Space starts it: with Sign-in on, the OAuth variables a Space injects, and
the scopes the README's metadata asks for.

A Space with ``hf_oauth: true`` runs ``app.py`` with ``SYSTEM=spaces``, ``SPACE_ID``, ``OAUTH_CLIENT_ID``,
``OAUTH_CLIENT_SECRET``, ``OAUTH_SCOPES`` ("openid profile" plus ``hf_oauth_scopes``) and
``OPENID_PROVIDER_URL`` set. Gradio then needs its ``oauth`` extra (authlib, itsdangerous) to
start at all, and its login route sends the visitor to the provider with those scopes. This test
runs that start in a subprocess, with a small OpenID provider on 127.0.0.1 standing in for the
Hub's, so a missing ``gradio[oauth]`` or a widened scope fails here, not on the Space.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# The least privilege the app needs: read what the visitor may read, create and write only the
# repos it makes (contribute-repos); never write-repos or manage-repos (those reach every repo).
LEAST_PRIVILEGE = ["read-repos", "contribute-repos"]


def space_metadata() -> dict:
    """The README's YAML front matter, which the Space reads its settings from."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Provider(BaseHTTPRequestHandler):
    """An OpenID provider's discovery document, the only thing the login route fetches."""

    def log_message(self, format, *args):  # noqa: A002 - keep the test output quiet
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        base = f"http://127.0.0.1:{self.server.server_port}"
        if self.path != "/.well-known/openid-configuration":
            self.send_error(404)
            return
        body = json.dumps({"issuer": base, "authorization_endpoint": f"{base}/oauth/authorize",
                           "token_endpoint": f"{base}/oauth/token", "userinfo_endpoint": f"{base}/oauth/userinfo",
                           "jwks_uri": f"{base}/oauth/jwks"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_space_metadata_asks_for_least_privilege():
    meta = space_metadata()
    assert meta["hf_oauth"] is True and meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert meta["hf_oauth_scopes"] == LEAST_PRIVILEGE


def test_app_starts_as_a_space_with_sign_in(tmp_path):
    """app.py under a Space's environment: the page serves, Sign-in is on, and the login route
    redirects to the provider asking exactly for the metadata's scopes."""
    provider = ThreadingHTTPServer(("127.0.0.1", 0), _Provider)
    threading.Thread(target=provider.serve_forever, daemon=True).start()
    port = _free_port()
    scopes = "openid profile " + " ".join(space_metadata()["hf_oauth_scopes"])
    env = {**os.environ, "SYSTEM": "spaces", "SPACE_ID": "alice/rawtune", "SPACE_HOST": f"127.0.0.1:{port}",
           "OAUTH_CLIENT_ID": "emulated-client", "OAUTH_CLIENT_SECRET": "emulated-secret",
           "OAUTH_SCOPES": scopes, "OPENID_PROVIDER_URL": f"http://127.0.0.1:{provider.server_port}",
           "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False",
           "RAWTUNE_RUNS": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_TOKEN", None)
    log = tmp_path / "app.log"
    with open(log, "wb") as out:
        app = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=tmp_path, env=env, stdout=out,
                               stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        config = _wait_for(f"{base}/config", app, log)
        assert "Sign in with Hugging Face" in config, "the page has no Sign-in button"
        opener = urllib.request.build_opener(_NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as answer:
            opener.open(f"{base}/login/huggingface", timeout=30)
        assert answer.value.code in (302, 307), log.read_text(errors="replace")[-2000:]
        location = urllib.parse.urlparse(answer.value.headers["Location"])
        query = urllib.parse.parse_qs(location.query)
        assert f"{location.scheme}://{location.netloc}{location.path}" == \
            f"http://127.0.0.1:{provider.server_port}/oauth/authorize"
        assert query["client_id"] == ["emulated-client"]
        assert query["scope"][0].split() == ["openid", "profile", *LEAST_PRIVILEGE]
    finally:
        app.terminate()
        app.wait(timeout=30)
        provider.shutdown()


def _wait_for(url: str, app: subprocess.Popen, log: Path, seconds: float = 180) -> str:
    """The page's text once the app answers; the app's own output if it exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if app.poll() is not None:
            pytest.fail(f"app.py exited with {app.returncode} before serving:\n"
                        f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as page:
                return page.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"app.py did not answer within {seconds:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")
