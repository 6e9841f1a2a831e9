"""The Hugging Face hub: search it, and pull a model's mlx-lm files into the store with byte progress.

The hub is ``$HF_ENDPOINT`` (default https://huggingface.co), with ``$HF_TOKEN`` for gated or private
repos. A pull reads the repo's ``config.json`` first and refuses a ``model_type`` mlx-lm cannot load
before any weight is fetched; it fetches only what mlx-lm reads (config, tokenizer files,
``*.safetensors`` and their index) into ``$MLX_NB_HOME/models/.partial/ORG--NAME`` and moves the
folder into the store when complete. An interrupt or a lost connection keeps the partial files, and
the next pull continues them with ``Range`` requests; any other failure (a full disk included)
removes them.

>>> [r.repo for r in search("qwen", author="mlx-community", limit=2)]
['mlx-community/Qwen3-4B-4bit', 'mlx-community/Qwen2.5-7B-Instruct-4bit']
>>> pull("mlx-community/SmolLM2-135M-Instruct-4bit")
PosixPath('/home/me/.cache/mlx_manager_nb/models/mlx-community--SmolLM2-135M-Instruct-4bit')
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import store
from .errors import InvalidModelError, MLXManagerError, ModelNotFoundError, UnsupportedModelError

CHUNK = 1 << 16
TIMEOUT = 30.0  # seconds without a byte before a request fails
REVISION = ".revision"  # in a pulled folder: the commit its files come from
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no room, over quota, over the file size limit
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # safetensors' dtypes


class HubError(MLXManagerError):
    """The hub cannot be reached or refuses a request (gated repo, no network, full disk)."""

    status = 502


@dataclass(frozen=True)
class Transfer:
    """Where a pull stands: bytes on disk (resumed ones included) of ``total``, this pull's rate, time left."""

    done: int
    total: int
    rate: float  # bytes per second fetched by this pull
    eta: float | None  # seconds left at that rate; None before it is known


TransferProgress = Callable[[Transfer], None]


@dataclass(frozen=True)
class HubModel:
    """One search result."""

    repo: str
    parameters: int | None
    quantization: str | None
    size_bytes: int | None  # what a pull fetches: its mlx-lm files, else its weights; None where not listed
    downloads: int | None
    likes: int | None
    last_modified: datetime | None
    fits: bool | None  # whether size_bytes fits the pool's max_memory; None where the size is unknown


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _token() -> str | None:
    """``$HF_TOKEN``, else the token ``hf auth login`` stored."""
    from huggingface_hub import get_token

    return get_token()


def _quantization(repo: str, tags: list[str]) -> str | None:
    for text in [repo.lower(), *tags]:
        if m := re.search(r"(?<![a-z0-9])(\d{1,2})[-_]?bit", text):
            return f"{m.group(1)}-bit"
    return None


def search(query: str, author: str | None = None, limit: int = 20, max_memory: int | None = None) -> list[HubModel]:
    """Models on the hub matching ``query`` (most downloaded first); ``fits`` compares their size
    with ``max_memory`` (bytes; default: the default pool's)."""
    from huggingface_hub import HfApi

    if max_memory is None:
        from .defaults import default_pool

        max_memory = default_pool().max_memory
    api = HfApi(endpoint=endpoint(), token=_token())
    try:
        found = list(api.list_models(search=query or None, author=author, limit=limit, sort="downloads",
                                     expand=["downloads", "likes", "lastModified", "safetensors", "siblings",
                                             "tags"]))
    except Exception as e:  # httpx's and huggingface_hub's errors alike
        raise _hub_error(e, f"search {query!r}") from None
    rows = []
    for m in found:
        size = _download_size(m)
        params = m.safetensors.total if m.safetensors else None
        rows.append(HubModel(m.id, params, _quantization(m.id, list(m.tags or [])), size, m.downloads, m.likes,
                             m.last_modified, None if size is None else size <= max_memory))
    return rows


def _mlx_files(names: list[str]) -> list[str]:
    """The files of a repo that mlx-lm reads (the store's MODEL_FILES, at its top level)."""
    return [f for f in names if "/" not in f and any(fnmatch.fnmatch(f, p) for p in store.MODEL_FILES)]


