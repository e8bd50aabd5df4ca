"""Builds the optional compiled data plane (``workers/dataplane/_core.pyx``).

Everything else is in pyproject.toml. When Cython or the C compiler is missing or
fails, the install still succeeds with the pure-Python twin and prints one warning
line (``workers.dataplane.CORE`` then says ``"pure"``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_WARNING = "WARNING: pacs-receiver: compiled data plane not built ({}); using the pure-Python core"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


class OptionalBuildExt(build_ext):
    """build_ext that turns any failure into one warning line instead of an error,
    and then leaves the extension out of what is copied and installed."""

    _failed = False

    def _warn_once(self, exc: BaseException) -> None:
        if not self._failed:
            self._failed = True
            print(_WARNING.format(_one_line(exc)), file=sys.stderr)

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler missing or failing, Cython missing
            self._warn_once(exc)

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._warn_once(exc)

    def copy_extensions_to_source(self) -> None:
        if not self._failed:
            super().copy_extensions_to_source()

    def get_outputs(self) -> list[str]:
        outputs: list[str] = super().get_outputs()
        return [path for path in outputs if not self._failed or os.path.exists(path)]

    def get_output_mapping(self) -> dict[str, str]:
        mapping: dict[str, str] = super().get_output_mapping()
        if not self._failed:
            return mapping
        return {k: v for k, v in mapping.items() if os.path.exists(v)}


def _extensions() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:
        print(_WARNING.format("Cython is not installed"), file=sys.stderr)
        return []
    ext = Extension("workers.dataplane._core", ["workers/dataplane/_core.pyx"])
    try:
        return list(cythonize([ext], quiet=True, language_level=3))
    except Exception as exc:
        print(_WARNING.format(_one_line(exc)), file=sys.stderr)
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
