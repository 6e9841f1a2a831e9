"""One rank of a sharded model: ``mlx.launch ... -- -m mlx_manager_nb.distributed.worker MODEL --port P``.

Every rank loads its shard with :func:`mlx_lm.utils.sharded_load` and runs the engine's own scheduling
step (:meth:`~mlx_manager_nb.engine.Engine.advance`, which admits, samples, matches stop strings and
removes sequences) on one :class:`~mlx_manager_nb.engine.Runner`, in lockstep. Before each step rank 0
broadcasts what the kernel sent since the last one (submits, cancels, timeouts, stop), the way
mlx_lm.server shares requests: an ``all_sum`` of the message's size, then one of its bytes when there is
one. Every rank thus inserts, samples and removes the same sequences at the same step; seeds are fixed
by rank 0 so that sampling draws the same tokens everywhere. Rank 0 alone talks to the kernel (see
:mod:`.protocol`); the other ranks' events go nowhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import socket
import sys
import threading
import time
import traceback

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generation_stream
from mlx_lm.utils import sharded_load

from ..engine import MLX_CACHE_LIMIT, Done, Engine, Event, Failed, Request, Runner
from .protocol import TOKEN_ENV, LineReader, decode_params, event_message, send

IDLE_WAIT = 0.5  # seconds rank 0 waits for the kernel between broadcasts while nothing runs
STATS_SECONDS = 2.0  # how often the ranks report their memory to the kernel


def share(group: mx.distributed.Group, commands: list[dict]) -> list[dict]:
    """Rank 0's ``commands`` on every rank (the others pass []): one all_sum when there are none, two otherwise.

    The collectives run on mlx-lm's generation stream, behind the batch's (asynchronously evaluated)
    ones: on another stream they could interleave with those differently on each rank."""
    data = json.dumps(commands).encode() if group.rank() == 0 and commands else b""
    size = mx.distributed.all_sum(mx.array(len(data)), group=group, stream=generation_stream).item()
    if size == 0:
        return []
    assert isinstance(size, int)  # the sum of int32 lengths
    buffer = mx.array(np.frombuffer(data, np.uint8)) if data else mx.zeros(size, mx.uint8)
    buffer = mx.distributed.all_sum(buffer, group=group, stream=generation_stream)
    mx.eval(buffer)  # rank 0 too: every rank must take part in each collective, in the same order
    return commands if data else json.loads(bytes(np.array(buffer)))


def gather(group: mx.distributed.Group, values: list[int]) -> list[list[int]]:
    """Each rank's ``values``, in rank order, on every rank."""
    rows = mx.distributed.all_gather(mx.array([values], dtype=mx.int64), group=group, stream=generation_stream)
    return np.array(rows).tolist()


class Channel:
    """Rank 0's connection to the kernel: commands arrive on a reader thread, events leave from the caller's."""

    def __init__(self, port: int, token: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.settimeout(None)
        self.lock = threading.Lock()
        self.inbox: queue.Queue = queue.Queue()
        self.send({"event": "hello", "token": token})
        threading.Thread(target=self._read, name="kernel-channel", daemon=True).start()

    def send(self, message: dict) -> None:
        with self.lock, contextlib.suppress(OSError):  # the kernel is gone: the reader thread asks the ranks to stop
            send(self.sock, message)

    def take(self, wait: float) -> list[dict]:
        """The commands that arrived, waiting up to ``wait`` seconds for a first one."""
        out = []
        try:
            out.append(self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait())
            while True:
                out.append(self.inbox.get_nowait())
        except queue.Empty:
            return out

    def _read(self) -> None:
        reader = LineReader(self.sock)
        while (lines := reader.read()) is not None:
            for line in lines:
                self.inbox.put(line)
        self.inbox.put({"op": "stop"})  # the kernel closed the channel


def prepare(commands: list[dict]) -> list[dict]:
    """Rank 0 fixes what every rank must agree on before broadcasting: a seed for each sampled request."""
    for c in commands:
        if c.get("op") == "submit" and c["params"]["temperature"] > 0 and c["params"]["seed"] is None:
            c["params"] = {**c["params"], "seed": random.getrandbits(63)}
    return commands


def serve(group: mx.distributed.Group, engine: Engine, runner: Runner, channel: Channel | None) -> None:
    """The lockstep loop: broadcast rank 0's commands, apply them on every rank, step the batch; until "stop"."""
    requests: dict[str, Request] = {}
    next_stats = time.monotonic() + STATS_SECONDS

    def emitter(request_id: str):
        def emit(event: Event) -> None:
            if isinstance(event, (Done, Failed)):
                requests.pop(request_id, None)
            if channel is not None:
                channel.send(event_message(request_id, event))

        return emit

    while True:
        commands: list[dict] = []
        if channel is not None:
            busy = bool(runner.active or runner.waiting)
            commands = prepare(channel.take(0 if busy else IDLE_WAIT))
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + STATS_SECONDS
                commands.append({"op": "stats"})
        for c in share(group, commands):
            if c["op"] == "submit":
                request = Request(runner.name, c["prompt"], decode_params(c["params"]), emitter(c["id"]))
                requests[c["id"]] = request
                runner.waiting.append(request)
            elif c["op"] == "cancel" and c["id"] in requests:
                if c.get("reason") == "timeout":  # the engine ends it as "timeout" at this step, on every rank
                    requests[c["id"]].deadline = float("-inf")
                else:
                    requests[c["id"]].cancelled.set()
            elif c["op"] == "stats":
                rows = gather(group, [mx.get_active_memory(), mx.get_peak_memory(), len(runner.active)])
                if channel is not None:
                    channel.send({"event": "ranks", "ranks": [{"rank": i, "active_bytes": a, "peak_bytes": p,
                                                               "sequences": n} for i, (a, p, n) in enumerate(rows)]})
            elif c["op"] == "stop":
                return
        engine.advance(runner)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="the model folder (the same path on every host) or a Hugging Face repo")
    parser.add_argument("--name", default="sharded", help="the model's name in the kernel's pool")
    parser.add_argument("--parallel", choices=("tensor", "pipeline"), default="tensor")
    parser.add_argument("--port", type=int, required=True, help="the kernel's channel port on 127.0.0.1 (rank 0)")
    args = parser.parse_args(argv)

    group = mx.distributed.init(strict=True)
    channel = None
    if group.rank() == 0:
        try:
            channel = Channel(args.port, os.environ.get(TOKEN_ENV, ""))
        except OSError as e:
            print(f"rank 0 cannot reach the kernel at 127.0.0.1:{args.port} ({e}): the first host must be "
                  f"the machine that runs the kernel", file=sys.stderr)
            return 2
    try:
        tensor, pipeline = (group, None) if args.parallel == "tensor" else (None, group)
        model, tokenizer = sharded_load(args.model, pipeline_group=pipeline, tensor_group=tensor)
        mx.set_cache_limit(MLX_CACHE_LIMIT)
        # tree_flatten returns a list of (key, array) pairs without a destination; its annotation allows a dict
        parameters: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
        weights = sum(v.nbytes for _, v in parameters)
        ranks = gather(group, [os.getpid(), weights])
        runner = Runner(args.name, model, tokenizer)
        if channel is not None:
            channel.send({"event": "ready", "ranks": [
                {"rank": i, "pid": pid, "weight_bytes": w} for i, (pid, w) in enumerate(ranks)]})
        serve(group, Engine(), runner, channel)
    except Exception as e:
        if channel is not None:
            channel.send({"event": "fatal", "error": f"rank 0: {type(e).__name__}: {e}"})
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
