"""The model store: turn any model reference into a local mlx-lm folder.

A reference is, in the order tried:

1. ``"demo"``: the offline demo model (see :mod:`mlx_manager_nb.demo`); ``"demo-embed"``: the
   demo embedding model (see :mod:`mlx_manager_nb.demo_embed`);
2. a path to an mlx-lm folder, or to a ``.gguf`` file (imported into the store once);
3. the name of a model in the store (``$MLX_NB_HOME/models/NAME``);
4. a Hugging Face repo id (``org/name``) in the local Hugging Face cache, or pulled into the
   store (``ORG--NAME``, see :mod:`mlx_manager_nb.hub`), or pulled now where the hub is reachable.

>>> resolve("demo")
PosixPath('/home/me/.cache/mlx_manager_nb/models/smollm2-135m-instruct')
>>> [m.name for m in list_local_models()]
['smollm2-135m-instruct', 'tiny']
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_dir

from .errors import InvalidModelError, ModelNotFoundError

Progress = Callable[[str, float], None]

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json")
MODEL_FILES = ("*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken")  # what mlx-lm reads


def home() -> Path:
    """The library's data folder: ``$MLX_NB_HOME``, else a folder in the user's cache dir."""
    return Path(os.environ.get("MLX_NB_HOME") or user_cache_dir("mlx_manager_nb")).expanduser()


def make_private_dir(path: Path) -> Path:
    """Create folder ``path`` (and missing parents) owner-only, 0700; an existing folder keeps its mode."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        return path
    os.chmod(path, 0o700)  # the umask may have taken bits off mkdir's mode
    return path


def models_dir() -> Path:
    return home() / "models"


@dataclass(frozen=True)
class LocalModel:
    """A model folder that can be loaded, described from its config and tokenizer files alone."""

    name: str
    path: Path
    architecture: str
    size_bytes: int
    quantization: str
    context_length: int | None
    has_chat_template: bool
    origin: str  # "store" or "hf-cache"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise InvalidModelError(f"{path} is not valid JSON: {e}") from None


def _check_safetensors(path: Path) -> None:
    """Read a safetensors header (not its data) and check the file holds all the bytes it announces."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidModelError(f"{path} is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise InvalidModelError(f"{path} is corrupt: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise InvalidModelError(f"{path} is corrupt: its safetensors header is not JSON") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) > size:
        raise InvalidModelError(
            f"{path} is truncated: {size} bytes, the header announces {8 + n + max(ends)}"
        )


def validate_model_dir(path: Path) -> Path:
    """Check that `path` is a loadable mlx-lm folder; raise InvalidModelError naming what is missing."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InvalidModelError(f"{path} has no config.json: not an mlx-lm model folder")
    config = _read_json(path / "config.json")
    if "model_type" not in config:
        raise InvalidModelError(f"{path}/config.json has no 'model_type'")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise InvalidModelError(f"{path} has no *.safetensors weight files")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise InvalidModelError(
            f"{path} has no tokenizer (looked for {', '.join(TOKENIZER_FILES)})"
        )
    for w in weights:
        _check_safetensors(w)
    return path


def _chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        return bool(_read_json(path / "tokenizer_config.json").get("chat_template"))
    except (FileNotFoundError, InvalidModelError):
        return False


def _quantization(config: dict) -> str:
    q = config.get("quantization") or config.get("quantization_config")
    if not q:
        return str(config.get("torch_dtype") or config.get("dtype") or "float")
    bits = {q.get("bits")} | {v["bits"] for v in q.values() if isinstance(v, dict) and "bits" in v}
    bits.discard(None)
    return "/".join(f"{b}" for b in sorted(bits)) + "-bit" if bits else "quantized"


def read_config(path: Path) -> dict:
    """A model folder's config.json."""
    return _read_json(Path(path) / "config.json")


def describe(path: Path, name: str | None = None, origin: str = "store") -> LocalModel:
    """Describe a model folder from config.json and tokenizer files (weights are never read)."""
    config = read_config(path)
    text = config.get("text_config", {})
    return LocalModel(
        name=name or path.name,
        path=path,
        architecture=config.get("model_type", "?"),
        size_bytes=sum(f.stat().st_size for f in path.glob("*.safetensors")),
        quantization=_quantization(config),
        context_length=config.get("max_position_embeddings") or text.get("max_position_embeddings"),
        has_chat_template=_chat_template(path),
        origin=origin,
    )


def _hf_cache_dirs() -> list[tuple[str, Path]]:
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE)
    found = []
    for repo in sorted(root.glob("models--*")):
        snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
        if snapshots and (snapshots[-1] / "config.json").is_file():
            found.append((repo.name[len("models--"):].replace("--", "/"), snapshots[-1]))
    return found


def list_local_models() -> list[LocalModel]:
    """Every model that can be loaded without a download: the store's, then the Hugging Face cache's."""
    found = []
    candidates = [(p.name, p, "store") for p in sorted(models_dir().glob("*")) if not p.name.startswith(".")]
    candidates += [(n, p, "hf-cache") for n, p in _hf_cache_dirs()]
    for name, path, origin in candidates:
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            try:
                found.append(describe(path, name, origin))
            except InvalidModelError:
                continue
    return found


