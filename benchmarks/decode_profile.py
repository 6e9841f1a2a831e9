# ruff: noqa: I001  (the benchmarks import common first: it binds the fast BLAS before mlx loads)
"""Where one decoding step of the demo model goes, for one stream and for 8, against raw mlx-lm.

    .venv/bin/python benchmarks/decode_profile.py [--repeats 5]

(``MLX_NB_BLAS_THREADS=2`` profiles with two OpenBLAS threads; by default one.)

Prints, in ms per step and as a share of the engine's step:

- the engine's step (``Engine`` driving mlx-lm's ``BatchGenerator`` on its thread, greedy), split into
  the time inside ``BatchGenerator.next()``, the engine's per-token handling (detokenizer, stop matcher,
  delivering the event) and its own bookkeeping (the rest of the loop: cancellation, deadline and
  backpressure checks, KV accounting, the inbox);
- each part timed alone on the same shapes, synchronously: the model's forward pass, the Python that
  builds its graph, its matmuls (the linear layers and the tied output projection, with their achieved
  GB/s against the memory bandwidth measured in the same run) and the other ops (the rest of the
  forward pass; how many per step, by kind), the sampler (greedy and
  temperature + top-p, with the log-softmax mlx-lm applies first), a logits processor (repetition
  penalty), the detokenizer and the stop matcher;
- raw mlx-lm on the same weights, in the same run: ``stream_generate``'s step for one stream, a bare
  ``BatchGenerator`` step for 8.

The parts timed alone overlap in the real step (mlx-lm evaluates step n+1 while Python handles step n),
so they need not add up to it. Each figure is the median of ``--repeats`` runs: on a shared machine,
compare the ratios within one run.
"""

import collections
import io
import os
import re
import statistics
import sys
import threading
import time

os.environ.setdefault("MLX_NB_BLAS_THREADS", "1")  # one fixed count for every part (the engine sets none then)
from common import bandwidth, demo_path, linear_weights, messages  # first: binds the fast BLAS
import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import greedy_sampler, make_sampler as mlx_lm_make_sampler

from mlx_manager_nb import blas
from mlx_manager_nb.engine import Engine, Request
from mlx_manager_nb.params import GenParams, make_processors, make_sampler
from mlx_manager_nb.registry import _prepare_chat
from mlx_manager_nb.stops import StopMatcher

STEPS = 48  # decoding steps per measured run
mlx_lm_sampler = mlx_lm_make_sampler(temp=0.7, top_p=0.9)  # mlx-lm's own, sorting every logit for top-p
STOPS = ("\n\nUser:", "</answer>")  # what a stop-matching request checks each token against


def median_of(repeats: int, fn) -> float:
    """The median of ``repeats`` calls of ``fn`` (after one warm-up call)."""
    fn()
    return statistics.median(fn() for _ in range(repeats))


def op_counts(outputs: list[mx.array]) -> collections.Counter:
    """Primitive ops in the unevaluated graph of ``outputs``, by kind (MLX's DOT export, one node per op)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return collections.Counter(re.findall(r'label ="([^"]+)", shape=rectangle', dot.getvalue()))


def prefilled(model, prompts: list[list[int]]) -> tuple[list, mx.array]:
    """A batch KV cache holding ``prompts`` (of equal length) and the next input tokens."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([p[:-1] for p in prompts]), cache=cache)
    mx.eval(logits, [c.state for c in cache])
    return cache, mx.array([[p[-1]] for p in prompts])


def per_step(fn, steps: int = STEPS) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def forward_step(model, prompts):
    cache, tokens = prefilled(model, prompts)

    def step():
        mx.eval(model(tokens, cache=cache))

    return lambda: per_step(step)


def build_step(model, prompts):
    """Python building one step's graph (the model's call, nothing evaluated)."""
    cache, tokens = prefilled(model, prompts)

    def run() -> float:
        took = per_step(lambda: model(tokens, cache=cache))
        mx.eval([c.state for c in cache])
        return took

    return run


def matmul_step(weights: list[mx.array], rows: int):
    xs = [mx.random.normal((rows, w.shape[1])) for w in weights]
    mx.eval(xs)
    return lambda: per_step(lambda: mx.eval([x @ w.T for x, w in zip(xs, weights, strict=True)]))


def sampler_step(sampler, logits: mx.array):
    def step():
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(sampler(logprobs))

    return lambda: per_step(step)


def processor_step(rows: int, logits: mx.array, context: mx.array):
    processors = [make_processors(GenParams(repetition_penalty=1.1))[0] for _ in range(rows)]

    def step():  # as mlx-lm's batch applies them: row by row, then concatenated
        mx.eval(mx.concatenate([p(context, logits[e:e + 1]) for e, p in enumerate(processors)], axis=0))

    return lambda: per_step(step)


