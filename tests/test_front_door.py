"""The package root holds every public name; the defaults and the running servers each have one owner."""

import subprocess
import sys

import pytest
from helpers import wait_for
from IPython.utils.capture import capture_output

import mlx_manager_nb
from mlx_manager_nb import defaults
from mlx_manager_nb.server import create_app, running_servers, serve
from mlx_manager_nb.widgets import server_panel

PUBLIC = ["pool", "audit", "Pool", "AuditLog", "serve", "create_app", "Server", "Result", "TextStream", "ModelInfo",
          "MLXManagerError", "ModelNotFoundError", "InvalidModelError", "UnsupportedModelError", "PoolFullError",
          "EngineError", "ServerError", "DemoModelUnavailableError", "list_local_models", "import_gguf",
          "dashboard", "doctor", "scratch_home", "__version__"]


def test_every_public_name_is_importable_from_the_root_and_listed():
    names = dir(mlx_manager_nb)
    for name in PUBLIC:
        assert name in names and name in mlx_manager_nb.__all__, name
    code = ("import sys, mlx_manager_nb\nfrom mlx_manager_nb import serve, Pool, Result, dashboard, doctor\n"
            "assert 'mlx_manager_nb.model_pool' in sys.modules\nassert callable(doctor) and callable(serve)\n")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_importing_the_package_creates_nothing(isolated_home):
    code = "import sys, mlx_manager_nb; assert 'mlx_manager_nb.model_pool' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert not isolated_home.exists()


def test_doctor_is_the_function_not_the_module(make_pool):
    from mlx_manager_nb import doctor

    report = doctor(make_pool(keep_alive=None))
    assert report["gflops"] > 0 and report["device"] in ("CPU", "GPU (Metal)")


def test_the_defaults_are_created_once_and_reset_in_one_place(isolated_home):
    defaults.reset_defaults()
    try:
        assert mlx_manager_nb.pool is defaults.default_pool() is mlx_manager_nb.pool
        assert mlx_manager_nb.pool.audit is mlx_manager_nb.audit is defaults.default_audit()
        assert mlx_manager_nb.audit.path == isolated_home / "audit.db"
        first = mlx_manager_nb.pool
        defaults.reset_defaults()
        assert defaults.existing_pool() is None and mlx_manager_nb.pool is not first
    finally:
        defaults.reset_defaults()


def test_create_app_takes_its_pool_explicitly():
    with pytest.raises(TypeError):
        create_app()  # type: ignore[call-arg]


@pytest.fixture
def tiny_shell(shell, tiny_model_path):
    """A fresh shell over a fresh default pool holding the tiny model."""
    defaults.default_pool().load(tiny_model_path)
    return shell


def magic(ip, line):
    with capture_output() as c:
        ip.run_line_magic("mlx", line)
    return c


def test_a_server_started_with_the_magic_shows_in_the_panel(tiny_shell):
    parts = server_panel().parts
    assert "Server stopped" in parts.url.value
    magic(tiny_shell, "serve --thread --port 0")
    (server,) = running_servers()
    assert wait_for(lambda: server.url in parts.url.value) and parts.toggle.description == "Stop server"
    parts.toggle.value = False  # the panel stops the magic's server
    assert wait_for(lambda: "Server stopped" in parts.url.value) and not server.running
    assert running_servers() == []


def test_a_server_started_from_the_panel_is_seen_and_stopped_by_the_magic(tiny_shell):
    parts = server_panel().parts
    parts.port.value = 0
    parts.toggle.value = True
    assert parts.error.value == ""
    (server,) = running_servers(defaults.default_pool())
    status = magic(tiny_shell, "status").outputs[0].data["text/plain"]
    assert server.url in status
    assert magic(tiny_shell, "stop").stdout == f"The server at {server.url} stopped.\n"
    assert not server.running and wait_for(lambda: "Server stopped" in parts.url.value)


def test_servers_of_other_pools_are_listed_apart(make_pool):
    pool = make_pool(keep_alive=None)
    server = serve(pool, port=0, mode="thread")
    try:
        assert server in running_servers() and running_servers(pool) == [server]
        assert running_servers(make_pool(keep_alive=None)) == []
    finally:
        server.stop(drain=0)
    assert server not in running_servers()