def find_local(name: str) -> LocalModel:
    """The local model called ``name`` (as :func:`list_local_models` names it)."""
    models = list_local_models()
    for m in models:
        if m.name == name:
            return m
    raise ModelNotFoundError(f"No local model named {name!r}. Local models: "
                             f"{', '.join(m.name for m in models) or 'none'}.")


def disk_size(path: Path) -> int:
    """Bytes of the files under ``path`` (links followed: a Hugging Face snapshot's blobs count)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def check_removable(model: LocalModel, loaded: dict[str, Path]) -> None:
    """Refuse to remove a model while it is in ``loaded`` (name: folder)."""
    users = [name for name, path in loaded.items() if path.resolve() == model.path.resolve()]
    if users:
        raise InvalidModelError(f"{model.name} is loaded (as {', '.join(users)}): unload it first.")


def remove(model: LocalModel, loaded: dict[str, Path]) -> Path:
    """Delete a local model unless it is in ``loaded`` (see :func:`check_removable`); return what was
    removed: a store folder (only the link, for a linked one) or the repo's whole Hugging Face cache entry."""
    check_removable(model, loaded)
    target = model.path.parents[1] if model.origin == "hf-cache" else model.path
    if target.is_symlink():
        target.unlink()
    else:
        shutil.rmtree(target)
    return target


def install(name: str, write: Callable[[Path], None]) -> Path:
    """Build a store entry in a temporary folder and move it into place only when complete."""
    dest = models_dir() / name
    make_private_dir(home())
    models_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir()))
    try:
        write(tmp)
        validate_model_dir(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def store_name(path: Path) -> str:
    """The store name a GGUF file imports under: its lower-cased stem without the quantization tag."""
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.stem
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "model"


def import_gguf(path: str | Path, name: str | None = None, progress: Progress | None = None) -> Path:
    """Convert a GGUF file into an mlx-lm folder in the store; return the folder.

    >>> import_gguf("~/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    PosixPath('/home/me/.cache/mlx_manager_nb/models/smollm2-135m-instruct.q4_1')
    """
    from .gguf import convert_gguf

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {path} does not exist")
    return install(name or store_name(path), lambda tmp: convert_gguf(path, tmp, progress))


def _hf_repo(repo: str, progress: Progress | None) -> Path:
    """A repo from the Hugging Face cache, else the store's pulled copy, else pulled now (see :mod:`.hub`)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from . import hub

    try:
        return Path(snapshot_download(repo, local_files_only=True, allow_patterns=list(MODEL_FILES)))
    except LocalEntryNotFoundError:
        pass
    if hub.pulled_dir(repo).is_dir():
        return hub.pulled_dir(repo)
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(
            f"{repo!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set."
        )
    report = (lambda t: progress("downloading", t.done / t.total if t.total else 0.0)) if progress else None
    return hub.pull(repo, report)


def model_name(ref: str, path: Path) -> str:
    """The name a resolved model goes by: the repo id for the Hugging Face cache, else the folder name."""
    pulled = path.parent == models_dir() and path.name == ref.replace("/", "--")
    return ref if REPO_ID.match(ref) and ("snapshots" in path.parts or pulled) else path.name


@dataclass(frozen=True)
class Named:
    """A named reference (``"demo"``): the store folder it installs, and the function that fetches it."""

    folder: str
    fetch: Callable[[Progress | None], Path]


_NAMED: dict[str, Named] = {}  # registered by the modules that provide them (see mlx_manager_nb.demo)
BUILT_IN = ("demo", "demo_embed")  # this package's modules that register one; imported on first use


def register(ref: str, folder: str, fetch: Callable[[Progress | None], Path]) -> None:
    """Make ``ref`` a named reference: :func:`resolve` fetches it, and a model loaded from the store
    folder ``folder`` answers to it."""
    _NAMED[ref] = Named(folder, fetch)


def named() -> dict[str, Named]:
    """Every named reference: this package's own (``demo``, ``demo-embed``) and any registered since."""
    for module in BUILT_IN:  # by name, at first use: they import this module, not the other way round
        importlib.import_module(f"{__package__}.{module}")
    return _NAMED


def named_folder(ref: str | None) -> str | None:
    """The store folder a named reference installs, or None if ``ref`` is not one."""
    entry = named().get(ref) if ref is not None else None
    return entry.folder if entry is not None else None


def resolve(ref: str | os.PathLike, progress: Progress | None = None) -> Path:
    """Return the local mlx-lm folder for a model reference, importing or fetching it if needed."""
    text = str(ref)
    if text in named():
        return named()[text].fetch(progress)
    path = Path(text).expanduser()
    if path.is_dir():
        return validate_model_dir(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InvalidModelError(f"{path} is a file but not a .gguf; expected a model folder or a GGUF file")
        stored = models_dir() / store_name(path)
        return stored if stored.is_dir() else import_gguf(path, progress=progress)
    if (models_dir() / text).is_dir() and "/" not in text:
        return validate_model_dir(models_dir() / text)
    if REPO_ID.match(text) and not text.startswith((".", "/")) and not path.parent.is_dir():
        return validate_model_dir(_hf_repo(text, progress))
    if text.startswith((".", "/", "~")) or text.endswith(".gguf") or os.sep in text:
        raise ModelNotFoundError(f"No such model file or folder: {path}")
    names = [m.name for m in list_local_models()]
    raise ModelNotFoundError(
        f"No model named {text!r}. Local models: {', '.join(names) or 'none'}; "
        f"'demo' fetches the demo model."
    )
