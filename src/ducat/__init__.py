"""ducat: dummy-class adversarial training (DUCAT) and honest evaluation of what it buys.

Core API (see README): :func:`widen_model` turns a C-output classifier into a 2C-output
:class:`DummyClassModel`; :func:`ducat_loss` is the DUCAT objective; :class:`ProjectedClassifier`
is the deployed C-class classifier (attack it to evaluate the defense adaptively).

The names are loaded on first use (PEP 562), so ``import ducat.cli`` does not import torch: the
command line sets torch's OpenMP runtime up (``ducat.runtime``) before torch loads.
"""

from importlib import import_module

__version__ = "0.1.0"
__all__ = ["DummyClassModel", "ProjectedClassifier", "ducat_loss", "make_pairing", "merge_logits",
           "project_predictions", "soft_labels", "widen_model", "__version__"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module("ducat.dummy"), name)
    raise AttributeError(f"module 'ducat' has no attribute '{name}'")
