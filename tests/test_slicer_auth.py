# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Log-in of the panel against the real MedAttnSlicer MONAI Label server started with authentication enabled.

MONAI Label 0.8.5 delegates authentication to an OpenID Connect realm (Keycloak in production):
``POST /auth/token`` forwards the user name and password to the realm's token endpoint, and every protected
endpoint checks the bearer token's RS256 signature against the realm's public key. No Keycloak runs here, so the
test plays the realm (an external service, not one of our components): a small HTTP server with an RSA key that
answers MONAI Label's three requests (realm public key, OpenID configuration, password grant). Everything on the
MedAttnSlicer side is real: the server process with ``MONAI_LABEL_AUTH_ENABLE=true``, its endpoints, the client and
the panel's connect workflow.

What MONAI Label 0.8.5 cannot do here: accept any token. Its ``from_token`` calls ``jwt.decode`` without
``algorithms``, which PyJWT 2 (the version installed with it) refuses, so every protected endpoint answers 401
"Could not validate credentials" even for the token the server itself just issued. The tests therefore show the
log-in, that the token reaches the server with every request (the server's own log of each refused decode), and
that the panel says what happened instead of a bare 401; a header test on a local server shows the client sends
the token on every kind of request and drops it on log-out.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from MedAttnSlicerLib import JobRunner, JobState, MedAttnClientError, MonaiLabelClient, ServerError, workflows
from tests.server_fixture import copy_sample_datastore, start_server

USER, PASSWORD = "annotator", "correct horse"
ROLES = ["monailabel-admin", "monailabel-reviewer", "monailabel-annotator", "monailabel-user"]


class Realm:
    """The OpenID realm MONAI Label asks: public key, token endpoint, password grant for one user."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public_der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key = base64.b64encode(public_der).decode()
        self.grants: list[str] = []
        realm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/realms/test":
                    self._json(200, {"realm": "test", "public_key": realm.public_key})
                elif self.path == "/realms/test/.well-known/openid-configuration":
                    self._json(200, {"token_endpoint": f"{realm.url}/protocol/openid-connect/token"})
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self):
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                user, password = form.get("username", [""])[0], form.get("password", [""])[0]
                realm.grants.append(user)
                if form.get("grant_type") != ["password"] or (user, password) != (USER, PASSWORD):
                    self._json(401, {"error": "invalid_grant", "error_description": "Invalid user credentials"})
                    return
                self._json(200, {"access_token": realm.token(user), "token_type": "bearer"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/realms/test"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, user: str, lifetime_s: float = 3600.0) -> str:
        claims = {"preferred_username": user, "realm_access": {"roles": ROLES}, "exp": int(time.time() + lifetime_s)}
        return jwt.encode(claims, self.key, algorithm="RS256")


@pytest.fixture(scope="module")
def realm():
    realm = Realm()
    yield realm
    realm.server.shutdown()


@pytest.fixture(scope="module")
def auth_server(realm, tmp_path_factory):
    studies = copy_sample_datastore(tmp_path_factory.mktemp("studies"))
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.url}
    conf = {"models": "all", "model_dir": str(tmp_path_factory.mktemp("trained"))}
    log = tmp_path_factory.mktemp("log") / "server.log"
    # this server answers GET /info/ only with a token (see the module docstring): wait for the unprotected /auth/
    handle = start_server(studies, conf, env=env, log_path=log, ready_path="/auth/")
    with handle:
        yield handle


def _connect(client: MonaiLabelClient, username: str = "", password: str = "") -> dict:
    """The panel's Connect job (worker thread, events delivered by poll)."""
    runner = JobRunner()
    job = runner.wait(runner.submit("connect", workflows.connect, client, username, password), timeout_s=120)
    if job.state == JobState.FAILED:
        raise job.error
    return job.result


def test_server_refuses_requests_without_a_token(auth_server):
    client = MonaiLabelClient(auth_server.url)
    assert client.auth_enabled() is True
    with pytest.raises(ServerError) as refused:
        client.info()
    assert refused.value.status == 401


def test_connect_asks_for_a_log_in_when_the_server_needs_one(auth_server):
    with pytest.raises(MedAttnClientError, match="asks for a log-in: enter your user name and password"):
        _connect(MonaiLabelClient(auth_server.url))


def test_wrong_password_is_refused_and_leaves_no_token(auth_server, realm):
    client = MonaiLabelClient(auth_server.url)
    with pytest.raises(MedAttnClientError, match=f"Log-in as '{USER}' was refused"):
        _connect(client, USER, "wrong")
    assert client.auth_token is None
    assert realm.grants[-1] == USER  # the server really asked the realm


def _refused_decodes(server) -> int:
    """How many presented tokens the server tried and failed to decode (its log, one line each)."""
    return server.log_path.read_text(errors="replace").count('pass in a value for the "algorithms" argument')


def test_log_in_gets_the_servers_token_and_sends_it(auth_server, realm, tmp_path):
    client = MonaiLabelClient(auth_server.url, download_dir=str(tmp_path))
    token = client.login(USER, PASSWORD)
    assert client.auth_token == token
    claims = jwt.decode(token, realm.key.public_key(), algorithms=["RS256"])  # issued by the realm, via the server
    assert claims["preferred_username"] == USER
    before = _refused_decodes(auth_server)
    with pytest.raises(ServerError) as refused:
        client.info()
    assert refused.value.status == 401
    assert _refused_decodes(auth_server) == before + 1  # the token reached the server's check
    client.logout()
    with pytest.raises(ServerError):
        client.info()
    assert _refused_decodes(auth_server) == before + 1  # no token sent after log-out: nothing to decode


def test_connect_says_when_the_server_refuses_its_own_token(auth_server):
    client = MonaiLabelClient(auth_server.url)
    with pytest.raises(MedAttnClientError, match=f"logged '{USER}' in but refuses the token it issued"):
        _connect(client, USER, PASSWORD)
    assert client.auth_token  # kept in memory for the next try; never written anywhere


def test_client_sends_the_token_with_every_request(tmp_path):
    """On a server that accepts tokens: JSON calls, uploads and downloads all carry it; log-out stops that."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, body: bytes, content_type="application/json", filename=None):
            seen.append((self.command, self.path.split("?")[0], self.headers.get("Authorization")))
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            if filename:
                self.send_header("Content-Disposition", f'attachment; filename="{filename}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.startswith("/datastore/image"):
                self._answer(b"\x00" * 1000, "application/octet-stream", "image.nii.gz")
            else:
                self._answer(json.dumps({"enabled": True, "models": {}}).encode())

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._answer(json.dumps({"access_token": "the-token", "token_type": "bearer"}).encode())

        def do_PUT(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._answer(json.dumps({"image": "uploaded"}).encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = MonaiLabelClient(f"http://127.0.0.1:{server.server_address[1]}", download_dir=str(tmp_path))
        _connect(client, USER, PASSWORD)
        image = tmp_path / "upload.nii.gz"
        image.write_bytes(b"\x01" * 100)
        client.upload_image(str(image))
        client.download_image("image")
        client.logout()
        client.info()
    finally:
        server.shutdown()
    assert seen[0] == ("GET", "/auth/", None) and seen[1] == ("POST", "/auth/token", None)
    assert [entry[2] for entry in seen[2:-1]] == ["Bearer the-token"] * 3, seen  # /info/, upload, download
    assert seen[-1] == ("GET", "/info/", None)
