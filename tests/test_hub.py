"""Tests for drrl_env.hub: the one bounded check of the Hugging Face hub, against local servers."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from drrl_env import data, hub


class SilentServer:
    """Accepts TCP connections and never answers, or (``trickle``) answers a byte at a time."""

    def __init__(self, trickle: bool = False) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.trickle = trickle
        self.accepted: list[socket.socket] = []
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                continue
            self.accepted.append(connection)
            if self.trickle:
                threading.Thread(target=self._drip, args=(connection,), daemon=True).start()

    def _drip(self, connection: socket.socket) -> None:
        stream = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000
        for byte in stream:
            if self.stopped.wait(0.1):
                return
            try:
                connection.sendall(bytes([byte]))
            except OSError:
                return

    def close(self) -> None:
        self.stopped.set()
        for connection in self.accepted:
            connection.close()
        self.listener.close()


class CountingServer:
    """A real HTTP server answering every HEAD with ``status``; counts the requests."""

    def __init__(self, status: int = 200) -> None:
        counter = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # noqa: N802 (http.server's spelling)
                counter.requests += 1
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.requests = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def fresh_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Online by the environment, nothing remembered before or after."""
    for var in (*hub.OFFLINE_VARS, hub.ENDPOINT_VAR):
        monkeypatch.delenv(var, raising=False)
    hub.clear_hub_cache()
    yield
    hub.clear_hub_cache()


@pytest.fixture
def silent(monkeypatch: pytest.MonkeyPatch) -> Iterator[SilentServer]:
    server = SilentServer()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.close()


@pytest.fixture
def answering(monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingServer]:
    server = CountingServer()
    monkeypatch.setenv("HF_ENDPOINT", server.url + "/")
    yield server
    server.close()


def _timed(timeout: float) -> tuple[bool, float]:
    start = time.monotonic()
    answer = hub.hub_reachable(timeout)
    return answer, time.monotonic() - start


# --- bounded time --------------------------------------------------------------------------


def test_silent_server_gives_false_within_timeout(silent: SilentServer) -> None:
    answer, elapsed = _timed(1.0)
    assert answer is False
    assert elapsed < 1.0 + 1.0
    assert silent.accepted, "the check must really connect to HF_ENDPOINT"
    assert "did not answer within 1 s" in hub.unreachable_reason()


def test_trickling_server_gives_false_within_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    server = SilentServer(trickle=True)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        answer, elapsed = _timed(1.0)
    finally:
        server.close()
    assert answer is False and elapsed < 2.0  # each byte comes before a socket timeout


def test_refused_port_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    answer, elapsed = _timed(2.0)
    assert answer is False and elapsed < 2.0
    assert "could not be reached" in hub.hub_status(2.0).reason


def test_server_error_is_unreachable_but_client_error_is_an_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for status, expected in ((503, False), (404, True)):
        hub.clear_hub_cache()
        server = CountingServer(status)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        try:
            result = hub.hub_status(2.0)
        finally:
            server.close()
        assert result.reachable is expected and server.requests == 1
        assert ("HTTP 503" in result.reason) is (status == 503)


# --- answers and memory --------------------------------------------------------------------


def test_answering_server_is_reachable_and_remembered(answering: CountingServer) -> None:
    assert hub.hub_reachable(2.0) is True
    assert hub.hub_endpoint() == answering.url  # trailing slash dropped
    assert hub.hub_reachable(2.0) is True
    assert answering.requests == 1
    hub.clear_hub_cache()
    assert hub.hub_reachable(2.0) is True and answering.requests == 2


def test_remembered_answer_expires(answering: CountingServer) -> None:
    assert hub.hub_reachable(2.0)
    endpoint = hub.hub_endpoint()
    when, status = hub._remembered[endpoint]
    hub._remembered[endpoint] = (when - hub.REMEMBER_S - 1, status)  # as if long ago
    assert hub.hub_reachable(2.0) and answering.requests == 2


def test_negative_answer_reused_only_for_shorter_waits(silent: SilentServer) -> None:
    assert _timed(0.5)[0] is False
    answer, elapsed = _timed(0.5)
    assert answer is False and elapsed < 0.25 and len(silent.accepted) == 1
    answer, elapsed = _timed(0.8)  # a longer wait probes again
    assert answer is False and elapsed >= 0.7


def test_old_names_share_the_check(answering: CountingServer) -> None:
    models = pytest.importorskip("drrl_env.lm.models")
    assert data.hub_reachable is hub.hub_reachable
    assert models.hub_reachable(2.0) is True
    assert data.hub_reachable(2.0) is True
    assert answering.requests == 1  # the second name reused the first answer


# --- offline variables and bad settings ----------------------------------------------------


@pytest.mark.parametrize("var", hub.OFFLINE_VARS)
@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_offline_vars_short_circuit(
    var: str, value: str, answering: CountingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(var, value)
    monkeypatch.setattr(hub, "_probe", pytest.fail)
    answer, elapsed = _timed(3.0)
    assert answer is False and elapsed < 0.1
    assert hub.unreachable_reason() == f"{var} is set"
    assert answering.requests == 0


@pytest.mark.parametrize("value", ["0", "false", ""])
def test_false_offline_values_do_not_block(
    value: str, answering: CountingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub.hub_reachable(2.0) and answering.requests == 1


def test_offline_var_wins_over_a_remembered_yes(
    answering: CountingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert hub.hub_reachable(2.0)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert not hub.hub_reachable(2.0)


def test_endpoint_must_be_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "huggingface.co")
    monkeypatch.setattr(hub, "_probe", pytest.fail)
    status = hub.hub_status()
    assert not status.reachable and "HF_ENDPOINT='huggingface.co'" in status.reason


@pytest.mark.parametrize("timeout", [0, -1.0, "3", True, None])
def test_bad_timeout(timeout: object) -> None:
    with pytest.raises(ValueError, match="timeout"):
        hub.hub_reachable(timeout)  # type: ignore[arg-type]


# --- per-request bounds of later hub calls -------------------------------------------------


def test_bounded_timeouts_set_and_restore(monkeypatch: pytest.MonkeyPatch) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    for var in hub.REQUEST_TIMEOUT_VARS:
        monkeypatch.delenv(var, raising=False)
    before = {var: getattr(constants, var) for var in hub.REQUEST_TIMEOUT_VARS}
    with hub.bounded_hub_timeouts(4.2):
        for var in hub.REQUEST_TIMEOUT_VARS:
            assert os.environ[var] == "5" and getattr(constants, var) == 5
    for var in hub.REQUEST_TIMEOUT_VARS:
        assert var not in os.environ and getattr(constants, var) == before[var]


def test_bounded_timeouts_keep_user_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "60")
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT", raising=False)
    with hub.bounded_hub_timeouts():
        assert os.environ["HF_HUB_ETAG_TIMEOUT"] == "60"
        assert os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] == "5"
    assert os.environ["HF_HUB_ETAG_TIMEOUT"] == "60"
    assert "HF_HUB_DOWNLOAD_TIMEOUT" not in os.environ


def test_bounded_timeouts_restore_after_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT", raising=False)
    with pytest.raises(RuntimeError), hub.bounded_hub_timeouts(2):
        raise RuntimeError("hub call failed")
    assert "HF_HUB_DOWNLOAD_TIMEOUT" not in os.environ
    with pytest.raises(ValueError, match="timeout"), hub.bounded_hub_timeouts(0):
        pass
