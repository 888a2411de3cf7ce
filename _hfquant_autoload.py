"""Registers hfquant with transformers in any Python where hfquant is installed, on first need.

Why: a saved hfquant checkpoint names ``quant_method="hfquant"`` in its ``config.json``, and
transformers only knows that method after ``import hfquant``. Without it, transformers logs a
warning, skips the quantizer, finds no ``weight`` for the quantized linears and initialises them
at random: ``lm_eval --model hf``, ``transformers.pipeline(...)`` and a plain
``AutoModelForCausalLM.from_pretrained(dir)`` would all run a garbage model.

How: pip installs ``hfquant-autoload.pth`` beside the package (see ``setup.py``); Python runs its
one line, ``import _hfquant_autoload``, at start-up. This module only puts :class:`_Finder` first
on ``sys.meta_path`` and imports nothing else, so a Python that never imports transformers pays
for importing this file (0.36 ms measured, 1.8 ms if it is compiled on every start because of
``PYTHONDONTWRITEBYTECODE``) and one string comparison per module it imports later
(``tests/test_autoload.py`` checks that neither torch nor transformers gets imported). When ``transformers.modeling_utils``,
the module every ``from_pretrained`` goes through, has finished executing, the finder's loader
imports ``hfquant``, whose ``__init__`` registers the config and quantizer. The trigger is
``modeling_utils`` rather than the quantizer registry (``transformers.quantizers.auto``) because
``modeling_utils`` imports the registry half-way through its own execution: hfquant, which needs
``PreTrainedModel``, cannot be imported at that point.

The alternatives do not reach every loader: transformers and lm-eval have no plugin entry points
for quantizers, and code shipped in the checkpoint (``auto_map``) runs only with
``trust_remote_code=True``, which neither ``lm_eval --model hf`` nor ``pipeline`` passes.
"""

import sys

TRIGGER = "transformers.modeling_utils"


class _RegisterAfterExec:
    """Wraps the trigger module's loader: runs the module, then imports hfquant."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            import hfquant  # noqa: F401  (its __init__ registers quant_method="hfquant")
        except Exception as err:  # a broken hfquant must not break every transformers import
            import warnings

            warnings.warn(
                f"hfquant is installed but `import hfquant` failed ({err!r}): hfquant checkpoints "
                "cannot load until this is fixed (reinstall with `pip install hfquant`)",
                stacklevel=2,
            )

    def __getattr__(self, name):  # get_source, is_package, ... for inspect and linecache
        return getattr(self._loader, name)


class _Finder:
    """A meta-path finder that only acts on :data:`TRIGGER`, once, then removes itself."""

    def find_spec(self, name, path, target=None):
        if name != TRIGGER:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, path, target) if find_spec else None
            if spec is not None:
                spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once; a no-op if transformers is already loaded)."""
    if TRIGGER not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