def text_steps(tokenizer, tokens: list[int], rows: int):
    """Detokenizer and stop matcher seconds per step for ``rows`` streams decoding ``tokens``."""

    def detok() -> float:
        ds = [tokenizer.detokenizer for _ in range(rows)]
        for d in ds:
            d.reset()
        start = time.perf_counter()
        for t in tokens:
            for d in ds:
                d.add_token(t)
                d.last_segment  # noqa: B018  (what the engine reads each token)
        return (time.perf_counter() - start) / len(tokens)

    segments = []
    d = tokenizer.detokenizer
    d.reset()
    for t in tokens:
        d.add_token(t)
        segments.append(d.last_segment)

    def stops() -> float:
        matchers = [StopMatcher(STOPS) for _ in range(rows)]
        start = time.perf_counter()
        for s in segments:
            for m in matchers:
                m.feed(s)
        return (time.perf_counter() - start) / len(segments)

    return detok, stops


def raw_single(model, tokenizer, prompt: list[int]):
    def run() -> float:
        *_, last = stream_generate(model, tokenizer, prompt, max_tokens=STEPS, sampler=greedy_sampler)
        return 1 / last.generation_tps

    return run


def raw_batch(model, prompts: list[list[int]]):
    def run() -> float:
        gen = BatchGenerator(model, completion_batch_size=32, prefill_batch_size=8)
        gen.insert(prompts, max_tokens=[STEPS + 1] * len(prompts))
        while len(gen.next()[1]) < len(prompts):  # prefill, until every row decodes
            pass
        start = time.perf_counter()
        for _ in range(STEPS - 2):
            gen.next()
        took = (time.perf_counter() - start) / (STEPS - 2)
        gen.close()
        return took

    return run


class EngineTimes:
    """The engine's decoding steps, timed from inside: ``BatchGenerator.next()``, ``_on_token`` and the rest."""

    def __init__(self, engine: Engine, runner):
        self.engine, self.runner = engine, runner
        self.steps: list[list[float]] = []  # per next() call: start, its duration, rows decoding, _on_token time
        on_token = engine._on_token

        def timed_token(*args):
            start = time.perf_counter()
            try:
                return on_token(*args)
            finally:
                if self.steps:
                    self.steps[-1][3] += time.perf_counter() - start

        engine._on_token = timed_token  # type: ignore[method-assign]

    def _wrap_next(self) -> None:
        gen = self.runner.batch()
        if getattr(gen, "_timed", False):
            return
        plain = gen.next

        def timed_next():
            start = time.perf_counter()
            rows = len(self.runner.active)
            try:
                return plain()
            finally:
                self.steps.append([start, time.perf_counter() - start, rows, 0.0])

        gen.next, gen._timed = timed_next, True

    def run(self, prompts: list[list[int]]) -> tuple[float, float, float] | None:
        """Decode ``prompts`` together; seconds per step while all of them decode: in total, inside next(),
        in _on_token (None when they never all decoded at once: a first run, whose prompts were prefilled
        one after another; later runs find them in the prompt cache and join in one step)."""
        self.engine.run(self._wrap_next).result()
        done = threading.Semaphore(0)

        def emit(event) -> None:
            if not hasattr(event, "text"):
                done.release()

        self.steps = []
        for p in prompts:
            self.engine.submit(Request(self.runner.name, p, GenParams(temperature=0, max_tokens=STEPS, stop=STOPS),
                                       emit))
        for _ in prompts:
            done.acquire()
        rows = len(prompts)
        full = [i for i, s in enumerate(self.steps[:-1]) if s[2] == rows and self.steps[i + 1][2] == rows]
        full = full[2:]  # the first steps of a full batch still finish its prompts' prefill
        if not full:
            return None
        wall = [self.steps[i + 1][0] - self.steps[i][0] for i in full]
        return (statistics.median(wall), statistics.median(self.steps[i][1] for i in full),
                statistics.median(self.steps[i][3] for i in full))


