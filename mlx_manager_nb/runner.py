"""Running one request on the pool: checks, tokens, context limits, and the engine's events turned
into results and audit rows.

:func:`start` takes a :class:`~mlx_manager_nb.request.ChatRequest` (already checked by the front end
that parsed it), finds its model, tokenizes it, fits it to the model's context and submits it; its
events go to a sink (see :mod:`mlx_manager_nb.streams`). Every request, chat, completion or
embedding, goes through one :class:`RequestRecord`: begun (in flight on its model, published),
then ended with its audit row, or refused before it began (:func:`record_refused`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from . import vision
from .audit_log import audit_row, error_fields, new_request_id, utc_now
from .engine import Delta, Done, Event, Failed, Request, Runner
from .errors import AnswerCutError, ContextLengthError, InvalidParameterError, ModelNotFoundError
from .logprobs import token_bytes
from .params import DEFAULT_MAX_TOKENS, GenParams, fit_to_model
from .request import ChatRequest, Image, RequestContext
from .streams import Final, StreamEvent
from .structured import Plan, plan
from .tools import ParsedItem, ToolCall

if TYPE_CHECKING:
    from .registry import ModelInfo, Registry


@dataclass
class RequestRecord:
    """One request from :meth:`Registry.begin` to its audit row (chat, completion or embedding)."""

    pool: Registry
    kind: str  # "chat", "complete" or "embed"
    model: str
    context: RequestContext
    id: str = ""
    started: float = field(default_factory=time.time)
    started_at: str = field(default_factory=utc_now)

    def __post_init__(self) -> None:
        self.id = self.id or self.context.id or new_request_id()

    def failed(self, error: BaseException, answered: bool = False) -> dict:
        """The outcome of a request that failed (``answered``: a stream had sent its 200 already)."""
        return dict(error_fields(error, self.context, answered), duration=time.time() - self.started)

    def end(self, outcome: dict, content: dict | None) -> dict:
        """Publish and record the request's audit row; return it."""
        row = audit_row(self.id, self.started_at, self.kind, self.model, self.context, outcome)
        self.pool.request_ended(row, self.context, content)
        return row


def record_refused(pool: Registry, error: BaseException, model: str | None, context: RequestContext,
                   kind: str = "chat", answered: bool = False, request: ChatRequest | None = None) -> None:
    """Record a request refused before it reached the engine (bad input, unknown model) in the audit log;
    ``answered``: the context's ``http_status`` is the status already answered with; ``request``: the
    parsed request, when it was (its images are counted)."""
    if model is None:  # the model the request would have gone to, so stats group it there
        with contextlib.suppress(ModelNotFoundError):
            model = pool.find(None).name
    row = audit_row(context.id or new_request_id(), utc_now(), kind, model, context,
                    error_fields(error, context, answered) | (image_fields(request) if request is not None else {}))
    pool.request_ended(row, context, None, counted=False)


def image_fields(request: ChatRequest) -> dict:
    """The audit row's count of the request's images and their bytes (never their content)."""
    images = request.images
    return {"images": len(images), "image_bytes": sum(i.nbytes for i in images)} if images else {}


def audit_messages(request: ChatRequest) -> list[dict]:
    """The messages as an audit row's stored content: their text, and what each image was, never its pixels."""
    from .images import describe

    return [m.template() | ({"images": [describe(p) for p in m.parts if isinstance(p, Image)]}
                            if any(isinstance(p, Image) for p in m.parts) else {}) for m in request.messages]


def check_images(info: ModelInfo, request: ChatRequest) -> None:
    """Refuse images sent to a model that does not take them, naming the first image's field."""
    images = request.images
    if images and info.kind != "vision":
        raise InvalidParameterError(images[0].field, f"model {info.alias or info.name!r} does not take images "
                                    f"({images[0].field}); send them to a vision model")


def chat_model(pool: Registry, model: str | None) -> ModelInfo:
    """The loaded chat model ``model`` names (None: the default)."""
    info = pool.find(model, kind="chat")
    if info.kind not in ("chat", "vision"):
        raise InvalidParameterError(
            "model", f"model {info.alias or info.name!r} is an {info.kind} model: it cannot chat or complete; "
            f"use pool.embed() or /v1/embeddings")
    return info


def _check_fits(info: ModelInfo, runner: Runner, request: ChatRequest) -> None:
    """Refuse, before tokenizing it, a text too long for the context whatever its tokens."""
    ctx = info.context_length
    chars = len(request.prompt) if request.prompt is not None else sum(len(m.text) for m in request.messages)
    at_least = chars // runner.max_token_chars
    if ctx is not None and at_least >= ctx:
        raise ContextLengthError(_prompt_field(request), f"This model's maximum context length is {ctx} tokens, "
                                 f"and the prompt is too long: at least {at_least} tokens ({info.name}).",
                                 at_least, ctx)


