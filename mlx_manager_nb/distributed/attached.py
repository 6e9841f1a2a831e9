"""A model of another OpenAI-compatible server, as a pool entry: ``pool.attach("name", base_url=...)``.

Requests go out as streaming ``/chat/completions`` or ``/completions`` calls (with usage) from an
aiohttp client on this model's own event-loop thread, so the kernel's loop is never blocked. Each
delta becomes the engine's ``Delta``; the end, a ``Done`` with the server's token counts. Cancelling
(or passing the deadline) closes the HTTP response, which ends the request on the server (an
``mlx_manager_nb serve`` records it as cancelled in its own audit log).
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import aiohttp

from ..engine import Failed, Request
from ..errors import EngineError, ModelNotFoundError
from ..params import GenParams, json_fields
from ..server.openai_api import FIELDS  # imported with this module, not on its loop thread at the first request
from .remote import POLL_SECONDS, Flights

CONNECT_TIMEOUT = 10.0
FINISH = {"stop": "stop", "length": "length", "content_filter": "stop", "tool_calls": "stop"}


def openai_body(p: GenParams) -> dict:
    """The OpenAI fields for ``p`` (named as the OpenAI adapter reads them); the extensions (top_k,
    min_p, repetition_penalty) only when set."""
    names = {param: name for name, param in FIELDS.items()}
    return {"temperature": p.temperature, "max_tokens": p.limit,
            **{names[param]: value for param, value in json_fields(p).items() if param in names}}


class AttachedModel:
    """A runner that proxies requests to an OpenAI-compatible server."""

    placement = "attached"
    tokenizer = None  # the server templates and tokenizes
    vocab_size = 2**31  # token ids in logit_bias are checked by the server
    max_token_chars = 1

    def __init__(self, name: str, base_url: str, api_key: str | None = None, model: str | None = None):
        self.name, self.base_url, self.model = name, base_url.rstrip("/"), model
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"attached-{name}", daemon=True)
        self._flights = Flights()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task] = {}  # each request's task, on the client thread
        self._watcher: asyncio.Future | None = None

    def start(self) -> None:
        """Start the client thread and check the server lists the model (or pick its only one)."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._connect(), self.loop).result()
        except BaseException:
            self.close(EngineError("attach failed"))
            raise

    def submit(self, request: Request, content: Any) -> None:
        rid = self._flights.add(request)
        asyncio.run_coroutine_threadsafe(self._request(rid, request, content), self.loop)

    def close(self, error: BaseException) -> None:
        """Fail the requests in flight and end the client thread."""
        self._flights.fail_all(error)

        async def shut() -> None:
            for task in [self._watcher, *self._tasks.values()]:
                if task is not None:
                    task.cancel()
            if self._session is not None:
                await self._session.close()
            self.loop.stop()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shut(), self.loop)

    def ranks(self) -> tuple[dict, ...]:
        return ()

    def _run_loop(self) -> None:
        self.loop.run_forever()
        self.loop.close()

    async def _connect(self) -> None:
        self._session = aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT))
        try:
            async with self._session.get(f"{self.base_url}/models") as r:
                body = await r.json(content_type=None)
                if r.status != 200:
                    raise EngineError(f"{self.base_url}/models answered {r.status}: {_message(body)}")
        except aiohttp.ClientError as e:
            raise EngineError(f"cannot reach {self.base_url}: {e}") from None
        listed = [m for m in body.get("data", []) if isinstance(m, dict)]
        ids = [str(m.get("id")) for m in listed]
        if self.model is None:
            self.model = only_model(listed) or self.name
        if self.model not in ids:
            raise ModelNotFoundError(f"{self.base_url} does not serve {self.model!r}; it serves: {', '.join(ids)}")
        self._watcher = asyncio.ensure_future(self._watch())

    async def _request(self, rid: str, request: Request, content: Any) -> None:
        task = asyncio.current_task()
        if task is not None:  # always: this coroutine runs as a task on the client loop
            self._tasks[rid] = task
        try:
            flight = self._flights.get(rid)
            if flight is None or flight.ending:  # cancelled before it started
                raise asyncio.CancelledError
            await self._stream(rid, request, content)
        except asyncio.CancelledError:  # cancelled or past its deadline: closing the response ends it remotely
            flight = self._flights.get(rid)
            if flight is not None:
                self._flights.done(rid, flight.ending or "cancelled", None, 0, 0, 0, flight.first is not None)
        except Exception as e:
            self._flights.finish(rid, Failed(EngineError(f"{self.name} ({self.base_url}): {e}")))
        finally:
            self._tasks.pop(rid, None)

    async def _watch(self) -> None:
        """Cancel the task of each request that is cancelled or past its deadline."""
        while True:
            await asyncio.sleep(POLL_SECONDS)
            for rid, _ in self._flights.to_end():
                if rid in self._tasks:
                    self._tasks[rid].cancel()

    async def _stream(self, rid: str, request: Request, content: Any) -> None:
        chat = isinstance(content, list)
        body = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                **openai_body(request.params), **({"messages": content} if chat else {"prompt": content})}
        url = f"{self.base_url}/{'chat/completions' if chat else 'completions'}"
        finish: str | None = None
        usage: dict[str, Any] = {}
        session = self._session
        if session is None:  # submit() comes after start() connected
            raise EngineError("not connected")
        async with session.post(url, json=body) as r:
            if r.status != 200:
                raise EngineError(f"the server answered {r.status}: {_message(await r.json(content_type=None))}")
            async for line in r.content:
                data = line.decode().strip()
                if not data.startswith("data:") or data == "data: [DONE]":
                    continue
                chunk = json.loads(data[5:])
                if "error" in chunk:
                    raise EngineError(_message(chunk))
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    text = choice.get("delta", {}).get("content") if chat else choice.get("text")
                    if text:
                        self._flights.delta(rid, text)
                    finish = choice.get("finish_reason") or finish
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        reason = "stop" if finish is None else FINISH.get(finish, "stop")
        self._flights.done(rid, reason, None, usage.get("prompt_tokens", 0),
                           usage.get("completion_tokens", 0), cached, usage.get("completion_tokens", 0) > 0)


def only_model(listed: list[dict]) -> str | None:
    """The id of the one model a ``/models`` listing serves, under whichever names (an alias lists its
    ``root``, as vLLM's and this package's servers do); None when it serves several or none."""
    roots = {m.get("root") or m.get("id") for m in listed}
    if len(roots) != 1:
        return None
    root = roots.pop()
    ids = [m.get("id") for m in listed]
    return root if root in ids else ids[0]


def _message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("message") if isinstance(error, dict) else error or body)[:300]
