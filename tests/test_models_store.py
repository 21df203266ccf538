"""Pretrained-weight store (jaxenc.models.store): torch/zip/native sources, digests, cache, locking.

No network: URLs are file:// only, and every test uses its own cache directory ($JAXENC_CACHE).
The models are small Flax modules defined here (Conv2d + BatchNorm + Dense) with a torch twin.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import filelock
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optional_torch import torch
from parity import assert_close, nchw, random_input, randomise_batchnorm

from jaxenc.models import store
from jaxenc.models.store import (
    PretrainedEntry,
    cache_dir,
    cache_path,
    load_checkpoint,
    load_pretrained,
    pretrained_model_list,
    purge,
    register_pretrained,
    save_checkpoint,
)
from jaxenc.nn import BatchNorm, Conv2d

REPO = Path(__file__).resolve().parents[1]

# fmt: off
UPSTREAM_NAMES = [
    "resnest50", "resnest101", "resnest200", "resnest269",
    "resnet50s", "resnet101s", "resnet152s", "wideresnet38", "wideresnet50", "deepten_resnet50_minc",
    "fcn_resnet50s_ade", "encnet_resnet50s_pcontext", "encnet_resnet101s_pcontext",
    "encnet_resnet50s_ade", "encnet_resnet101s_ade",
    "fcn_resnest50_ade", "deeplab_resnest50_ade", "deeplab_resnest101_ade", "deeplab_resnest200_ade",
    "deeplab_resnest269_ade", "fcn_resnest50_pcontext", "deeplab_resnest50_pcontext",
    "deeplab_resnest101_pcontext", "deeplab_resnest200_pcontext", "deeplab_resnest269_pcontext",
]  # fmt: skip
# fmt: on


class TinyNet(nn.Module):
    """Conv 3x3 (3->8) + BatchNorm + ReLU + global mean + Dense(5). x (B, H, W, 3) -> (B, 5)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv2d(8, 3, padding=1, name="conv")(x)
        x = BatchNorm(8, name="bn")(x, train=train)
        x = jax.nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(5, name="fc")(x)


