"""Pretrained-weight store: named checkpoints, a verified local cache, torch and native formats.

The counterpart of PyTorch-Encoding's ``encoding/models/model_store.py``, with one
deliberate difference: **nothing is ever downloaded implicitly**. A checkpoint comes from

* the cache (``source=None``): ``cache_dir()/{file_name}``, where ``file_name`` is upstream's
  ``{name}-{sha1[:8]}.pth`` for upstream weights (a file from ``~/.encoding/models`` can be copied
  as is) or ``{name}-{sha256[:8]}.msgpack`` for native jaxenc checkpoints;
* a local file (``source="path/x.pth"``): a torch ``state_dict`` (``.pth``/``.pt``; a dict holding
  it under ``"state_dict"`` is accepted), upstream's packaging (a ``.zip`` holding one ``.pth``) or
  a native checkpoint (``.msgpack``, see :func:`save_checkpoint`);
* an explicit URL (``source="https://..."`` or ``file://``), downloaded into the cache; the caller
  asks for it, e.g. ``load_pretrained("resnest50", source=pretrained_entry("resnest50").upstream_url)``.

Every file of a registered name is verified before use: SHA-1 for upstream torch files (the digests
upstream publishes), SHA-256 for native and user-registered files. A mismatch raises ValueError
naming the file and both digests; a corrupted file in the cache is removed. Files the store writes
into the cache (download, copy, zip extraction) are written under a per-file lock (``filelock``,
:data:`LOCK_TIMEOUT` seconds) to a temporary file in the cache directory and renamed into place, so
concurrent processes see either no file or a complete one. Unregistered downloads get a
``.sha256`` sidecar so a later corruption is still detected.

Importing this module only defines things: it touches neither disk nor network, and imports torch
only when a torch file is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
import shutil
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import filelock
import jax
import jax.numpy as jnp

from jaxenc.models.native import (
    _CHUNK,
    _digest_mismatch,
    _file_digest,
    _read_sidecar,
    _temp_in,
    _write_sidecar,
    load_checkpoint,
    save_checkpoint,
    shape_problems,
    tree_differences,
)
from jaxenc.models.registry import lookup_name

__all__ = [
    "LOCK_TIMEOUT",
    "PretrainedEntry",
    "add_to_cache",
    "cache_dir",
    "cache_path",
    "load_checkpoint",
    "load_pretrained",
    "pretrained_entry",
    "pretrained_model_list",
    "purge",
    "read_weights",
    "register_pretrained",
    "save_checkpoint",
    "shape_problems",
    "tree_differences",
]

#: Seconds a process waits for another one writing the same cache file before giving up.
LOCK_TIMEOUT = 300.0

#: Where upstream's release archives live (informational: the store never downloads on its own).
UPSTREAM_REPO_URL = "https://s3.us-west-1.wasabisys.com/encoding"

_FORMATS = ("torch", "jaxenc")
_URL_SCHEMES = ("http://", "https://", "file://")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


# --------------------------------------------------------------------------------------------------
# Registry


@dataclasses.dataclass(frozen=True)
class PretrainedEntry:
    """One named checkpoint.

    Attributes:
      name: the checkpoint's name (lower-cased), the key of :func:`load_pretrained`.
      model: the :func:`jaxenc.models.get_model` name whose variables the checkpoint holds
        (defaults to ``name``, as upstream names weights after their model).
      sha256: SHA-256 (hex) of the file jaxenc reads; None where unknown (upstream's .pth files,
        verified by ``upstream_sha1`` instead).
      upstream_sha1: full SHA-1 (hex) of PyTorch-Encoding's ``.pth`` (from its ``model_store.py``).
      upstream_url: where upstream publishes the file (a ``.zip`` holding the ``.pth``);
        informational, downloaded only when passed explicitly as ``source``.
      format: ``"torch"`` (a PyTorch state_dict, converted with :func:`jaxenc.port.torch_to_flax`)
        or ``"jaxenc"`` (a native checkpoint written by :func:`save_checkpoint`).
    """

    name: str
    model: str | None = None
    sha256: str | None = None
    upstream_sha1: str | None = None
    upstream_url: str | None = None
    format: str = "torch"

    def __post_init__(self):
        where = f"PretrainedEntry({self.name!r})"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"PretrainedEntry: name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "name", self.name.lower())
        object.__setattr__(self, "model", (self.model or self.name).lower())
        if self.format not in _FORMATS:
            raise ValueError(f"{where}: format must be one of {_FORMATS}, got {self.format!r}")
        for field, length in (("sha256", 64), ("upstream_sha1", 40)):
            value = getattr(self, field)
            if value is None:
                continue
            if not isinstance(value, str) or not re.fullmatch(f"[0-9a-fA-F]{{{length}}}", value):
                raise ValueError(f"{where}: {field} must be {length} hex digits, got {value!r}")
            object.__setattr__(self, field, value.lower())
        if self.sha256 is None and self.upstream_sha1 is None:
            raise ValueError(
                f"{where}: give sha256 (or upstream_sha1 for an upstream torch file) so the file can be verified"
            )
        if self.format == "jaxenc" and self.sha256 is None:
            raise ValueError(
                f"{where}: a native ('jaxenc') checkpoint is verified by sha256, which is missing"
            )

    @property
    def file_name(self) -> str:
        """The file's name in the cache: upstream's ``{name}-{sha1[:8]}.pth`` or ``{name}-{sha256[:8]}.msgpack``."""
        if self.format == "jaxenc":
            return f"{self.name}-{self.sha256[:8]}.msgpack"
        digest = self.upstream_sha1 or self.sha256
        return f"{self.name}-{digest[:8]}.pth"


def _upstream(name: str, sha1: str) -> PretrainedEntry:
    return PretrainedEntry(
        name=name,
        model=name,
        sha256=None,
        upstream_sha1=sha1,
        upstream_url=f"{UPSTREAM_REPO_URL}/models/{name}-{sha1[:8]}.zip",
        format="torch",
    )


# PyTorch-Encoding's published weights: (name, SHA-1 of the .pth), as in its model_store.py.
# fmt: off
_UPSTREAM_SHA1 = (
    # ResNeSt backbones
    ("resnest50", "fb9de5b360976e3e8bd3679d3e93c5409a5eff3c"),
    ("resnest101", "966fb78c22323b0c68097c5c1242bd16d3e07fd5"),
    ("resnest200", "d7fd712f5a1fcee5b3ce176026fbb6d0d278454a"),
    ("resnest269", "51ae5f19032e22af4ec08e695496547acdba5ce5"),
    # ResNet variants (deep stem)
    ("resnet50s", "a75c83cfc89a56a4e8ba71b14f1ec67e923787b3"),
    ("resnet101s", "03a0f310d6447880f1b22a83bd7d1aa7fc702c6e"),
    ("resnet152s", "36670e8bc2428ecd5b7db1578538e2dd23872813"),
    # other segmentation backbones
    ("wideresnet38", "da4785cfc837bf00ef95b52fb218feefe703011f"),
    ("wideresnet50", "b41562160173ee2e979b795c551d3c7143b1e5b5"),
    # Deep TEN
    ("deepten_resnet50_minc", "1225f149519c7a0113c43a056153c1bb15468ac0"),
    # ResNet segmentation models
    ("fcn_resnet50s_ade", "662e979de25a389f11c65e9f1df7e06c2c356381"),
    ("encnet_resnet50s_pcontext", "4de91d5922d4d3264f678b663f874da72e82db00"),
    ("encnet_resnet101s_pcontext", "9f27ea13d514d7010e59988341bcbd4140fcc33d"),
    ("encnet_resnet50s_ade", "07ac287cd77e53ea583f37454e17d30ce1509a4a"),
    ("encnet_resnet101s_ade", "3f54fa3b67bac7619cd9b3673f5c8227cf8f4718"),
    # ResNeSt segmentation models
    ("fcn_resnest50_ade", "4aba491aaf8e4866a9c9981b210e3e3266ac1f2a"),
    ("deeplab_resnest50_ade", "2225f09d0f40b9a168d9091652194bc35ec2a5a9"),
    ("deeplab_resnest101_ade", "06ca799c8cc148fe0fafb5b6d052052935aa3cc8"),
    ("deeplab_resnest200_ade", "7b9e7d3e6f0e2c763c7d77cad14d306c0a31fe05"),
    ("deeplab_resnest269_ade", "0074dd10a6e6696f6f521653fb98224e75955496"),
    ("fcn_resnest50_pcontext", "77a2161deeb1564e8b9c41a4bb7a3f33998b00ad"),
    ("deeplab_resnest50_pcontext", "08dccbc4f4694baab631e037a374d76d8108c61f"),
    ("deeplab_resnest101_pcontext", "faf5841853aae64bd965a7bdc2cdc6e7a2b5d898"),
    ("deeplab_resnest200_pcontext", "fe76a26551dd5dcf2d474fd37cba99d43f6e984e"),
    ("deeplab_resnest269_pcontext", "b661fd26c49656e01e9487cd9245babb12f37449"),
)
# fmt: on

_PRETRAINED: dict[str, PretrainedEntry] = {
    name: _upstream(name, sha1) for name, sha1 in _UPSTREAM_SHA1
}


def register_pretrained(entry: PretrainedEntry, *, overwrite: bool = False) -> PretrainedEntry:
    """Add a named checkpoint (e.g. your own fine-tuned weights) to the registry.

    Raises ValueError when the name is taken by a different entry, unless ``overwrite``.
    """
    if not isinstance(entry, PretrainedEntry):
        raise TypeError(
            f"register_pretrained: expected a PretrainedEntry, got {type(entry).__name__}"
        )
    old = _PRETRAINED.get(entry.name)
    if old is not None and old != entry and not overwrite:
        raise ValueError(
            f"register_pretrained: {entry.name!r} is already registered ({old}); pass overwrite=True to replace it"
        )
    _PRETRAINED[entry.name] = entry
    return entry


def pretrained_model_list() -> list[str]:
    """Names with registered weights: upstream's 25, then user registrations, in registration order."""
    return list(_PRETRAINED)


