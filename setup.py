"""Builds the optional compiled data plane (``workers/dataplane/_core.pyx``).

Everything else is in pyproject.toml. When Cython or the C compiler is missing or
fails, the install still succeeds with the pure-Python twin and prints one warning
line (``workers.dataplane.CORE`` then says ``"pure"``).
"""

from __future__ import annotations

import sys
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_WARNING = "WARNING: pacs-receiver: compiled data plane not built ({}); using the pure-Python core"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


class OptionalBuildExt(build_ext):
    """build_ext that turns any failure into one warning line instead of an error."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler missing or failing, Cython missing
            print(_WARNING.format(_one_line(exc)), file=sys.stderr)

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(_WARNING.format(_one_line(exc)), file=sys.stderr)


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