class TorchTiny(torch.nn.Module):
    """TinyNet's torch twin (NCHW)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


X = random_input((2, 16, 16, 3), seed=1)


def _torch_model():
    torch.manual_seed(0)
    return randomise_batchnorm(TorchTiny()).eval()


def _torch_out(tm):
    with torch.no_grad():
        return tm(torch.from_numpy(nchw(X))).numpy()


def _save_pth(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(root: Path) -> list[str]:
    """Files in the cache, lock directory excluded."""
    return sorted(p.name for p in root.iterdir() if p.name != ".locks") if root.exists() else []


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("JAXENC_CACHE", str(root))
    return root


@pytest.fixture
def registered(monkeypatch):
    """Register entries for one test only."""
    monkeypatch.setattr(store, "_PRETRAINED", dict(store._PRETRAINED))

    def register(**kwargs):
        return register_pretrained(PretrainedEntry(**kwargs))

    return register


def _apply(variables):
    return np.asarray(TinyNet().apply(variables, jnp.asarray(X)))


# 1. torch .pth / .zip / {'state_dict': ...} -> same outputs as torch eval


def test_torch_pth_zip_and_nested_state_dict_match_torch(tmp_path, cache):
    tm = _torch_model()
    expected = _torch_out(tm)
    pth = _save_pth(tmp_path / "tiny.pth", tm.state_dict())
    nested = _save_pth(tmp_path / "nested.pt", {"epoch": 3, "state_dict": tm.state_dict()})
    zipped = tmp_path / "tiny.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.write(pth, "tiny.pth")

    for source in (pth, nested, zipped, str(pth)):
        model, variables = load_pretrained(
            None, source=source, model=TinyNet(), example_input=jnp.asarray(X)
        )
        assert isinstance(model, TinyNet)
        assert set(variables) == {"params", "batch_stats"}
        assert_close(
            _apply(variables), expected, rtol=1e-5, what=f"outputs from {Path(source).name}"
        )
    # Unregistered local files are read in place: nothing written to the cache.
    assert _listing(cache) == []


def test_dataparallel_prefix_is_stripped(tmp_path, cache):
    tm = _torch_model()
    pth = _save_pth(
        tmp_path / "dp.pth", {"state_dict": {f"module.{k}": v for k, v in tm.state_dict().items()}}
    )
    _, variables = load_pretrained(None, source=pth, model=TinyNet(), example_input=jnp.asarray(X))
    assert_close(_apply(variables), _torch_out(tm), rtol=1e-5, what="module.-prefixed state_dict")


def test_registered_zip_is_extracted_into_cache(tmp_path, cache, registered):
    tm = _torch_model()
    pth = _save_pth(tmp_path / "tmp.pth", tm.state_dict())
    sha1 = _sha1(pth)
    entry = registered(name="tiny_zip", model="tinynet", upstream_sha1=sha1)
    assert entry.file_name == f"tiny_zip-{sha1[:8]}.pth"
    zipped = tmp_path / f"tiny_zip-{sha1[:8]}.zip"  # upstream's packaging
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.write(pth, entry.file_name)

    _, variables = load_pretrained(
        "tiny_zip", source=zipped, model=TinyNet(), example_input=jnp.asarray(X)
    )
    assert_close(_apply(variables), _torch_out(tm), rtol=1e-5, what="zip")
    assert _listing(cache) == [entry.file_name]
    # Now in the cache: source=None finds it.
    zipped.unlink()
    _, again = load_pretrained("tiny_zip", model=TinyNet(), example_input=jnp.asarray(X))
    assert_close(_apply(again), _torch_out(tm), rtol=1e-5, what="from cache")


# 2. SHA-1 verification


def test_sha1_verification(tmp_path, cache, registered):
    tm = _torch_model()
    pth = _save_pth(tmp_path / "tiny.pth", tm.state_dict())
    good = _sha1(pth)
    registered(name="tiny_good", model="tinynet", upstream_sha1=good)
    _, variables = load_pretrained(
        "tiny_good", source=pth, model=TinyNet(), example_input=jnp.asarray(X)
    )
    assert_close(_apply(variables), _torch_out(tm), rtol=1e-5, what="verified load")

    wrong = "0" * 40
    registered(name="tiny_wrong", model="tinynet", upstream_sha1=wrong)
    with pytest.raises(ValueError) as info:
        load_pretrained("tiny_wrong", source=pth, model=TinyNet(), example_input=jnp.asarray(X))
    msg = str(info.value)
    assert wrong in msg and good in msg and str(pth) in msg and "SHA-1" in msg
    assert pth.exists(), "a user's own file is never removed"


def test_corrupted_cached_file_is_rejected_and_removed(tmp_path, cache, registered):
    tm = _torch_model()
    pth = _save_pth(tmp_path / "tiny.pth", tm.state_dict())
    good = _sha1(pth)
    registered(name="tiny_cached", model="tinynet", upstream_sha1=good)
    target = cache_path("tiny_cached")
    assert target.parent == cache
    cache.mkdir(parents=True)
    data = bytearray(pth.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    bad = _sha1(target)

    with pytest.raises(ValueError) as info:
        load_pretrained("tiny_cached", model=TinyNet(), example_input=jnp.asarray(X))
    msg = str(info.value)
    assert good in msg and bad in msg and str(target) in msg
    assert not target.exists()
    assert _listing(cache) == []  # no partial or temporary files

    # A good copy placed there loads from the cache.
    target.write_bytes(pth.read_bytes())
    _, variables = load_pretrained("tiny_cached", model=TinyNet(), example_input=jnp.asarray(X))
    assert_close(_apply(variables), _torch_out(tm), rtol=1e-5, what="good cached copy")


def test_bad_download_leaves_no_file(tmp_path, cache, registered):
    pth = _save_pth(tmp_path / "tiny.pth", _torch_model().state_dict())
    registered(name="tiny_baddl", model="tinynet", upstream_sha1="1" * 40)
    with pytest.raises(ValueError, match="1" * 40):
        load_pretrained(
            "tiny_baddl", source=pth.as_uri(), model=TinyNet(), example_input=jnp.asarray(X)
        )
    assert _listing(cache) == []


# 3. Native checkpoints


def test_native_round_trip_and_corruption(tmp_path, cache, registered):
    tm = _torch_model()
    _, variables = load_pretrained(
        None,
        source=_save_pth(tmp_path / "t.pth", tm.state_dict()),
        model=TinyNet(),
        example_input=jnp.asarray(X),
    )
    ckpt = tmp_path / "tiny.msgpack"
    digest = save_checkpoint(ckpt, variables, metadata={"model": "tinynet"})
    assert digest == _sha256(ckpt)
    assert Path(str(ckpt) + ".sha256").read_text().split() == [digest, "tiny.msgpack"]

    loaded, meta = load_checkpoint(ckpt, with_metadata=True)
    assert meta["model"] == "tinynet" and meta["jaxenc_version"]
    flat_a, tree_a = jax.tree.flatten(variables)
    flat_b, tree_b = jax.tree.flatten(loaded)
    assert tree_a == tree_b
    for a, b in zip(flat_a, flat_b):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(_apply(loaded), _apply(variables))

    # Against a target structure, and through load_pretrained (registered by its sha256).
    target = jax.eval_shape(lambda: TinyNet().init(jax.random.key(0), jnp.asarray(X)))
    np.testing.assert_array_equal(_apply(load_checkpoint(ckpt, target)), _apply(variables))
    registered(name="tiny_native", model="tinynet", sha256=digest, format="jaxenc")
    _, via_store = load_pretrained(
        "tiny_native", source=ckpt, model=TinyNet(), example_input=jnp.asarray(X)
    )
    np.testing.assert_array_equal(_apply(via_store), _apply(variables))

    # A target of another shape is refused.
    other = jax.eval_shape(lambda: TinyNet().init(jax.random.key(0), jnp.asarray(X)))
    other = {
        **other,
        "params": {
            **other["params"],
            "fc": {
                "kernel": jax.ShapeDtypeStruct((8, 6), jnp.float32),
                "bias": other["params"]["fc"]["bias"],
            },
        },
    }
    with pytest.raises(ValueError, match="fc/kernel"):
        load_checkpoint(ckpt, other)

    # One corrupted byte: the sidecar digest catches it.
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 3] ^= 0x01
    ckpt.write_bytes(bytes(data))
    with pytest.raises(ValueError) as info:
        load_checkpoint(ckpt)
    assert (
        "SHA-256" in str(info.value)
        and digest in str(info.value)
        and _sha256(ckpt) in str(info.value)
    )
    with pytest.raises(ValueError, match="SHA-256"):
        load_pretrained("tiny_native", source=ckpt, model=TinyNet())


# 4. file:// URL -> cache (under the lock), reused without reading the source


def test_file_url_downloads_into_cache_under_lock(tmp_path, cache, registered, monkeypatch):
    tm = _torch_model()
    pth = _save_pth(tmp_path / "tmp.pth", tm.state_dict())
    sha1 = _sha1(pth)
    entry = registered(name="tiny_url", model="tinynet", upstream_sha1=sha1)
    zipped = tmp_path / f"tiny_url-{sha1[:8]}.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.write(pth, entry.file_name)

    calls = []
    real_download = store._download

    def checked_download(url, dest):
        calls.append(url)
        probe = filelock.FileLock(str(store._lock_path(cache / entry.file_name)), timeout=0)
        with pytest.raises(filelock.Timeout):  # the store holds the lock while writing
            probe.acquire()
        return real_download(url, dest)

    monkeypatch.setattr(store, "_download", checked_download)
    for url in (pth.as_uri(), zipped.as_uri()):
        purge()
        calls.clear()
        _, variables = load_pretrained(
            "tiny_url", source=url, model=TinyNet(), example_input=jnp.asarray(X)
        )
        assert calls == [url]
        assert_close(_apply(variables), _torch_out(tm), rtol=1e-5, what=url)
        assert _listing(cache) == [entry.file_name]

    # Second call: the source is gone, the cache answers, nothing is downloaded.
    zipped.unlink()
    pth.unlink()
    calls.clear()
    _, again = load_pretrained(
        "tiny_url", source=zipped.as_uri(), model=TinyNet(), example_input=jnp.asarray(X)
    )
    _, cached = load_pretrained("tiny_url", model=TinyNet(), example_input=jnp.asarray(X))
    assert calls == []
    assert_close(_apply(again), _torch_out(tm), rtol=1e-5, what="cached URL")
    assert_close(_apply(cached), _torch_out(tm), rtol=1e-5, what="cached, source=None")


def test_unregistered_url_gets_sidecar(tmp_path, cache):
    tm = _torch_model()
    pth = _save_pth(tmp_path / "mine.pth", tm.state_dict())
    url = pth.as_uri()
    load_pretrained(None, source=url, model=TinyNet(), example_input=jnp.asarray(X))
    files = _listing(cache)
    assert len(files) == 2 and files[1] == files[0] + ".sha256"
    cached = cache / files[0]
    assert (cache / files[1]).read_text().split()[0] == _sha256(cached)
    pth.unlink()
    _, variables = load_pretrained(None, source=url, model=TinyNet(), example_input=jnp.asarray(X))
    assert_close(_apply(variables), _torch_out(tm), rtol=1e-5, what="cached unregistered URL")
    assert [p.name for p in purge()] and _listing(cache) == []


def test_lock_timeout_is_a_clear_error(tmp_path, cache, monkeypatch):
    pth = _save_pth(tmp_path / "mine.pth", _torch_model().state_dict())
    url = pth.as_uri()
    final = cache / store._url_cache_name(url)
    monkeypatch.setattr(store, "LOCK_TIMEOUT", 0.2)
    final.parent.mkdir(parents=True)
    with store._cache_lock(final):  # another writer holds the lock
        with pytest.raises(TimeoutError) as info:
            load_pretrained(None, source=url, model=TinyNet(), example_input=jnp.asarray(X))
    assert "could not lock" in str(info.value) and str(final) in str(info.value)
    assert _listing(cache) == []


# 5. Two processes, same file:// source at the same time

_WORKER = textwrap.dedent(
    """
    import os, sys, time
    import jax.numpy as jnp
    import numpy as np
    from jaxenc.models import store
    from test_models_store import TinyNet, X

    me, log, go = sys.argv[1], sys.argv[2], sys.argv[3]
    real = store._download

    def slow_download(url, dest):
        with open(log, "a") as f:
            f.write(me + "\\n")
        real(url, dest)
        time.sleep(1.0)  # widen the window in which the other process would race

    store._download = slow_download
    open(go + "." + me, "w").close()
    deadline = time.time() + 60
    while not all(os.path.exists(go + "." + p) for p in ("a", "b")):
        if time.time() > deadline:
            raise SystemExit("the other worker never started")
        time.sleep(0.01)
    _, variables = store.load_pretrained(None, source=sys.argv[4], model=TinyNet(), example_input=jnp.asarray(X))
    out = np.asarray(TinyNet().apply(variables, jnp.asarray(X)))
    print("OUT", repr(out.round(5).tolist()))
    """
)


def test_two_processes_share_one_download(tmp_path, cache):
    tm = _torch_model()
    pth = _save_pth(tmp_path / "shared.pth", tm.state_dict())
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    log, go = tmp_path / "downloads.log", tmp_path / "go"
    env = dict(
        os.environ,
        JAXENC_CACHE=str(cache),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(
            [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
        ),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), me, str(log), str(go), pth.as_uri()],
            env=env,
            cwd=str(REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me in ("a", "b")
    ]
    outs = []
    deadline = time.time() + 120
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("store workers timed out after 120 s")
        assert p.returncode == 0, f"worker failed:\n{stdout}\n{stderr}"
        outs.append([line for line in stdout.splitlines() if line.startswith("OUT")])
    assert outs[0] == outs[1] and len(outs[0]) == 1
    assert log.read_text().split() in (["a"], ["b"]), (
        "exactly one process downloads; the other waits and reuses"
    )
    files = _listing(cache)
    weights = [f for f in files if not f.endswith(".sha256")]
    assert len(weights) == 1 and files == [weights[0], weights[0] + ".sha256"]
    assert not any(f.endswith(".part") for f in files)


# 6. Missing cache file, unknown names


def test_missing_cache_file_and_unknown_name(cache):
    with pytest.raises(FileNotFoundError) as info:
        load_pretrained("resnest50", model=TinyNet())
    msg = str(info.value)
    expected = cache / "resnest50-fb9de5b3.pth"
    assert str(expected) == str(cache_path("resnest50"))
    assert str(expected) in msg and "source=" in msg and "wasabisys" in msg
    assert _listing(cache) == []  # nothing created, nothing downloaded

    with pytest.raises(ValueError, match="resnest50") as info:
        load_pretrained("resnest5O")
    assert "not registered" in str(info.value)
    with pytest.raises(ValueError, match="source= and model="):
        load_pretrained(None)
    with pytest.raises(ValueError, match="overrides"):
        load_pretrained("resnest50", source="x.pth", model=TinyNet(), nclass=3)


# 7. Registry


def test_pretrained_model_list_has_upstream_names(registered):
    names = pretrained_model_list()
    assert len(UPSTREAM_NAMES) == 25 and set(UPSTREAM_NAMES) <= set(names)
    for name in UPSTREAM_NAMES:
        e = store.pretrained_entry(name.upper())
        assert (
            e.format == "torch"
            and e.sha256 is None
            and len(e.upstream_sha1) == 40
            and e.model == name
        )
        assert (
            e.upstream_url
            == f"https://s3.us-west-1.wasabisys.com/encoding/models/{name}-{e.upstream_sha1[:8]}.zip"
        )
    assert (
        store.pretrained_entry("deeplab_resnest269_pcontext").upstream_sha1
        == "b661fd26c49656e01e9487cd9245babb12f37449"
    )

    registered(name="Mine", model="tinynet", sha256="a" * 64)
    assert pretrained_model_list()[-1] == "mine"
    with pytest.raises(ValueError, match="already registered"):
        register_pretrained(PretrainedEntry("mine", sha256="b" * 64))
    register_pretrained(PretrainedEntry("mine", sha256="b" * 64), overwrite=True)
    with pytest.raises(ValueError, match="sha256"):
        PretrainedEntry("nohash")
    with pytest.raises(ValueError, match="hex digits"):
        PretrainedEntry("short", upstream_sha1="abc")


def test_cache_dir_default_and_import_has_no_side_effects(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXENC_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path("~/.cache/jaxenc/models").expanduser()
    monkeypatch.setenv("JAXENC_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    # A fresh interpreter with sockets disabled: importing the store touches neither disk nor
    # network, and does not import torch.
    code = textwrap.dedent(
        """
        import os, socket, sys
        def no_net(*a, **k):
            raise AssertionError("network used at import")
        socket.socket.connect = no_net
        socket.socket.connect_ex = no_net
        socket.create_connection = no_net
        import jaxenc.models.store as store
        assert not os.path.exists(os.environ["JAXENC_CACHE"]), "cache created at import"
        assert "torch" not in sys.modules, "torch imported at import"
        print(len(store.pretrained_model_list()))
        """
    )
    env = dict(
        os.environ,
        JAXENC_CACHE=str(tmp_path / "never"),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "25"
