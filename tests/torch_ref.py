"""Load upstream PyTorch implementations as parity oracles, bypassing their top-level ``__init__``.

pylocron 0.3.0 and vit-pytorch 1.26.11 are installed with ``--no-deps``; their package
``__init__`` imports torchvision, which is not installable here (docs/DESIGN.md, Versions and dependencies).
``holocron.nn`` and ``vit_pytorch/{cait,max_vit,xcit}.py`` only need torch, numpy and einops.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types

import pytest
from optional_torch import HAVE_TORCH, SKIP_REASON


def _package_dir(name: str) -> str:
    if not HAVE_TORCH:  # stack B: no oracles at all, by design
        pytest.skip(SKIP_REASON, allow_module_level=True)
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the parity oracle package {name!r} is not installed; run `bash .ci/setup` "
            "(installs pylocron==0.3.0 and vit-pytorch==1.26.11 with --no-deps)"
        )
    return list(spec.submodule_search_locations)[0]


@functools.cache
def holocron_nn():
    """``holocron.nn`` from pylocron 0.3.0, imported under a stub ``holocron`` package."""
    if "holocron" not in sys.modules or not getattr(sys.modules["holocron"], "_jaxenc_stub", False):
        stub = types.ModuleType("holocron")
        stub.__path__ = [_package_dir("holocron")]
        stub._jaxenc_stub = True
        sys.modules["holocron"] = stub
    return importlib.import_module("holocron.nn")


@functools.cache
def holocron_functional():
    """``holocron.nn.functional`` (pylocron 0.3.0)."""
    holocron_nn()
    return importlib.import_module("holocron.nn.functional")


@functools.cache
def vit_module(name: str):
    """``vit_pytorch/<name>.py`` (e.g. 'cait', 'xcit', 'max_vit') loaded directly from its file."""
    base = _package_dir("vit_pytorch")
    spec = importlib.util.spec_from_file_location(f"_vit_pytorch_{name}", f"{base}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def resnest_torch():
    """``resnest.torch.models`` (resnest 0.0.6b20211014): the torch ResNet/ResNeSt backbone (radix,
    cardinality, deep stem, avg_down, avd, DropBlock) that PyTorch-Encoding's backbone restates.

    Returns a namespace with ``resnet`` (ResNet, Bottleneck) and ``splat`` (SplAtConv2d). The
    package's ``build`` module needs fvcore (not installed) for a registry only; a stub registry
    stands in for it.
    """
    base = _package_dir("resnest") + "/torch/models"
    pkg_name = "_jaxenc_resnest_models"
    if pkg_name not in sys.modules:
        pkg = types.ModuleType(pkg_name)
        pkg.__path__ = [base]
        sys.modules[pkg_name] = pkg
        build = types.ModuleType(f"{pkg_name}.build")

        class _Registry:
            def register(self, obj=None):
                return obj if obj is not None else (lambda o: o)

        build.RESNEST_MODELS_REGISTRY = _Registry()
        sys.modules[f"{pkg_name}.build"] = build
    return types.SimpleNamespace(
        resnet=importlib.import_module(f"{pkg_name}.resnet"),
        splat=importlib.import_module(f"{pkg_name}.splat"),
        resnest=importlib.import_module(f"{pkg_name}.resnest"),
    )
