"""ducat: dummy-class adversarial training (DUCAT) and honest evaluation of what it buys.

Core API (see README): :func:`widen_model` turns a C-output classifier into a 2C-output
:class:`DummyClassModel`; :func:`ducat_loss` is the DUCAT objective; :class:`ProjectedClassifier`
is the deployed C-class classifier (attack it to evaluate the defense adaptively).
"""

from ducat.dummy import (
    DummyClassModel,
    ProjectedClassifier,
    ducat_loss,
    make_pairing,
    merge_logits,
    project_predictions,
    soft_labels,
    widen_model,
)

__version__ = "0.1.0"
__all__ = ["DummyClassModel", "ProjectedClassifier", "ducat_loss", "make_pairing", "merge_logits",
           "project_predictions", "soft_labels", "widen_model", "__version__"]
