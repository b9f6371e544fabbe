"""Build hook: ship llmquant-autoload.pth into site-packages, for `pip install .` and `pip install -e .`.

The .pth file imports the tiny top-level module `_llmquant_autoload`, which registers llmquant with
transformers the first time transformers loads a model (see that module). Everything else about the
package is declared in pyproject.toml.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "llmquant-autoload.pth"


class BuildPyWithPth(build_py):
    """build_py that also puts PTH at the top of the wheel (purelib, i.e. site-packages)."""

    def run(self) -> None:
        super().run()
        # An editable wheel is assembled from install_lib, not build_lib (setuptools >= 64).
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        os.makedirs(target, exist_ok=True)
        self.copy_file(PTH, os.path.join(target, PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