def _download_size(m: Any) -> int | None:
    """The bytes a pull of search result ``m`` fetches: its mlx-lm files where the listing gives their
    sizes, else its safetensors weights (parameters by dtype), else None."""
    sizes = {s.rfilename: s.size for s in m.siblings or []}
    wanted = _mlx_files(list(sizes))
    if wanted and all(sizes[f] is not None for f in wanted):
        return sum(sizes[f] or 0 for f in wanted)
    if m.safetensors and all(t in DTYPE_BYTES for t in m.safetensors.parameters):
        return sum(n * DTYPE_BYTES[t] for t, n in m.safetensors.parameters.items())
    return None


def _hub_error(e: BaseException, what: str) -> HubError:
    status = getattr(getattr(e, "response", None), "status_code", None) or getattr(e, "code", None)
    if status in (401, 403):
        return HubError(f"Cannot {what}: the hub answered {status}: the repo is gated or private. Accept its "
                        f"terms on the hub, then set HF_TOKEN to a token with access.")
    if isinstance(status, int):
        return HubError(f"Cannot {what}: the hub ({endpoint()}) answered {status}.")
    return HubError(f"Cannot {what}: the connection to the hub ({endpoint()}) failed ({e}). Check the network, "
                    f"or set HF_HUB_OFFLINE=1 and load from the cache.")


def _request(url: str, start: int = 0) -> Any:
    headers = {"User-Agent": "mlx_manager_nb"}
    if token := _token():
        headers["Authorization"] = f"Bearer {token}"
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)


def _quote(repo: str) -> str:
    return urllib.parse.quote(repo, safe="/")


def files(repo: str, revision: str = "main") -> tuple[str, dict[str, int]]:
    """The commit ``revision`` names in ``repo``, and the files of it that mlx-lm needs with their sizes;
    raise if it is no mlx-lm model."""
    url = f"{endpoint()}/api/models/{_quote(repo)}/revision/{urllib.parse.quote(revision)}?blobs=true"
    try:
        with _request(url) as r:
            info = json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise ModelNotFoundError(f"{repo!r} is not on the hub ({endpoint()}): check the name.") from None
        raise _hub_error(e, f"read {repo!r}") from None
    except (urllib.error.URLError, OSError) as e:
        raise _hub_error(e, f"read {repo!r}") from None
    siblings = {s["rfilename"]: int(s.get("size") or 0) for s in info.get("siblings", [])}
    wanted = {f: siblings[f] for f in _mlx_files(list(siblings))}
    if "config.json" not in wanted or not any(f.endswith(".safetensors") for f in wanted):
        ggufs = [f for f in siblings if f.endswith(".gguf")]
        hint = f" It has GGUF files ({ggufs[0]}...): download one and `%mlx import-gguf` it." if ggufs else ""
        raise InvalidModelError(f"{repo!r} is not an MLX or mlx-lm-convertible model: it has no config.json "
                                f"and *.safetensors weights at its top level.{hint}")
    return str(info.get("sha") or revision), wanted


def pulled_dir(repo: str) -> Path:
    """Where a pulled repo lives in the store."""
    return store.models_dir() / repo.replace("/", "--")


def partials_dir() -> Path:
    """Where pulls cut off keep their files until the next pull of the same repo."""
    return store.models_dir() / ".partial"


def partial_dir(repo: str) -> Path:
    return partials_dir() / repo.replace("/", "--")


