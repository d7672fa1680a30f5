"""An HTTP endpoint for MLflow registry webhooks (MLflow >= 3.3), used only as a hint.

MLflow signs each delivery: header ``X-MLflow-Signature: v1,<base64 HMAC-SHA256>`` over
``f"{delivery_id}.{timestamp}.{body}"`` with the webhook's secret, plus
``X-MLflow-Delivery-Id`` and ``X-MLflow-Timestamp`` (unix seconds). A delivery whose
signature does not verify, or whose timestamp is further than ``max_skew_s`` from our
clock (a replay), is refused with 401; a missing or malformed ``Content-Length`` gets
400 and a body above ``MAX_BODY`` 413, both before any verification. A valid delivery
(200, sent only after the hint is registered) only wakes the reconcile loop: the
payload is not trusted for *what* to deploy (the pass reads the registry itself), and
webhooks are best effort (no stage-transition event, no persistent queue), so the poll
still guarantees convergence.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["WebhookServer", "sign_delivery", "verify_delivery"]

log = logging.getLogger(__name__)
MAX_BODY = 1024 * 1024  # bytes
_DIGITS = re.compile(r"[0-9]{1,12}")  # ASCII only: str.isdigit() accepts "²", int() does not


def sign_delivery(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify_delivery(
    secret: str,
    *,
    signature: str | None,
    delivery_id: str | None,
    timestamp: str | None,
    body: bytes,
    now: float,
    max_skew_s: float,
) -> bool:
    if not signature or not delivery_id or not timestamp or not _DIGITS.fullmatch(timestamp):
        return False
    if abs(now - int(timestamp)) > max_skew_s:
        return False
    expected = sign_delivery(secret, delivery_id, timestamp, body)
    return hmac.compare_digest(expected.encode(), signature.encode())


class WebhookServer:
    """Runs in a daemon thread; calls ``on_hint()`` for every verified delivery."""

    def __init__(
        self,
        host: str,
        port: int,
        secret: str,
        on_hint: Callable[[], None],
        max_skew_s: float = 300.0,
    ) -> None:
        self.hints = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10.0  # per socket read: a client that stalls mid-body frees its thread

            def do_POST(self) -> None:
                raw_length = self.headers.get("Content-Length")
                if raw_length is None or not _DIGITS.fullmatch(raw_length):
                    # read(-1) would block until the client closes: never guess a length
                    self._refuse(400)
                    return
                length = int(raw_length)
                if length > MAX_BODY:
                    self._refuse(413)
                    return
                try:
                    body = self.rfile.read(length)
                except TimeoutError:
                    self.close_connection = True
                    return
                ok = verify_delivery(
                    secret,
                    signature=self.headers.get("X-MLflow-Signature"),
                    delivery_id=self.headers.get("X-MLflow-Delivery-Id"),
                    timestamp=self.headers.get("X-MLflow-Timestamp"),
                    body=body,
                    now=time.time(),
                    max_skew_s=max_skew_s,
                )
                if ok:
                    # Before the response: a 200 means the reconcile loop has been woken.
                    outer.hints += 1
                    on_hint()
                self.send_response(200 if ok else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _refuse(self, code: int) -> None:
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                log.debug("webhook: " + format, *args)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="sync-webhook", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