def _prompt_field(request: ChatRequest) -> str:
    return "prompt" if request.prompt is not None else "messages"


def token_ids(runner: Runner, ids: tuple[int, ...], where: str) -> list[int]:
    """``ids`` as a prompt's tokens, refused (``where`` naming them) when one is outside the model's vocabulary."""
    bad = next((t for t in ids if not 0 <= t < runner.vocab_size), None)
    if bad is not None:
        raise InvalidParameterError(where, f"{where} holds token id {bad}, outside {runner.name}'s vocabulary "
                                    f"(0..{runner.vocab_size - 1})")
    return list(ids)


def tokens(runner: Runner, request: ChatRequest) -> tuple[list[int], Plan | None, vision.ImagePrompt | None]:
    """The prompt's tokens, for a chat the plan of its tools and structure (see :mod:`.structured`), and for one
    with images its tiles (the tokens then hold keys in place of its image tokens, see :mod:`.vision`)."""
    if isinstance(request.prompt, tuple):  # token ids: the model's own
        return token_ids(runner, request.prompt, "prompt"), None, None
    if request.prompt is not None:
        return list(runner.tokenizer.encode(request.prompt)), None, None
    processor = getattr(runner, "processor", None)  # a vision model of this process (remote runners have none)
    if processor is not None:
        if request.structured:
            raise InvalidParameterError("tools" if request.tools else "schema", f"model {runner.name!r} is a vision "
                                        "model: tools and structured output are not supported for it")
        keys, images = vision.prompt(processor, request)
        return keys, None, images
    if not getattr(runner.tokenizer, "chat_template", None):
        raise InvalidParameterError(
            "model", f"model {runner.name!r} has no chat template: use complete() with a raw prompt")
    p = plan(runner.tokenizer, [m.template() for m in request.messages], request.tools, request.tool_choice,
             request.schema, request.parallel_tool_calls)
    ids = runner.tokenizer.apply_chat_template(p.messages, tools=p.template_tools, add_generation_prompt=True)
    return list(ids), p, None


def _fit_context(info: ModelInfo, request: ChatRequest, n: int, p: GenParams) -> GenParams:
    """``p`` with the tokens to generate fitted to the context left after an ``n``-token prompt."""
    ctx = info.context_length
    if ctx is None:
        return p
    if n >= ctx:
        raise ContextLengthError(_prompt_field(request), f"This model's maximum context length is {ctx} tokens, "
                                 f"and the prompt is too long: {n} tokens ({info.name}).", n, ctx)
    if p.max_tokens is None:
        return replace(p, max_tokens=min(DEFAULT_MAX_TOKENS, ctx - n))
    if n + p.max_tokens > ctx:
        raise ContextLengthError(
            "max_tokens", f"This model's maximum context length is {ctx} tokens, and max_tokens="
            f"{p.max_tokens} plus the {n}-token prompt exceeds it ({info.name}).", n + p.max_tokens, ctx)
    return p


def _emitter(record: RequestRecord, chat_plan: Plan | None, content: Any, sink: Callable[[StreamEvent], None],
             cancel: Callable[[], None], images: dict) -> Callable[[Event], None]:
    """What receives the engine's events: text and tool calls to ``sink``; at the end the result (a
    :class:`Final` for tools or a schema) to ``sink`` and the audit row to the record."""
    text: list[str] = []
    parser = chat_plan.parser if chat_plan is not None else None
    parse = chat_plan.parse if chat_plan is not None and chat_plan.schema is not None else None
    constrained = chat_plan is not None and chat_plan.constraint is not None

    def send(items: list[ParsedItem], logprobs: tuple = ()) -> None:
        """The parser's text and calls; the tokens' log-probabilities, all of them (calls' too), go with its
        first text, or alone when it gave none (a stream does not yield an empty text)."""
        for item in items:
            if isinstance(item, str):
                sink(Delta(item, logprobs))
                logprobs = ()
            else:
                sink(item)
        if logprobs:
            sink(Delta("", logprobs))

    def finish(event: Done | Failed, calls: list[ToolCall]) -> None:
        if isinstance(event, Done):
            status = event.finish_reason if event.finish_reason in ("cancelled", "timeout") else "ok"
            outcome = dict(status=status, prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                           cached_tokens=event.cached_tokens, ttft=event.ttft, duration=event.duration,
                           tokens_per_second=event.tokens_per_second, finish_reason=event.finish_reason)
            if event.cause is not None:  # the server cut it: the row says why, and the status a non-stream got
                outcome["error_message"] = AnswerCutError.CAUSES[event.cause]
                if record.context.http_status is not None and not record.context.stream:
                    outcome["http_status"] = AnswerCutError.status
        else:
            outcome = record.failed(event.error, answered=record.context.stream and bool(text))
        outcome.update(tool_calls=len(calls), tool_names=",".join(c.name for c in calls) or None,
                       constrained=constrained, **images)
        record.end(outcome, {"prompt": content, "completion": "".join(text)})

    def emit(event: Event) -> None:
        if isinstance(event, Delta):
            text.append(event.text)
            if parser is not None:  # content goes on as deltas, calls as their pieces, then whole
                send(parser.feed(event.text), event.logprobs)
                if parser.repeated:  # the model repeats a call: its turn is over
                    cancel()
                return
        elif isinstance(event, Done) and (parser is not None or parse is not None):
            if parser is not None:
                send(parser.finish())
            calls = list(parser.calls) if parser is not None else []
            parsed = parse("".join(text)) if parse is not None else None
            ended = event.finish_reason == "stop" or (parser is not None and parser.repeated)
            done = replace(event, finish_reason="tool_calls") if calls and ended else event
            finish(done, calls)
            sink(Final(done, calls, parsed, constrained))
            return
        elif isinstance(event, (Done, Failed)):
            finish(event, [])
        sink(event)

    return emit