def pull(repo: str, progress: TransferProgress | None = None, revision: str = "main") -> Path:
    """Fetch ``repo``'s mlx-lm files into the store (continuing a pull that was cut off); return its folder.

    A repo pulled already at the same commit is not fetched again; two pulls of one repo at once (threads
    or processes) take turns."""
    if not store.REPO_ID.match(repo):
        raise ModelNotFoundError(f"{repo!r} is not a Hugging Face repo id (org/name)")
    commit, wanted = files(repo, revision)
    tmp = partial_dir(repo)
    store.make_private_dir(store.home())
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with (tmp.parent / f"{tmp.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one pull of a repo at a time, across threads and processes
        return _pull(repo, revision, commit, wanted, tmp, progress)


def _pull(repo: str, revision: str, commit: str, wanted: dict[str, int], tmp: Path,
          progress: TransferProgress | None) -> Path:
    dest = pulled_dir(repo)
    if (dest / REVISION).is_file() and (dest / REVISION).read_text() == commit:
        return dest  # up to date (another pull may have just finished it)
    if (tmp / REVISION).is_file() and (tmp / REVISION).read_text() != commit:
        shutil.rmtree(tmp)  # the repo changed since the cut-off pull: its parts are stale
    tmp.mkdir(exist_ok=True)
    (tmp / REVISION).write_text(commit)
    total = sum(wanted.values())
    have = {f: (tmp / f).stat().st_size if (tmp / f).is_file() else 0 for f in wanted}
    missing = total - sum(min(have[f], n) for f, n in wanted.items())
    meter = _Meter(total, total - missing, progress)
    try:
        _fetch(repo, revision, "config.json", wanted["config.json"], tmp / "config.json", meter)
        check_architecture(repo, tmp)
        free = shutil.disk_usage(tmp).free
        if missing > free:
            raise HubError(f"Cannot pull {repo!r}: it needs {missing / 2**20:.1f} MiB, the disk holding "
                           f"{store.models_dir()} has {free / 2**20:.1f} MiB free.")
        for name, size in sorted(wanted.items(), key=lambda kv: kv[1]):  # the weights last
            _fetch(repo, revision, name, size, tmp / name, meter)
        store.validate_model_dir(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except (KeyboardInterrupt, urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
        if isinstance(e, urllib.error.HTTPError):  # the hub refused: nothing to continue
            shutil.rmtree(tmp, ignore_errors=True)
            raise _hub_error(e, f"pull {repo!r}") from None
        if isinstance(e, KeyboardInterrupt):
            raise
        raise _hub_error(e, f"pull {repo!r} (its partial files are kept: pull again to continue)") from None
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            raise HubError(f"Cannot pull {repo!r}: the disk is full ({e.strerror}); its partial files were "
                           f"removed, the store is as it was.") from None
        raise
    return dest


def check_architecture(repo: str, folder: Path) -> None:
    """Refuse the model in ``folder`` (its config.json alone) where neither mlx-lm, by its own lookup and
    remappings, nor this library's encoders can load its ``model_type``."""
    import mlx_lm
    from mlx_lm.utils import _get_classes

    from .bert import ENCODER_TYPES

    config = store.read_config(folder)
    kind = config.get("model_type")
    if kind in ENCODER_TYPES:
        return
    try:
        _get_classes(config)
    except (KeyError, ValueError):
        what = f"a {kind!r} model" if kind else "a model whose config.json names no model_type"
        raise UnsupportedModelError(f"{repo!r} is {what}, which mlx-lm {mlx_lm.__version__} cannot load: nothing "
                                f"past its config.json was downloaded.") from None


class _Meter:
    """Counts bytes and reports a :class:`Transfer` after each chunk."""

    def __init__(self, total: int, done: int, report: TransferProgress | None):
        self.total, self.done, self.start_done = total, done, done
        self.started = time.monotonic()
        self.report = report
        self.add(0)

    def add(self, n: int) -> None:
        self.done += n
        if self.report is None:
            return
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        self.report(Transfer(self.done, self.total, rate, eta))


def _fetch(repo: str, revision: str, name: str, size: int, path: Path, meter: _Meter) -> None:
    start = path.stat().st_size if path.is_file() else 0
    if size and start == size:
        return
    if size and start > size:  # not a part of this file
        path.unlink()
        start = 0
    url = f"{endpoint()}/{_quote(repo)}/resolve/{urllib.parse.quote(revision)}/{urllib.parse.quote(name)}"
    with _request(url, start) as r:
        if start and r.status != 206:  # the server ignored Range: skip what is on disk already
            skip = start
            while skip and (chunk := r.read(min(CHUNK, skip))):
                skip -= len(chunk)
        with path.open("ab") as f:
            while chunk := r.read(CHUNK):
                f.write(chunk)
                meter.add(len(chunk))
    if size and path.stat().st_size != size:  # the connection ended early (or the hub sent more)
        raise ConnectionError(f"{name}: {path.stat().st_size} bytes arrived, the hub lists {size}")
