"""Another process using the library: it writes audit rows to ``$MLX_NB_HOME/audit.db`` until stopped.

The suite runs it beside the notebooks (see the root conftest.py), as another notebook or a server
would, so that no checked output can depend on who else writes to the shared log.

    MLX_NB_HOME=... python tests/audit_writer.py [SECONDS_BETWEEN_ROWS]
"""

import itertools
import signal
import sys
import time

from mlx_manager_nb.audit_log import AuditLog

DEMO = "smollm2-135m-instruct"
ROWS = [  # the kinds of rows the notebooks write themselves, for the same model
    {"source": "api", "endpoint": "pool.chat", "protocol": "python", "model": DEMO, "status": "ok",
     "prompt_tokens": 42, "completion_tokens": 7, "ttft": 0.2, "duration": 0.9, "tokens_per_second": 9.0},
    {"source": "http", "endpoint": "/v1/chat/completions", "protocol": "openai", "model": DEMO, "status": "ok",
     "http_status": 200, "stream": True, "prompt_tokens": 33, "completion_tokens": 20, "ttft": 0.1, "duration": 1.3},
    {"source": "magic", "endpoint": "%%chat", "protocol": "python", "model": DEMO, "status": "error",
     "error_type": "ValueError", "error_message": "written by tests/audit_writer.py"},
    {"source": "http", "endpoint": "/v1/messages", "protocol": "anthropic", "model": "no-such-model",
     "status": "error", "http_status": 404, "error_type": "ApiError", "error_message": "no such model"},
]


def main() -> None:
    interval = float(sys.argv[1]) if len(sys.argv) > 1 else 0.2
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    log = AuditLog()
    print(f"writing to {log.path}", flush=True)
    written = 0
    for row in itertools.cycle(ROWS):
        if stopping:
            break
        log.record(row)
        written += 1
        time.sleep(interval)
    log.close()
    print(f"wrote {written} rows", flush=True)


if __name__ == "__main__":
    main()
