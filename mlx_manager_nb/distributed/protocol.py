"""The channel between the kernel and rank 0 of a sharded model: line-delimited JSON over localhost TCP.

Rank 0 connects to a socket the kernel listens on (127.0.0.1, a free port) and speaks first.

rank 0 -> kernel:
    {"event": "hello", "token": T}           proves it was started by this kernel (T from MLX_NB_DIST_TOKEN)
    {"event": "ready", "ranks": [{"rank", "pid", "weight_bytes"}, ...]}
    {"event": "ranks", "ranks": [{"rank", "active_bytes", "peak_bytes", "sequences"}, ...]}   every few seconds
    {"event": "delta", "id": I, "text": S}
    {"event": "done", "id": I, "finish_reason", "stop", "prompt_tokens", "completion_tokens", "cached_tokens", "ttft"}
    {"event": "failed", "id": I, "error": S}
    {"event": "fatal", "error": S}           the worker cannot go on (load failed, a collective broke)
kernel -> rank 0:
    {"op": "submit", "id": I, "prompt": [token ids], "params": {GenParams fields}}
    {"op": "cancel", "id": I, "reason": "cancelled" | "timeout"}
    {"op": "stop"}
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict
from typing import Any

from ..engine import Done, Event, Failed
from ..params import GenParams

TOKEN_ENV = "MLX_NB_DIST_TOKEN"


def encode_params(p: GenParams) -> dict:
    return asdict(p)


def decode_params(d: dict) -> GenParams:
    """The GenParams rank 0 received: already validated by the kernel's pool."""
    return GenParams(**{**d, "stop": tuple(d["stop"]), "logit_bias": tuple(tuple(pair) for pair in d["logit_bias"])})


def event_message(request_id: str, event: Event) -> dict:
    """The line an engine event becomes (``duration`` is left out: the kernel measures its own)."""
    if isinstance(event, Done):
        fields = asdict(event)
        fields.pop("duration")
        return {"event": "done", "id": request_id, **fields}
    if isinstance(event, Failed):
        return {"event": "failed", "id": request_id, "error": str(event.error) or type(event.error).__name__}
    return {"event": "delta", "id": request_id, "text": event.text}


def send(sock: socket.socket, message: dict) -> None:
    sock.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")


class LineReader:
    """Whole JSON lines from a socket; :meth:`read` returns None at end of stream."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def read(self) -> list[Any] | None:
        """The complete lines that one ``recv`` brings (may be none: a timeout or a partial line)."""
        try:
            chunk = self.sock.recv(1 << 16)
        except (TimeoutError, BlockingIOError):
            return []
        except OSError:  # reset by the peer
            return None
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line]
