"""Build hook: generate the gRPC modules from proto/ whenever the package is built.

pyproject.toml holds all the metadata; this file only makes ``build_py`` and ``sdist`` run
the generator (pfsync/_protogen.py) first. ``build_py`` is also what ``pip install -e``
runs, so editable installs get the modules too. The generated files are git-ignored and
never edited by hand.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent


def _generate_protos() -> None:
    """Run pfsync/_protogen.py when proto/ is present.

    It is loaded by path because the package is not importable while it is being built.
    An sdist carries the generated modules but not proto/ (nothing lists it in a
    MANIFEST.in), so a build from an sdist uses the modules it carries.
    """
    if not (HERE / "proto").is_dir():
        return
    spec = importlib.util.spec_from_file_location(
        "_pfsync_protogen", HERE / "pfsync" / "_protogen.py"
    )
    assert spec is not None and spec.loader is not None
    protogen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(protogen)
    protogen.generate(HERE)


class BuildPyWithProtos(build_py):
    """``build_py`` that regenerates ``pfsync/v1/*_pb2*`` before collecting modules."""

    def run(self) -> None:
        _generate_protos()
        super().run()


class SdistWithProtos(sdist):
    """``sdist`` that regenerates first, so the archive carries current modules."""

    def run(self) -> None:
        _generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos, "sdist": SdistWithProtos})
