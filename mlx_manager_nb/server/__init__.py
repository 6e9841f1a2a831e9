"""The in-kernel HTTP server: the OpenAI and Anthropic protocols over the shared pool.

>>> from mlx_manager_nb import serve
>>> server = serve(port=8000)        # in a notebook: on the kernel's loop, the cell returns at once
>>> server.url
'http://127.0.0.1:8000'
>>> server.stop()

``create_app(pool)`` returns the endpoints as an aiohttp application without a ``/v1`` prefix of
its own, to mount in another app: ``parent.add_subapp("/v1", create_app(pool))``.

A cell cannot call a server that runs on its own kernel's loop synchronously (the cell blocks the
loop the server needs); use the in-process API (``pool.chat``) there, or ``serve(mode="thread")``.

Modules: ``app`` (the aiohttp apps), ``common`` (what every endpoint shares), ``streaming`` (JSON
or SSE answers), one module per protocol (``openai_api``, ``anthropic_api``, and ``responses_api``
with its answers' shapes in ``responses_output``), and ``lifecycle`` (starting, stopping and
listing servers).
"""

from .app import MAX_BODY, create_app
from .lifecycle import Server, on_servers_changed, running_servers, serve

__all__ = ["MAX_BODY", "Server", "create_app", "on_servers_changed", "running_servers", "serve"]