def main() -> None:
    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 5
    path = demo_path()
    runner = _prepare_chat("demo", path, dequantize=mx.default_device().type == mx.DeviceType.cpu)()
    mx.eval(runner.model.parameters())
    model, tokenizer = runner.model, runner.tokenizer
    engine = Engine()
    engine.run(engine.add_runner, runner).result()
    times = EngineTimes(engine, runner)

    weights = linear_weights(model)
    weight_bytes = sum(w.nbytes for w in weights)
    bw = bandwidth()
    load = os.getloadavg()[0]
    print(f"demo model (float32), {len(weights)} weight matrices, {weight_bytes / 1e9:.3f} GB read per step; "
          f"BLAS {blas.status.split(':')[0]}, one-row products {blas.gemv_status}, "
          f"{blas.threads()} thread(s); 1-min load average {load:.1f} on {os.cpu_count()} cores; "
          f"medians of {repeats} rounds of {STEPS} steps, every part once a round")

    base = tokenizer.apply_chat_template(messages(0), add_generation_prompt=True)
    text_tokens = tokenizer.encode(" ".join(["The lighthouse keeper walked along the shore at dawn."] * 8))[:STEPS]
    for rows in (1, 8):
        prompts = [tokenizer.apply_chat_template(messages(i + 1), add_generation_prompt=True) for i in range(rows)]
        n = min(map(len, prompts))
        prompts = [p[:n] for p in prompts]  # equal lengths, so the bare forward pass batches them without padding

        times.run(prompts)  # warms up, and puts the prompts into the prompt cache
        cache, tokens = prefilled(model, prompts)
        step_logits = model(tokens, cache=cache)
        kinds = op_counts([step_logits])
        matmuls = len(weights)
        other = f"  other ops ({sum(kinds.values()) - matmuls} ops)"
        logits = step_logits[:, -1]  # the model's own next-token logits: the samplers see real distributions
        mx.eval(logits)
        detok, stops = text_steps(tokenizer, text_tokens, rows)
        parts = {
            "engine": lambda prompts=prompts: times.run(prompts),
            "forward pass alone": forward_step(model, prompts),
            "  Python building its graph": build_step(model, prompts),
            f"  matmuls ({matmuls} ops)": matmul_step(weights, rows),
            "sampler, greedy": sampler_step(greedy_sampler, logits),
            "sampler, temperature 0.7": sampler_step(make_sampler(GenParams(temperature=0.7, seed=1)), logits),
            "sampler, temperature + top-p 0.9": sampler_step(
                make_sampler(GenParams(temperature=0.7, top_p=0.9, seed=1)), logits),
            "  the same with mlx-lm's top-p (full sort)": sampler_step(mlx_lm_sampler, logits),
            "logits processor (repetition penalty)": processor_step(rows, logits, mx.array(base)),
            "detokenizer": detok,
            "stop matcher (2 stops)": stops,
            "raw": raw_single(model, tokenizer, base) if rows == 1 else raw_batch(model, prompts),
            "bandwidth": bandwidth,
        }
        for fn in parts.values():  # warm-up
            fn()
        measured: dict[str, list] = {name: [] for name in parts}
        for _ in range(repeats):  # in rounds, so that every part meets the machine's changing load alike
            for name, fn in parts.items():
                measured[name].append(fn())
        runs = [r for r in measured.pop("engine") if r is not None]
        figures = {
            "engine step": statistics.median(r[0] for r in runs),
            "  inside BatchGenerator.next()": statistics.median(r[1] for r in runs),
            "  engine per-token handling": statistics.median(r[2] for r in runs),
        }
        figures["  engine bookkeeping (the rest)"] = max(
            0.0, figures["engine step"] - figures["  inside BatchGenerator.next()"]
            - figures["  engine per-token handling"])
        bw = max(bw, *measured.pop("bandwidth"))
        raw = statistics.median(measured.pop("raw"))
        figures |= {name: statistics.median(values) for name, values in measured.items()}
        figures[other] = max(0.0, figures["forward pass alone"] - figures[f"  matmuls ({matmuls} ops)"]
                             - figures["  Python building its graph"])
        report(rows, figures, raw, weight_bytes, bw, matmuls)
        print("  ops per step by kind: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common(12)) + ", ...")
    engine.stop()


def report(rows: int, figures: dict[str, float], raw: float, weight_bytes: int, bw: float, matmuls: int) -> None:
    step = figures["engine step"]
    label = "raw mlx-lm stream_generate step" if rows == 1 else "raw mlx-lm BatchGenerator step"
    print(f"\n{rows} stream{'s' if rows > 1 else ''} ({rows * 1 / step:.1f} tok/s through the engine; memory "
          f"bandwidth {bw / 1e9:.1f} GB/s, the best numpy copy of the rounds)")
    print(f"  {'':44} {'ms/step':>9} {'share':>7}")
    order = ["engine step", "  inside BatchGenerator.next()", "  engine per-token handling",
             "  engine bookkeeping (the rest)", "forward pass alone", "  Python building its graph",
             f"  matmuls ({matmuls} ops)"]
    order += [k for k in figures if k.startswith("  other ops")]
    order += ["sampler, greedy", "sampler, temperature 0.7", "sampler, temperature + top-p 0.9",
              "  the same with mlx-lm's top-p (full sort)",
              "logits processor (repetition penalty)",
              "detokenizer", "stop matcher (2 stops)"]
    for key in order:
        extra = ""
        if key.startswith("  matmuls"):
            achieved = weight_bytes / figures[key]
            extra = f"   {achieved / 1e9:.1f} GB/s, {achieved / bw:.2f} of bandwidth"
        print(f"  {key:44} {figures[key] * 1000:9.3f} {figures[key] / step:7.1%}{extra}")
    print(f"  {label:44} {raw * 1000:9.3f} {raw / step:7.1%}   engine/raw {step / raw:.2f}x")
    limit = weight_bytes / bw
    print(f"  {'bandwidth limit (weights / bandwidth, best)':44} {limit * 1000:9.3f} {limit / step:7.1%}"
          f"   engine at {limit / step:.2f} of it")


if __name__ == "__main__":
    main()
