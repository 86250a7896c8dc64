"""PEP 517 build backend of leet-compile: setuptools', plus the torch to compile against.

torch is not in ``[build-system] requires`` (an sdist needs no torch); it is asked for
only when a wheel is built, as ``torch==2.13.0`` (the version this release is tested
with) or as ``$LEET_BUILD_TORCH`` (e.g. ``LEET_BUILD_TORCH="torch==2.14.1" pip install .``).
An unpinned requirement would let build isolation pick the newest torch on the index,
and the wheel would then require that torch (setup.py pins the version it was built
against), not the user's.

With ``pip install --no-build-isolation .`` none of this applies: the build uses the torch
already installed, and the wheel requires exactly that version.
"""
import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the standard hooks)

DEFAULT_TORCH = "torch==2.13.0"


def _torch():
    return os.environ.get("LEET_BUILD_TORCH", "").strip() or DEFAULT_TORCH


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + [_torch()]


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + [_torch()]
