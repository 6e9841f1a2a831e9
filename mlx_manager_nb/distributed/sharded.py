"""The kernel's side of a sharded model: ``mlx.launch`` starts the ranks, rank 0 answers over a socket.

:class:`ShardedModel` listens on 127.0.0.1 (a free port), starts ``mlx.launch`` with the hosts, which
runs :mod:`.worker` on every rank, and waits for rank 0 to connect, prove it was started here (a token in
its environment) and report the model loaded. From then on one I/O thread reads rank 0's events into the
requests' ``emit`` and forwards cancellations and timeouts. When the job ends by itself (a rank died or
was killed: ``mlx.launch`` then stops the others), the requests in flight fail with an error naming the
rank, and ``on_failure`` is told so the pool marks the model failed.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import ipaddress
import math
import os
import random
import re
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_lm.utils import MODEL_REMAPPING

from .. import store
from ..engine import Failed, Request
from ..errors import EngineError, InvalidParameterError, UnsupportedModelError
from .protocol import TOKEN_ENV, LineReader, encode_params, send
from .remote import POLL_SECONDS, Flights

BACKENDS = ("ring", "jaccl", "jaccl-ring", "mpi")
LAUNCH = "from mlx._distributed_utils.launch import main; main()"  # the `mlx.launch` command, with our interpreter
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
STOP_WAIT = 10.0  # seconds the job gets to end after "stop" before its processes are killed
REPORT_WAIT = 3.0  # seconds to wait for mlx.launch to say which rank died
HELLO_WAIT = 5.0  # seconds a connection to the kernel's socket has to prove it is rank 0
MAX_HELLO = 4096  # bytes of a hello line at most
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _families(marker: str) -> list[str]:
    """The mlx-lm model families whose source has ``marker`` (``def shard(`` or ``PipelineMixin``)."""
    spec = importlib.util.find_spec("mlx_lm.models")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("cannot find mlx-lm's model sources (mlx_lm.models)")
    folder = Path(spec.submodule_search_locations[0])
    return sorted(p.stem for p in folder.glob("*.py") if p.stem != "pipeline" and marker in p.read_text())


def check_supported(path: Path, parallel: str, ranks: int) -> None:
    """Raise UnsupportedModelError, naming the families that are, when mlx-lm cannot shard this model so
    (and, for tensor parallelism, naming the head counts when its attention heads do not split over ``ranks``)."""
    if parallel not in ("tensor", "pipeline"):
        raise InvalidParameterError("parallel", f"parallel must be 'tensor' or 'pipeline', got {parallel!r}")
    config = store.read_config(path)
    model_type = config.get("model_type", "")
    family = MODEL_REMAPPING.get(model_type, model_type)
    marker = "def shard(" if parallel == "tensor" else "PipelineMixin"
    families = _families(marker)
    if family not in families:
        raise UnsupportedModelError(f"mlx-lm has no {parallel} parallelism for {model_type!r} models; it has it for: "
                                    f"{', '.join(families)}")
    if parallel == "pipeline" and not (path / "model.safetensors.index.json").exists():
        raise UnsupportedModelError(f"pipeline loading (mlx_lm.utils.sharded_load) needs the weight index "
                                    f"model.safetensors.index.json, which {path} lacks")
    if parallel == "tensor":
        _check_heads(config, ranks)


def _check_heads(config: dict, ranks: int) -> None:
    """Tensor parallelism gives each rank an equal share of the attention heads (query and key-value)."""
    text = config.get("text_config", config)
    heads = next((text[k] for k in ("num_attention_heads", "n_heads", "num_heads") if k in text), None)
    kv_heads = next((text[k] for k in ("num_key_value_heads", "n_kv_heads") if text.get(k)), heads)
    if isinstance(heads, int) and isinstance(kv_heads, int) and (heads % ranks or kv_heads % ranks):
        kv = f" and {kv_heads} key-value heads" if kv_heads != heads else ""
        raise UnsupportedModelError(f"tensor parallelism splits the attention heads over the ranks: this model's "
                                    f"{heads} attention heads{kv} do not divide by {ranks} ranks; use a number of "
                                    f"ranks that divides {math.gcd(heads, kv_heads)}")


def _free_ports(n: int) -> int:
    """A first port of ``n`` consecutive ones free on 127.0.0.1 (for the ring backend's listeners)."""
    for _ in range(100):
        base = random.randrange(20000, 60000 - n)
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise EngineError("no free ports for the ring backend")


def _is_local(host: str) -> bool:
    try:
        return host in LOCAL_HOSTS or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ShardedModel:
    """A model sharded over ranks started by ``mlx.launch``: a runner the pool submits to."""

    placement = "sharded"

    def __init__(self, name: str, path: Path, hosts: list[str], backend: str = "ring", parallel: str = "tensor",
                 hostfile: str | None = None, python: str | None = None,
                 on_failure: Callable[[str], None] | None = None):
        if backend not in BACKENDS:
            raise InvalidParameterError("backend", f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        check_supported(path, parallel, len(hosts))
        self.name, self.path, self.hosts, self.backend, self.parallel = name, path, list(hosts), backend, parallel
        self.hostfile, self.python = hostfile, python or sys.executable
        self.on_failure = on_failure
        self.tokenizer = load_tokenizer(path)
        self.vocab_size = len(self.tokenizer.vocab)
        self.max_token_chars = max(map(len, self.tokenizer.vocab), default=1) or 1
        self.process: subprocess.Popen | None = None
        self.error: str | None = None  # why the job ended, once it did by itself
        self.rank_state: list[dict] = []
        self.log: collections.deque[str] = collections.deque(maxlen=200)  # the job's output, last lines
        self._flights = Flights()
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._ready = threading.Event()
        self._closing = False
        self._closed_at: float | None = None

    # -- the pool's side -----------------------------------------------------------------------

    def start(self, timeout: float = 600.0) -> None:
        """Launch the job and wait until every rank holds its shard; raise EngineError with the job's output if not."""
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(POLL_SECONDS)
        token = secrets.token_hex(16)
        hosts = ["--hostfile", self.hostfile] if self.hostfile else ["--hosts", ",".join(self.hosts)]
        ports = ["--starting-port", str(_free_ports(len(self.hosts)))] if self.backend == "ring" else []
        command = [sys.executable, "-c", LAUNCH, "--backend", self.backend, *hosts, *ports, "--python", self.python,
                   "--", "-m", "mlx_manager_nb.distributed.worker", str(self.path), "--name", self.name,
                   "--parallel", self.parallel, "--port", str(listener.getsockname()[1])]
        env = {**os.environ, TOKEN_ENV: token, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
        threading.Thread(target=self._collect_output, name=f"mlx-launch-{self.name}", daemon=True).start()
        threading.Thread(target=self._run, args=(listener, token, time.monotonic() + timeout),
                         name=f"sharded-{self.name}", daemon=True).start()
        self._ready.wait()
        if self.error is not None:
            raise EngineError(f"cannot start {self.name!r} on {', '.join(self.hosts)}: {self.error}")

    def submit(self, request: Request, content: object = None) -> None:
        """Send a tokenized request to rank 0; its events come back through ``request.emit``."""
        rid = self._flights.add(request)
        if self.error is not None or self._closing:
            self._flights.fail_all(EngineError(self.error or f"model {self.name!r} was unloaded"))
            return
        self._send({"op": "submit", "id": rid, "prompt": request.prompt, "params": encode_params(request.params)})

    def close(self, error: BaseException) -> None:
        """Fail the requests in flight with ``error`` and end the job (without waiting for it)."""
        self._closing, self._closed_at = True, time.monotonic()
        self._flights.fail_all(error)
        self._send({"op": "stop"})
        if self._sock is None:  # still starting: nobody will read a stop
            self._kill()

    def ranks(self) -> tuple[dict, ...]:
        """Per rank: host, state, pid, weight bytes, and as of the last report (``reported_at``, every few
        seconds) its MLX memory and running sequences."""
        state = "failed" if self.error else "stopped" if self._closing else "ready" if self._sock else "loading"
        return tuple({"host": host, "state": state, **info}
                     for host, info in zip(self.hosts, self.rank_state or [{} for _ in self.hosts], strict=False))

    @property
    def local_weight_bytes(self) -> int:
        """Weight bytes held by the ranks on this machine (rank 0 and the loopback hosts)."""
        return sum(r.get("weight_bytes", 0) for i, r in enumerate(self.ranks()) if i == 0 or _is_local(r["host"]))

    # -- the I/O thread ------------------------------------------------------------------------

    def _send(self, message: dict) -> None:
        with self._send_lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):  # the reader sees the end and reports it
                    send(self._sock, message)

    @property
    def _job(self) -> subprocess.Popen:
        """The mlx.launch process, which start() sets before the threads that use it run."""
        if self.process is None:
            raise EngineError(f"{self.name!r} was not started")
        return self.process

    def _collect_output(self) -> None:
        output = self._job.stdout
        if output is None:  # never: start() pipes it
            return
        for line in output:
            self.log.append(_ANSI.sub("", line.decode(errors="replace").rstrip()))

    def _run(self, listener: socket.socket, token: str, deadline: float) -> None:
        try:
            sock = self._accept(listener, token, deadline)
        except Exception as e:  # rank 0 itself sent what is not a message: the load fails, never hangs
            self.error, sock = f"rank 0 broke the channel: {type(e).__name__}: {e}", None
        finally:
            listener.close()
        if sock is None:
            self._kill()
            self._ready.set()
            return
        reader = LineReader(sock)
        sock.settimeout(POLL_SECONDS)
        while True:
            lines = reader.read()
            if lines is None or self._job.poll() is not None:
                break
            if self._closed_at is not None and time.monotonic() > self._closed_at + STOP_WAIT:
                self._kill()  # the ranks did not end after "stop"
                break
            for message in lines:
                self._on_message(message)
            for rid, reason in self._flights.to_end():
                self._send({"op": "cancel", "id": rid, "reason": reason})
        self._ended(sock)

    def _accept(self, listener: socket.socket, token: str, deadline: float) -> socket.socket | None:
        """Rank 0's connection once it proved itself and the model loaded; None (with ``error`` set) if not."""
        found = self._rank0(listener, token, deadline)
        if found is not None:
            sock, reader, first = found
            sock.settimeout(POLL_SECONDS)
            lines: list | None = first
            while lines is not None:
                for message in lines:
                    if message.get("event") == "ready":
                        self.rank_state = message["ranks"]
                        self._sock = sock
                        self._ready.set()
                        return sock
                    if message.get("event") == "fatal":
                        self.error = message["error"]
                        sock.close()
                        return None
                if time.monotonic() > deadline or self._job.poll() is not None or self._closing:
                    break
                lines = reader.read()
            sock.close()
        if self._closing:
            self.error = "unloaded while starting"
        elif self._job.poll() is None:
            self.error = "the ranks did not report the model loaded in time"
        else:
            self.error = self._why_ended()
        return None

    def _rank0(self, listener: socket.socket, token: str,
               deadline: float) -> tuple[socket.socket, LineReader, list] | None:
        """The connection that says hello with this load's token first, with its reader and its next lines.

        Connections are read side by side: one that says nothing for :data:`HELLO_WAIT` seconds, sends a
        line that is not the hello or a line over :data:`MAX_HELLO` bytes is closed, and accepting goes on.
        """
        pending: dict[socket.socket, tuple[LineReader, float]] = {}
        listener.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)

            def drop(conn: socket.socket) -> None:
                selector.unregister(conn)
                conn.close()
                del pending[conn]

            try:
                while time.monotonic() < deadline and self._job.poll() is None and not self._closing:
                    for key, _ in selector.select(POLL_SECONDS):
                        if key.fileobj is listener:
                            with contextlib.suppress(BlockingIOError, ConnectionAbortedError):
                                conn, _ = listener.accept()
                                conn.setblocking(False)
                                pending[conn] = (LineReader(conn), time.monotonic() + HELLO_WAIT)
                                selector.register(conn, selectors.EVENT_READ)
                            continue
                        conn = key.fileobj  # type: ignore[assignment]
                        reader = pending[conn][0]
                        lines = _hello_lines(reader)
                        if lines is not None and lines and _is_hello(lines[0], token):
                            selector.unregister(conn)
                            del pending[conn]
                            return conn, reader, lines[1:]
                        if lines != []:  # not a hello, or ended
                            drop(conn)
                    now = time.monotonic()
                    for conn in [c for c, (_, late) in pending.items() if now > late]:
                        drop(conn)
            finally:
                for conn in pending:
                    conn.close()
        return None

    def _on_message(self, m: dict) -> None:
        event = m.get("event")
        if event == "delta":
            self._flights.delta(m["id"], m["text"])
        elif event == "done":
            self._flights.done(m["id"], m["finish_reason"], m["stop"], m["prompt_tokens"], m["completion_tokens"],
                               m["cached_tokens"], m["ttft"] is not None)
        elif event == "failed" and "peer was lost" in m["error"]:
            # a rank died: mlx.launch ends the job, and _ended fails every request naming that rank
            self.error = self.error or m["error"]
        elif event == "failed":
            self._flights.finish(m["id"], Failed(EngineError(m["error"])))
        elif event == "ranks":
            now = time.time()
            # one row per rank of the same group as the "ready" message's
            self.rank_state = [{**old, **new, "reported_at": now}
                               for old, new in zip(self.rank_state, m["ranks"], strict=True)]
        elif event == "fatal":
            self.error = m["error"]

    def _ended(self, sock: socket.socket) -> None:
        """The channel closed: a clean stop after close(), or the job died."""
        sock.close()
        if self._closing:
            try:
                self._job.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                self._kill()
            return
        try:  # mlx.launch stops the other ranks within a second of one's death: wait for its report
            self._job.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            self._kill()
        self.error = self._why_ended()
        message = f"sharded model {self.name!r} failed: {self.error}"
        self._flights.fail_all(EngineError(message))
        if self.on_failure is not None:
            self.on_failure(message)

    def _why_ended(self) -> str:
        """Which rank ended first, as mlx.launch reports it (it then stops the others), with rank 0's own
        error if it sent one; else the job's last lines. Rank 0 losing its peers is a consequence, not a cause."""
        lost = "peer was lost" in (self.error or "")
        deadline = time.monotonic() + REPORT_WAIT
        while True:  # mlx.launch reports the dead rank within a moment (longer on a loaded machine)
            for line in list(self.log):
                m = re.search(r"Node with rank (\d+) (was killed|exited with code -?\d+)", line)
                if m and not (lost and m.group(1) == "0"):
                    rank = int(m.group(1))
                    host = self.hosts[rank] if rank < len(self.hosts) else "?"
                    return (f"rank {rank} ({host}) {m.group(2)}" + (f" ({self.error})" if self.error else "")
                            + self._tail())
            if time.monotonic() > deadline:
                return f"{self.error or f'the job ended (exit code {self._job.poll()})'}{self._tail()}"
            time.sleep(0.05)

    def _tail(self, lines: int = 3) -> str:
        """The job's last lines of its own (not the ring's or the launcher's chatter), to say why it ended."""
        own = [line for line in self.log if line and not line.startswith(("[ring]", "[WARN]"))][-lines:]
        return f"; its output ends: {' | '.join(own)}" if own else ""

    def _kill(self) -> None:
        """End the job's local processes: mlx.launch runs them in the session it leads."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()



def _hello_lines(reader: LineReader) -> list | None:
    """The lines a connection not yet proven has sent: [] while its first line is incomplete, None to close it."""
    try:
        lines = reader.read()
    except ValueError:  # not JSON, or not UTF-8
        return None
    return None if lines == [] and len(reader.buffer) > MAX_HELLO else lines


def _is_hello(message: object, token: str) -> bool:
    return (isinstance(message, dict) and message.get("event") == "hello"
            and secrets.compare_digest(str(message.get("token")).encode(), token.encode()))


def hostfile_hosts(hostfile: str | None) -> list[str]:
    """The ssh host names of an mlx.launch hostfile, rank by rank."""
    from mlx._distributed_utils.common import Hostfile

    if not hostfile:
        raise InvalidParameterError("hosts", "a sharded model needs hosts (or a hostfile)")
    return [h.ssh_hostname for h in Hostfile.from_file(hostfile).hosts]