def start(pool: Registry, request: ChatRequest, model: str | None, sink: Callable[[StreamEvent], None],
          context: RequestContext, backlog: Callable[[], int] | None = None,
          keep: bool = False, progress: Callable[[int, int], None] | None = None) -> tuple[str, str, Request]:
    """Check, tokenize and submit ``request`` (on any thread but the engine's): returns its id, the
    name its model answers to, and the engine request. Its events go to ``sink``; ``backlog()`` says
    how many of them its consumer has not taken yet (the engine parks a request left unread);
    ``keep``: its KV goes to the prompt cache's disk tier whatever its length (see kv_disk); ``progress`` is
    told (tokens prefilled, prompt tokens) as a long prompt is prefilled, on the engine thread."""
    info = chat_model(pool, model)
    check_images(info, request)
    runner = pool.runner(info.name)
    p = fit_to_model(request.params, runner.vocab_size)
    _check_fits(info, runner, request)
    if request.structured and info.placement != "local":  # a grammar matcher cannot cross to another process yet
        raise InvalidParameterError("tools" if request.tools else "schema", f"model {info.name!r} runs in other "
                                    "processes: tools and structured output need a model of this process")
    if request.params.logprobs and info.placement != "local":  # the tokens' distributions stay in its processes
        raise InvalidParameterError("logprobs", f"logprobs is not supported for model {info.name!r}, which runs in "
                                    "other processes: only a model of this process gives its distributions")
    if request.params.logprobs:  # the tokenizer's first conversion (~0.3 s) here, not on the engine thread
        token_bytes(runner.tokenizer)
    if isinstance(request.prompt, tuple) and runner.tokenizer is None:
        raise InvalidParameterError("prompt", f"model {info.name!r} is attached: its server tokenizes, so the "
                                    "prompt must be text")
    ids, chat_plan, images = tokens(runner, request) if runner.tokenizer is not None else ([], None, None)
    p = _fit_context(info, request, len(ids), p)  # an attached server templates and tokenizes itself
    content: Any = request.prompt if request.prompt is not None else audit_messages(request)
    record = pool.begin(request.kind, info.name, context)
    emit = _emitter(record, chat_plan, content, sink, lambda: engine_request.cancelled.set(), image_fields(request))
    engine_request = Request(info.name, ids, p, emit, deadline=context.deadline, priority=context.priority,
                             constraint=chat_plan.constraint if chat_plan is not None else None, backlog=backlog,
                             keep=keep, progress=progress, images=images, client=context.client)
    pool.submit(engine_request, content)
    return record.id, info.alias or info.name, engine_request


def check_fits(pool: Registry, request: ChatRequest, model: str | None) -> None:
    """The checks :func:`start` makes of ``request``'s prompt (its token ids, its length in the context), without
    starting it."""
    info = chat_model(pool, model)
    check_images(info, request)
    runner = pool.runner(info.name)
    _check_fits(info, runner, request)
    if runner.tokenizer is not None:
        _fit_context(info, request, len(tokens(runner, request)[0]), fit_to_model(request.params, runner.vocab_size))


def count_tokens(pool: Registry, request: ChatRequest, model: str | None) -> int:
    """How many tokens ``request``'s prompt takes with its model's template (tools included)."""
    info = chat_model(pool, model)
    check_images(info, request)
    runner = pool.runner(info.name)
    if runner.tokenizer is None:
        raise InvalidParameterError("model", f"model {info.name!r} is attached: its tokenizer is on its server")
    return len(tokens(runner, request)[0])