def pretrained_entry(name: str) -> PretrainedEntry:
    """The registry entry of ``name`` (case-insensitive); ValueError listing close names if unknown."""
    return lookup_name(
        _PRETRAINED,
        name,
        "pretrained weights",
        "pretrained weights for {name!r} are not registered{hint} (see "
        "jaxenc.models.store.pretrained_model_list(); register your own with register_pretrained)",
    )


# --------------------------------------------------------------------------------------------------
# Cache directory, digests, locking, atomic writes


def cache_dir() -> Path:
    """The weight cache: ``$JAXENC_CACHE`` if set, else ``$XDG_CACHE_HOME/jaxenc/models``, else
    ``~/.cache/jaxenc/models``. Not created here (only a write creates it)."""
    override = os.environ.get("JAXENC_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path("~/.cache").expanduser()
    return base / "jaxenc" / "models"


def cache_path(name: str) -> Path:
    """Where the registered checkpoint ``name`` lives in the cache (whether or not it is there)."""
    return cache_dir() / pretrained_entry(name).file_name


def _expected_digests(entry: PretrainedEntry) -> list[tuple[str, str, str]]:
    """(hashlib name, display name, expected hex) for every digest the entry records."""
    out = []
    if entry.upstream_sha1 is not None:
        out.append(("sha1", "SHA-1", entry.upstream_sha1))
    if entry.sha256 is not None:
        out.append(("sha256", "SHA-256", entry.sha256))
    return out


def _lock_path(final: Path) -> Path:
    return final.parent / ".locks" / (final.name + ".lock")


@contextlib.contextmanager
def _cache_lock(final: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the inter-process lock guarding writes of ``final`` (lock files live in ``.locks/``)."""
    lock_file = _lock_path(final)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    wait = LOCK_TIMEOUT if timeout is None else timeout
    lock = filelock.FileLock(str(lock_file), timeout=wait)
    try:
        lock.acquire()
    except filelock.Timeout as exc:
        raise TimeoutError(
            f"could not lock {lock_file} within {wait:g} s: another process is writing {final}. "
            f"If no other process is running, delete the lock file and retry."
        ) from exc
    try:
        yield
    finally:
        lock.release()


def _is_temp_of(file_name: str, final_name: str) -> bool:
    return file_name.startswith(f".{final_name}.") and file_name.endswith(".part")


def _remove_cached(final: Path) -> None:
    final.unlink(missing_ok=True)
    Path(str(final) + ".sha256").unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Sources: URLs, zip packaging, file kinds


def _is_url(source: Any) -> bool:
    return isinstance(source, str) and source.lower().startswith(_URL_SCHEMES)


def _url_basename(url: str) -> str:
    return os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path)) or "checkpoint"


def _download(url: str, dest: Path) -> None:
    """Copy ``url`` (http, https or file) into ``dest``."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out, _CHUNK)
    except (OSError, ValueError) as exc:
        raise OSError(f"could not download {url}: {exc}") from exc


def _zip_member(archive: Path, name: str | None) -> str:
    """The ``.pth`` inside upstream's packaging zip (preferring the registered file name)."""
    with zipfile.ZipFile(archive) as zf:
        members = [
            m for m in zf.namelist() if m.lower().endswith(_TORCH_SUFFIXES) and not m.endswith("/")
        ]
    if name is not None:
        preferred = [m for m in members if os.path.basename(m) == name]
        if preferred:
            return preferred[0]
    if len(members) != 1:
        raise ValueError(
            f"{archive}: expected a zip holding exactly one .pth file, found {members or 'none'}"
        )
    return members[0]


def _kind(path: Path) -> str:
    """'zip' (upstream packaging), 'torch' (a torch.save file) or 'jaxenc' (native checkpoint)."""
    suffix = path.suffix.lower()
    if suffix == ".msgpack":
        return "jaxenc"
    if suffix == ".zip":
        return "zip"
    if suffix in _TORCH_SUFFIXES:
        return "torch"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        # torch.save writes a zip too; its archive holds a data.pkl.
        if not any(n.endswith("data.pkl") for n in names) and any(
            n.lower().endswith(_TORCH_SUFFIXES) for n in names
        ):
            return "zip"
    return "torch"


def _extract(archive: Path, member: str, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def _url_cache_name(url: str) -> str:
    """Cache file name for an unregistered URL: its base name, tagged with a digest of the URL."""
    base = _url_basename(url)
    stem, suffix = os.path.splitext(base)
    tag = hashlib.sha1(url.encode()).hexdigest()[:8]
    if suffix.lower() not in (".msgpack", *_TORCH_SUFFIXES):
        suffix = ".pth"  # a .zip (or no extension) holds a torch file, extracted on download
    return f"{stem}-{tag}{suffix}"


def _cached_file_ok(final: Path, entry: PretrainedEntry | None) -> str | None:
    """None if the cached ``final`` verifies, else why not."""
    if entry is not None:
        return _digest_mismatch(final, _expected_digests(entry))
    want = _read_sidecar(final)
    if want is None:
        return f"{final} has no {final.name}.sha256 beside it, so it cannot be verified"
    return _digest_mismatch(final, [("sha256", "SHA-256", want)])


def _fill_cache(final: Path, entry: PretrainedEntry | None, source: str | Path) -> Path:
    """Put ``source`` (a URL or a local zip) into the cache as ``final``, verified, under the lock.

    A valid ``final`` already there is used without reading the source; an invalid one is
    replaced. On any failure no temporary file is left behind.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock(final):
        if final.exists():
            if _cached_file_ok(final, entry) is None:
                return final
            _remove_cached(final)
        for stale in final.parent.iterdir():
            if _is_temp_of(stale.name, final.name):
                stale.unlink(missing_ok=True)
        temps = []
        try:
            if _is_url(source):
                raw = _temp_in(final.parent, final.name)
                temps.append(raw)
                _download(str(source), raw)
                is_zip = _url_basename(str(source)).lower().endswith(".zip") or _kind(raw) == "zip"
            else:
                raw = Path(source)
                is_zip = _kind(raw) == "zip"
            where = str(source)
            payload = raw
            if is_zip:
                payload = _temp_in(final.parent, final.name)
                temps.append(payload)
                _extract(raw, _zip_member(raw, final.name), payload)
            elif not _is_url(source):
                payload = _temp_in(final.parent, final.name)
                temps.append(payload)
                shutil.copyfile(raw, payload)
            if entry is not None:
                problem = _digest_mismatch(payload, _expected_digests(entry))
                if problem is not None:
                    problem = problem.replace(str(payload), "the fetched file")
                    raise ValueError(
                        f"pretrained weights {entry.name!r} from {where}: {problem} (nothing was written to {final})"
                    )
            else:
                _write_sidecar(final, _file_digest(payload, "sha256"))
            os.replace(payload, final)
        finally:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
    return final


def add_to_cache(name: str, source: str | os.PathLike) -> Path:
    """Verify the registered checkpoint ``name`` from ``source`` (local file, ``.zip`` or URL) and
    store it in the cache, so that ``load_pretrained(name)`` finds it. Returns its cache path."""
    entry = pretrained_entry(name)
    final = cache_dir() / entry.file_name
    if not _is_url(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"add_to_cache({name!r}): {path} does not exist")
        source = path
    return _fill_cache(final, entry, source)


def purge(name: str | None = None) -> list[Path]:
    """Remove cached weights (all of them, or only ``name``'s); returns the removed paths.

    Each file is removed while holding its lock, so a concurrent writer is never cut short.
    """
    root = cache_dir()
    if not root.is_dir():
        return []
    if name is not None:
        finals = {pretrained_entry(name).file_name}
    else:
        finals = set()
        for p in root.iterdir():
            if not p.is_file():
                continue
            n = p.name
            if n.endswith(".part") and n.startswith("."):
                n = n[1 : -len(".part")].rsplit(".", 1)[0]
            elif n.endswith(".sha256"):
                n = n[: -len(".sha256")]
            finals.add(n)
    removed = []
    for final_name in sorted(finals):
        final = root / final_name
        with _cache_lock(final):
            temps = [q for q in root.iterdir() if _is_temp_of(q.name, final_name)]
            for p in [final, Path(str(final) + ".sha256"), *temps]:
                if p.exists():
                    p.unlink()
                    removed.append(p)
    return removed


def _resolve(entry: PretrainedEntry | None, source: Any) -> Path:
    """The verified local file to read for ``entry`` / ``source``."""
    if source is None:
        final = cache_dir() / entry.file_name
        if not final.exists():
            lines = [
                f"pretrained weights {entry.name!r} are not in the cache: expected {final}.",
                "Nothing is downloaded implicitly. Either",
                f"  * put the file there (PyTorch-Encoding's ~/.encoding/models/{entry.file_name} can be copied as is), or",
                "  * pass source= a local .pth/.zip/.msgpack file, or an explicit URL",
            ]
            if entry.upstream_url:
                lines[-1] += (
                    f", e.g. load_pretrained({entry.name!r}, source={entry.upstream_url!r})"
                )
            lines.append("  (set $JAXENC_CACHE to use another cache directory).")
            raise FileNotFoundError("\n".join(lines))
        problem = _cached_file_ok(final, entry)
        if problem is not None:
            with _cache_lock(final):
                problem = _cached_file_ok(final, entry) if final.exists() else problem
                if problem is not None:
                    _remove_cached(final)
                    raise ValueError(
                        f"pretrained weights {entry.name!r}: corrupted cached file removed. {problem}. "
                        f"Put a good copy at {final} or pass source="
                    )
        return final
    if _is_url(source):
        final = cache_dir() / (entry.file_name if entry is not None else _url_cache_name(source))
        if final.exists() and _cached_file_ok(final, entry) is None:
            return final
        return _fill_cache(final, entry, source)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"load_pretrained: source {path} does not exist")
    if _kind(path) == "zip" and entry is not None:
        return _fill_cache(cache_dir() / entry.file_name, entry, path)
    if entry is not None:
        problem = _digest_mismatch(path, _expected_digests(entry))
        if problem is not None:
            raise ValueError(f"pretrained weights {entry.name!r}: {problem}")
    return path


# --------------------------------------------------------------------------------------------------
# Reading torch files


def _torch_state_dict(path: Path, member: str | None = None) -> dict[str, Any]:
    """The state_dict in a ``torch.save`` file (or zip ``member``): unwrapped from ``{"state_dict": ...}``,
    DataParallel's ``module.`` prefix removed."""
    try:
        import torch
    except ImportError as exc:  # torch is an optional (test) dependency
        raise ImportError(
            f"reading {path} needs PyTorch (a CPU build is enough). Alternatively convert it once where torch "
            f"is installed and save a native checkpoint with jaxenc.models.store.save_checkpoint."
        ) from exc
    try:
        if member is None:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with zipfile.ZipFile(path) as zf:
                obj = torch.load(io.BytesIO(zf.read(member)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path}: expected a state_dict (a mapping of tensors), got {type(obj).__name__}"
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_weights(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """The raw weights in a local file, unconverted: ``("jaxenc", variables)`` for a native
    ``.msgpack`` checkpoint, ``("torch", state_dict)`` for a ``torch.save`` file or upstream's zip
    packaging (unwrapped as :func:`load_pretrained` does). Raises FileNotFoundError for a missing file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"read_weights: no such file: {path}")
    kind = _kind(path)
    if kind == "jaxenc":
        return kind, load_checkpoint(path)
    return "torch", _torch_state_dict(path, _zip_member(path, None) if kind == "zip" else None)


# --------------------------------------------------------------------------------------------------
# Loading


def load_pretrained(
    name: str | None,
    source: str | os.PathLike | None = None,
    *,
    model=None,
    example_input=None,
    **model_overrides,
):
    """Load pretrained weights; returns ``(model, variables)``. Never downloads implicitly.

    Args:
      name: a registered name (:func:`pretrained_model_list`; verified by its digests), or None for
        an unregistered file (then ``source`` and ``model`` are required and nothing is verified
        except a ``.sha256`` sidecar).
      source: None (the cache, see :func:`cache_path`), a local ``.pth``/``.pt`` (torch state_dict,
        possibly under ``"state_dict"``), a ``.zip`` holding one ``.pth`` (upstream's packaging,
        extracted into the cache for a registered name), a native ``.msgpack`` checkpoint, or an
        explicit ``http(s)://``/``file://`` URL, downloaded into the cache (a valid cached copy is
        reused without reading the URL).
      model: the Flax module to load into; default ``get_model(entry.model, **model_overrides)``.
      example_input: an input (NHWC, e.g. ``jnp.zeros((1, 224, 224, 3))``) with which the model can
        be traced; only its shape is used. Needed to convert torch files; for native checkpoints,
        when given, the variables are checked against the model's. Default (1, 224, 224, 3) float32.
      **model_overrides: keyword arguments for ``get_model`` (only without ``model``).

    Raises:
      ValueError: unknown name (with close matches), digest mismatch (naming the file and both
        digests), or a checkpoint that does not fit the model.
      FileNotFoundError: ``source=None`` and the file is not in the cache (the message says where
        to put it), or a local source that does not exist.
      TimeoutError: another process held the cache file's lock for :data:`LOCK_TIMEOUT` seconds.
    """
    entry = pretrained_entry(name) if name is not None else None
    if entry is None and (source is None or model is None):
        raise ValueError("load_pretrained: without a registered name, pass both source= and model=")
    if model is None:
        from jaxenc.models.registry import get_model

        model = get_model(entry.model, **model_overrides)
    elif model_overrides:
        raise ValueError(
            f"load_pretrained: model overrides {sorted(model_overrides)} apply only when model= is not given"
        )
    path = _resolve(entry, source)
    kind = _kind(path)
    if entry is not None and entry.format == "jaxenc" and kind != "jaxenc":
        raise ValueError(
            f"load_pretrained: {entry.name!r} is a native checkpoint but {path} is not a .msgpack file"
        )

    if kind == "jaxenc":
        target = None
        if example_input is not None:
            rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
            target = jax.eval_shape(lambda: model.init(rngs, example_input))
        variables = load_checkpoint(path, target)
        return model, variables

    if example_input is None:
        example_input = jnp.zeros((1, 224, 224, 3), jnp.float32)
    member = _zip_member(path, None) if kind == "zip" else None
    state_dict = _torch_state_dict(path, member)
    from jaxenc.port import torch_to_flax

    variables = torch_to_flax(model, state_dict, example_input)
    return model, variables
