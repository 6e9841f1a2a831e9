"""Backpressure: a stream nobody reads leaves the batch, resumes with the same answer when read, and is
cancelled after its idle time; unread HTTP streams give their batch slots back to a bystander. On the
tiny model."""

import json
import socket
import time

import openai
import pytest
from helpers import wait_for

from mlx_manager_nb.errors import AnswerCutError
from mlx_manager_nb.server import serve

HI = [{"role": "user", "content": "Hi"}]
LONG_TEXT = {"type": "object", "properties": {"text": {"type": "string", "minLength": 150, "maxLength": 160}},
             "required": ["text"], "additionalProperties": False}


def runner(pool):
    return pool.engine.runner("tiny-llama")


def parked_still(pool, n: int = 1) -> bool:
    """Whether ``n`` streams are parked and stay so (their token counts do not move) for 0.3 s."""
    if not wait_for(lambda: len(runner(pool).parked) == n):
        return False
    before = [p.seq.tokens for p in runner(pool).parked]
    time.sleep(0.3)
    return [p.seq.tokens for p in runner(pool).parked] == before


@pytest.mark.parametrize("params", [{}, {"schema": LONG_TEXT}], ids=["text", "grammar"])
def test_an_unread_stream_is_parked_and_resumes_with_the_same_answer(pool, params):
    expected = pool.chat(HI, max_tokens=200, temperature=0, **params)
    assert expected.usage.completion_tokens > 60  # long enough to fill the buffer
    s = pool.chat(HI, max_tokens=200, temperature=0, stream=True, **params)
    assert parked_still(pool)
    assert runner(pool).parked[0].seq.tokens < expected.usage.completion_tokens
    parked = time.perf_counter()
    text = "".join(s)
    assert not runner(pool).parked
    assert text == expected.text and s.result.finish_reason == expected.finish_reason
    assert (s.result.usage.prompt_tokens, s.result.usage.completion_tokens) == (
        expected.usage.prompt_tokens, expected.usage.completion_tokens)
    assert s.result.parsed == expected.parsed
    assert s.result.ttft < s.result.duration - (time.perf_counter() - parked)  # timed at the first token


def test_a_stream_parked_past_its_idle_time_is_cancelled_with_its_row(pool, audit):
    pool.engine.unread_timeout = 0.5
    s = pool.chat(HI, max_tokens=200, temperature=0, stream=True)
    assert wait_for(lambda: len(runner(pool).parked) == 1)
    assert wait_for(lambda: not runner(pool).parked)
    with pytest.raises(AnswerCutError, match="unread"):
        for _ in s:
            pass
    assert s.text  # what was generated before it was parked
    audit.flush()
    (row,) = audit.query()
    assert row["status"] == "cancelled" and "unread" in row["error_message"]


def test_a_stream_closed_while_parked_ends_cancelled_as_before(pool, audit):
    s = pool.chat(HI, max_tokens=200, temperature=0, stream=True)
    assert wait_for(lambda: len(runner(pool).parked) == 1)
    s.close()
    assert wait_for(lambda: not runner(pool).parked)
    audit.flush()
    assert wait_for(lambda: [(r["status"], r["error_message"]) for r in audit.query()] == [("cancelled", None)])


def unread_stream(port: int, client: str = "127.0.0.1") -> socket.socket:
    """A streamed chat from a client (an address) that never reads its answer (and keeps its receive
    buffer small)."""
    body = json.dumps({"model": "tiny", "messages": HI, "max_tokens": 400, "temperature": 0, "stream": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.bind((client, 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def read_stream(sock: socket.socket) -> str:
    """Read a chat stream's answer to its end; its text, from the chunks' deltas."""
    raw = b""
    while b"data: [DONE]" not in raw:
        raw += sock.recv(1 << 16)
    body, text = raw.split(b"\r\n\r\n", 1)[1], ""
    while body:  # chunked transfer encoding: size, CRLF, data, CRLF
        size, rest = body.split(b"\r\n", 1)
        chunk, body = rest[:int(size, 16)], rest[int(size, 16) + 2:]
        for line in chunk.split(b"\n"):
            if line.startswith(b"data: {"):
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    return text


def test_an_unread_http_stream_resumes_when_read_with_the_same_text(pool, server):
    expected = pool.chat(HI, max_tokens=400, temperature=0).text
    sock = unread_stream(server.port)
    assert parked_still(pool)
    with sock:
        assert read_stream(sock) == expected
    assert not runner(pool).parked


def closed_by_server(sock: socket.socket) -> bool:
    """Read what the server sent until it closes the connection; False if it is still open after 10 s."""
    sock.settimeout(10)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    finally:
        sock.close()
    return True


def test_unread_http_streams_are_parked_beside_a_bystander_then_cancelled(pool, audit):
    pool.engine.unread_timeout = 3.0
    s = serve(pool, port=0, mode="thread")
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)

    def bystander() -> float:
        start = time.perf_counter()
        r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=24, temperature=0)
        assert r.usage.completion_tokens == 24
        return time.perf_counter() - start

    try:
        bystander()  # warm
        quiet = min(bystander() for _ in range(3))
        unread = [unread_stream(s.port, f"127.0.0.{10 + i}") for i in range(40)]  # more than a batch holds (32)
        assert wait_for(lambda: pool.models()[0].in_flight == 40)
        loaded = bystander()
        assert wait_for(lambda: len(runner(pool).parked) == 40, 30)
        assert all(p.seq.tokens < 200 for p in runner(pool).parked)  # of 400: parked once their buffers filled
        after = bystander()
        assert wait_for(lambda: pool.models()[0].in_flight == 0, 10)  # cut after their idle time
        closed = [closed_by_server(sock) for sock in unread]
    finally:
        s.stop(drain=0)
    assert loaded < 20 * quiet + 2 and after < 3 * quiet + 0.5, (quiet, loaded, after)
    assert all(closed) and not runner(pool).parked
    rows = [r for r in audit.query() if r["stream"]]
    assert len(rows) == 40 and {(r["status"], r["http_status"]) for r in rows} == {("cancelled", 200)}
    assert all("unread" in r["error_message"] for r in rows)
