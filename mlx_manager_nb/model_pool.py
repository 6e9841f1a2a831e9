"""The model pool: load, unload, pin and evict models (see :mod:`.registry`), and run chat and
completion requests (see :mod:`.runner`).

>>> from mlx_manager_nb import pool
>>> pool.load("demo")
>>> pool.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0).text
'The capital of France is Paris.'
>>> for delta in pool.chat([{"role": "user", "content": "Count to 3"}], stream=True):
...     print(delta, end="")

Each front end turns its input into a :class:`~mlx_manager_nb.request.ChatRequest` and a
:class:`~mlx_manager_nb.request.RequestContext`: the Python methods here with
:func:`~mlx_manager_nb.request.python_request`, the HTTP protocols with their adapters. The
``a``-prefixed methods can be called from a running event loop without blocking it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Any, Literal, overload

import numpy as np

from . import embeddings, runner, scoring
from .chain import TOOL_ROUNDS, rounds
from .errors import ModelNotFoundError
from .registry import ModelEvent, ModelInfo, PoolEvent, ProgressEvent, Registry, RequestEvent, physical_memory
from .request import ChatRequest, RequestContext, python_request
from .scoring import Score
from .streams import AsyncTextStream, Result, TextStream, async_sink, queue_sink
from .tools import make_tools

Meta = dict | RequestContext | None  # a request's audit fields: a RequestContext, or a dict of its fields

__all__ = ["ModelEvent", "ModelInfo", "Pool", "PoolEvent", "ProgressEvent", "RequestEvent", "physical_memory"]


class Pool(Registry):
    """Models loaded in this process (see :class:`~mlx_manager_nb.registry.Registry`), and the requests on them.

    ``max_models`` and ``max_memory`` (bytes) bound the pool: loading past them evicts the least
    recently used idle, unpinned model. ``keep_alive`` (seconds, None for ever) unloads models
    left idle that long. ``dequantize`` loads quantized models as float32: None (the default) does
    so on CPU devices when the float weights fit in ``max_memory``. ``audit`` is an
    :class:`~mlx_manager_nb.audit_log.AuditLog` or None.
    """

    def _start(self, make: Callable[[], ChatRequest], kind: str, model: str | None, sink: Callable,
               context: RequestContext, backlog: Callable[[], int], keep: bool = False,
               progress: Callable[[int, int], None] | None = None) -> tuple[str, str, Any]:
        """Build the request with ``make()`` and submit it (see :func:`.runner.start`); a refusal is recorded."""
        request = None
        try:
            request = make()
            return runner.start(self, request, model, sink, context, backlog, keep, progress)
        except Exception as e:
            runner.record_refused(self, e, model, context, kind, request=request)
            raise

    def stream(self, request: ChatRequest, model: str | None, context: RequestContext) -> TextStream:
        """Run a parsed request, as a stream."""
        events, sink = queue_sink()
        return TextStream(*self._start(lambda: request, request.kind, model, sink, context, events.qsize), events)

    def astream(self, request: ChatRequest, model: str | None, context: RequestContext) -> AsyncTextStream:
        """Run a parsed request from a running event loop (which tokenizing never blocks), as an async stream."""
        return self._astream(lambda: request, request.kind, model, context)

    def _astream(self, make: Callable[[], ChatRequest], kind: str, model: str | None,
                 context: RequestContext) -> AsyncTextStream:
        loop = asyncio.get_running_loop()
        events, sink = async_sink(loop)
        # templating and tokenizing take time proportional to the input: never on the event loop
        started = loop.run_in_executor(None, self._start, make, kind, model, sink, context, events.backlog)
        return AsyncTextStream(started, events)

    def record_refused(self, error: BaseException, model: str | None, context: RequestContext,
                       kind: str = "chat", answered: bool = False) -> None:
        """Record a request refused before it reached the engine (see :func:`.runner.record_refused`)."""
        runner.record_refused(self, error, model, context, kind, answered)

    def _run(self, make: Callable[[], ChatRequest], kind: str, model: str | None, stream: bool,
             meta: Meta, timeout: float | None, keep: bool = False,
             progress: Callable[[int, int], None] | None = None) -> Result | TextStream:
        context = self.request_context(meta, stream, timeout, model, kind)
        events, sink = queue_sink()
        s = TextStream(*self._start(make, kind, model, sink, context, events.qsize, keep, progress), events)
        if stream:
            return s
        with s:
            for _ in s:
                pass
        assert s.result is not None
        return s.result

    def _arun(self, make: Callable[[], ChatRequest], kind: str, model: str | None, stream: bool,
              meta: Meta, timeout: float | None) -> Awaitable[Result] | AsyncTextStream:
        s = self._astream(make, kind, model, self.request_context(meta, stream, timeout, model, kind))
        return s if stream else s.collect()

    def request_context(self, meta: Meta, stream: bool, timeout: float | None, model: str | None,
                 kind: str) -> RequestContext:
        """The context of a Python API call from its ``meta``; a bad one is refused with its audit row."""
        try:
            return RequestContext.of(meta, stream, timeout)
        except Exception as e:
            runner.record_refused(self, e, model, RequestContext(stream=stream), kind)
            raise

    @overload
    def chat(self, messages: list[dict], model: str | None = None, stream: Literal[False] = False, *,
             tools: list | None = None, tool_choice: str | dict | None = None, schema: Any = None,
             meta: Meta = None, timeout: float | None = None, **params: Any) -> Result: ...

    @overload
    def chat(self, messages: list[dict], model: str | None = None, *, stream: Literal[True],
             tools: list | None = None, tool_choice: str | dict | None = None, schema: Any = None,
             meta: Meta = None, timeout: float | None = None, **params: Any) -> TextStream: ...

    def chat(self, messages: list[dict], model: str | None = None, stream: bool = False, *,
             tools: list | None = None, tool_choice: str | dict | None = None, schema: Any = None,
             meta: Meta = None, timeout: float | None = None, **params: Any) -> Result | TextStream:
        """Answer a conversation with the model's chat template.

        ``params``: temperature, top_p, top_k, min_p, repetition_penalty, seed, max_tokens, stop,
        and ``response_format`` (OpenAI's, instead of ``schema``) and ``parallel_tool_calls``;
        ``logprobs=True`` (with ``top_logprobs``, 0 to 20 alternatives) fills ``Result.logprobs`` (see
        :mod:`mlx_manager_nb.logprobs`); ``speculative=False`` keeps it off speculative decoding (see
        :mod:`mlx_manager_nb.speculative`).
        ``stream=True`` returns a :class:`TextStream` of deltas. ``meta`` holds audit fields
        (source, endpoint, protocol, id...: a :class:`~mlx_manager_nb.request.RequestContext` or a dict
        of its fields). Bad input raises ValueError naming the field.

        ``tools``: Python functions, :class:`~mlx_manager_nb.tools.Tool` objects or OpenAI function-tool
        dicts; ``tool_choice``: "auto" (default), "none", "required" or ``{"name": ...}``. Calls come
        back in ``Result.tool_calls`` (finish_reason "tool_calls"). ``schema`` (a pydantic model class
        or a JSON schema dict) constrains the answer to matching JSON, parsed into ``Result.parsed``.
        Messages may hold assistant ``tool_calls`` and ``tool`` results in OpenAI's shape.
        """
        return self._run(lambda: python_request(messages, tools=tools, tool_choice=tool_choice, schema=schema,
                                                **params), "chat", model, stream, meta, timeout)

    def chain(self, messages: list[dict], tools: list, model: str | None = None, *, max_rounds: int = TOOL_ROUNDS,
              tool_choice: str | dict | None = None, **params: Any) -> tuple[Result, list[dict]]:
        """Answer with tools run in a loop (see :func:`mlx_manager_nb.chain.rounds`): each round the
        model's calls run (Python functions) and their results go back, until it answers in text;
        after ``max_rounds`` rounds of calls it must answer (tool_choice "none"). ``tool_choice``
        applies to the first round, later ones are "auto".

        Returns the final :class:`Result` and the transcript (``messages`` with the calls, the
        tool results and the answer). A failing function's error goes back to the model as its result.
        """
        tool_list = make_tools(tools)
        history = list(messages)
        *_, result = rounds(lambda m, choice: self.chat(m, model, tools=tool_list, tool_choice=choice, **params),
                            history, tool_list, tool_choice=tool_choice, max_rounds=max_rounds)
        history.append({"role": "assistant", "content": result.text})
        return result, history

    @overload
    def complete(self, prompt: str, model: str | None = None, stream: Literal[False] = False, *,
                 meta: Meta = None, timeout: float | None = None, **params: Any) -> Result: ...

    @overload
    def complete(self, prompt: str, model: str | None = None, *, stream: Literal[True],
                 meta: Meta = None, timeout: float | None = None, **params: Any) -> TextStream: ...

    def complete(self, prompt: str, model: str | None = None, stream: bool = False, *,
                 meta: Meta = None, timeout: float | None = None, **params: Any) -> Result | TextStream:
        """Continue a raw prompt (no chat template)."""
        return self._run(lambda: python_request(prompt=prompt, **params), "complete", model, stream, meta, timeout)

    def warm(self, model: str | None, prompt: str | list[dict], meta: Meta = None,
             progress: Callable[[str, float], None] | None = None) -> Result:
        """Compute and keep the KV cache of ``prompt`` (a raw string, or chat messages with their template),
        in memory and on disk whatever its length (see :mod:`~mlx_manager_nb.kv_disk`): a later request that
        starts with it, in this kernel or after a restart, skips that prefill. Returns the one-token answer's
        result (``usage.prompt_tokens``: the tokens kept). ``progress(stage, fraction)`` is told how the
        prefill goes, as :meth:`load` tells a load's (the pool's listeners get each step as a ``ProgressEvent``)."""
        kind = "complete" if isinstance(prompt, str) else "chat"
        given: dict[str, Any] = {"prompt": prompt} if kind == "complete" else {"messages": prompt}
        report = self._progress_reporter(model or "default model", progress)
        report("warming", 0.0)
        result = self._run(lambda: python_request(**given, max_tokens=1, temperature=0), kind, model, False, meta,
                           None, keep=True, progress=lambda done, total: report("warming", done / total))
        assert isinstance(result, Result)
        report("ready", 1.0)
        return result

    @overload
    def achat(self, messages: list[dict], model: str | None = None, stream: Literal[False] = False, *,
              tools: list | None = None, tool_choice: str | dict | None = None, schema: Any = None,
              meta: Meta = None, timeout: float | None = None, **params: Any) -> Awaitable[Result]: ...

    @overload
    def achat(self, messages: list[dict], model: str | None = None, *, stream: Literal[True],
              tools: list | None = None, tool_choice: str | dict | None = None, schema: Any = None,
              meta: Meta = None, timeout: float | None = None, **params: Any) -> AsyncTextStream: ...

    def achat(self, messages: list[dict], model: str | None = None, stream: bool = False, *,
              tools: list | None = None, tool_choice: str | dict | None = None, schema: Any = None,
              meta: Meta = None, timeout: float | None = None,
              **params: Any) -> Awaitable[Result] | AsyncTextStream:
        """``await pool.achat(...)`` for a Result, ``async for d in pool.achat(..., stream=True)`` for deltas.

        Must be called from a running event loop, which it never blocks. Tools and schema as in :meth:`chat`.
        """
        return self._arun(lambda: python_request(messages, tools=tools, tool_choice=tool_choice, schema=schema,
                                                 **params), "chat", model, stream, meta, timeout)

    @overload
    def acomplete(self, prompt: str, model: str | None = None, stream: Literal[False] = False, *,
                  meta: Meta = None, timeout: float | None = None, **params: Any) -> Awaitable[Result]: ...

    @overload
    def acomplete(self, prompt: str, model: str | None = None, *, stream: Literal[True],
                  meta: Meta = None, timeout: float | None = None, **params: Any) -> AsyncTextStream: ...

    def acomplete(self, prompt: str, model: str | None = None, stream: bool = False, *,
                  meta: Meta = None, timeout: float | None = None,
                  **params: Any) -> Awaitable[Result] | AsyncTextStream:
        """:meth:`complete` from a running event loop: awaitable Result, or an async stream."""
        return self._arun(lambda: python_request(prompt=prompt, **params), "complete", model, stream, meta,
                          timeout)

    def embed(self, texts: embeddings.Inputs, model: str | None = None, *, truncate: bool = False,
              dimensions: int | None = None, meta: Meta = None) -> np.ndarray:
        """Embed a text (a vector) or a list of texts (a matrix, one row each) with an embedding model.

        Rows are normalized if the model's pooling config says so. Texts longer than the model's
        limit raise ValueError unless ``truncate=True``; ``dimensions`` shortens Matryoshka models'
        vectors. Concurrent calls share forward passes.
        """
        return embeddings.single(texts, embeddings.run(self, texts, model, truncate=truncate,
                                                       dimensions=dimensions, meta=meta).vectors)

    async def aembed(self, texts: embeddings.Inputs, model: str | None = None, *, truncate: bool = False,
                     dimensions: int | None = None, meta: Meta = None) -> np.ndarray:
        """:meth:`embed` without blocking the running event loop."""
        done = await embeddings.arun(self, texts, model, truncate=truncate, dimensions=dimensions, meta=meta)
        return embeddings.single(texts, done.vectors)

    def score(self, text: scoring.Text | list[scoring.Text], continuation: str | list[str] | None = None,
              model: str | None = None, *, top_logprobs: int = 0, meta: Meta = None) -> Score | list[Score]:
        """The log-probability of ``continuation`` after ``text``, or of ``text`` itself (its perplexity).

        ``text``: a raw text, chat messages (their template with the assistant's turn opened: the
        continuation is an answer) or a list of either; ``continuation``: a string, a list of strings or
        None (the whole text is scored). A single text and continuation give a :class:`Score`; a list of
        either gives one per item, paired with each of the other's (a context's choices) or item by item,
        all in one engine job that batches them (see :mod:`mlx_manager_nb.scoring`).
        ``top_logprobs``: alternatives per scored token (0 to 20).
        """
        return scoring.run(self, text, continuation, model, top_logprobs, meta)

    async def ascore(self, text: scoring.Text | list[scoring.Text], continuation: str | list[str] | None = None,
                     model: str | None = None, *, top_logprobs: int = 0, meta: Meta = None) -> Score | list[Score]:
        """:meth:`score` without blocking the running event loop."""
        return await scoring.arun(self, text, continuation, model, top_logprobs, meta)

    def count_tokens(self, messages: Any = None, model: str | None = None, prompt: str | None = None,
                     **structure: Any) -> int:
        """How many tokens a chat (or a raw prompt) takes with the model's template; ``structure``
        (``tools``, ``tool_choice``, ``response_format``...) as :meth:`chat` takes it, since tools are in the prompt."""
        request = python_request(messages, prompt, **{k: v for k, v in structure.items() if v is not None})
        return runner.count_tokens(self, request, model)

    async def acount_tokens(self, messages: Any = None, model: str | None = None, prompt: str | None = None,
                            **structure: Any) -> int:
        """:meth:`count_tokens` on a worker thread, never blocking the running event loop."""
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.count_tokens, messages, model, prompt, **structure))

    async def acount_request_tokens(self, request: ChatRequest, model: str | None = None) -> int:
        """The tokens of a parsed request's prompt (see :func:`.runner.count_tokens`), off the running loop."""
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(runner.count_tokens, self, request, model))

    def health(self) -> dict:
        """Engine liveness, what is loaded, and memory: weights (memory_used), KV caches and MLX's figures."""
        error = self.engine.error
        return {
            "engine": "alive" if self.engine.alive else ("dead" if error else "idle"),
            "engine_error": repr(error) if error else None,
            "models": [m.alias or m.name for m in self.models() if m.state == "ready"],
            "memory_used": self.memory_used(),
            "max_memory": self.max_memory,
            **self.engine.memory(),  # kv_bytes, cache_bytes and MLX's active, cache and peak bytes
        }

    def close(self) -> None:
        """Unload every model, end the engine thread and flush the audit log; later use starts afresh."""
        for m in self.models():
            with contextlib.suppress(ModelNotFoundError):
                self.unload(m.name)
        self.engine.stop()
        if self.audit is not None:
            self.audit.flush()
