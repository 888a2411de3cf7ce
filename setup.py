"""Ships ``hfquant-autoload.pth`` at the top of site-packages (why: ``_hfquant_autoload.py``).

Everything else is configured in ``pyproject.toml``. setuptools has no setting for a top-level
``.pth`` file, so ``build_py`` writes it where the wheel is assembled from: ``build_lib`` for a
wheel (``pip install .``), and the unpacked editable wheel, which setuptools makes the install
target, for ``pip install -e .``.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "hfquant-autoload.pth"
PTH_LINE = "import _hfquant_autoload\n"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        Path(target).mkdir(parents=True, exist_ok=True)
        (Path(target) / PTH_NAME).write_text(PTH_LINE, encoding="utf-8")


setup(cmdclass={"build_py": BuildPyWithPth})
