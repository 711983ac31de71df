"""The dummy-class paradigm: 2C head, pairing, two-hot soft labels, projection, merged logits.

Notation (``docs/method.md``): a DUCAT model outputs ``z(x)`` in R^{2C}; ``z[:, :C]`` are the
original logits and ``z[:, C:]`` the dummy logits. Class ``k`` is paired with the dummy class
``dummy(k) = C + pi(k)`` for a permutation ``pi`` (identity by default). At inference a dummy
prediction is mapped back to its class (paper eq. 6), which is the same decision as the argmax of
the merged logits ``m_k = max(z_k, z_dummy(k))``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ducat.vocabulary import View

MergeMode = Literal["max", "logsumexp"]


def make_pairing(num_classes: int, seed: int | None = None) -> torch.Tensor:
    """Dummy index of each class: ``(C,)`` int64 with values in ``[C, 2C)``.

    ``seed=None`` gives the in-order pairing ``dummy(k) = C + k``; an integer seed gives a seeded
    random permutation ``dummy(k) = C + pi(k)`` (paper sec. 3.1: the pairing need not be in order).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if seed is None:
        perm = torch.arange(num_classes)
    else:
        perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))
    return num_classes + perm


def check_pairing(dummy_index: torch.Tensor) -> None:
    """Raise ValueError unless ``dummy_index`` is a permutation of ``[C, 2C)``."""
    c = dummy_index.numel()
    if dummy_index.dim() != 1 or not torch.equal(
        dummy_index.sort().values.cpu(), torch.arange(c, 2 * c)
    ):
        raise ValueError(f"dummy_index must be a permutation of [{c}, {2 * c}), got {dummy_index.tolist()}")


def soft_labels(y: torch.Tensor, beta: float, dummy_index: torch.Tensor) -> torch.Tensor:
    """Two-hot target ``l(y, beta)`` (paper eq. 8): ``(B, 2C)`` with ``beta`` at ``y`` and
    ``1 - beta`` at ``dummy(y)``, zero elsewhere. ``y``: ``(B,)`` int64 in ``[0, C)``."""
    c = dummy_index.numel()
    target = torch.zeros(y.shape[0], 2 * c, device=y.device, dtype=torch.float32)
    target.scatter_(1, y[:, None], beta)
    target.scatter_add_(1, dummy_index.to(y.device)[y][:, None], torch.full_like(target[:, :1], 1.0 - beta))
    return target


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example CE with a probability target: ``-sum_j t_j log softmax(z)_j``; ``(B,)``."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


def ducat_loss(
    logits_clean: torch.Tensor,
    logits_adv: torch.Tensor,
    y: torch.Tensor,
    dummy_index: torch.Tensor,
    alpha: float = 0.5,
    beta1: float = 0.75,
    beta2: float = 1.0,
) -> torch.Tensor:
    """The DUCAT objective (paper eq. 9/10), a scalar:

    ``alpha * CE(z(x), l(y, beta1)) + (1 - alpha) * CE(z(x'), l(y, 1 - beta2))``, batch mean.
    ``logits_clean``/``logits_adv``: ``(B, 2C)`` raw logits of the clean and adversarial inputs.
    """
    clean = soft_cross_entropy(logits_clean, soft_labels(y, beta1, dummy_index)).mean()
    adv = soft_cross_entropy(logits_adv, soft_labels(y, 1.0 - beta2, dummy_index)).mean()
    return alpha * clean + (1.0 - alpha) * adv


def merge_logits(logits: torch.Tensor, dummy_index: torch.Tensor, mode: MergeMode = "max") -> torch.Tensor:
    """Merged C-class logits from raw ``(B, 2C)`` logits: ``(B, C)``.

    ``max``: ``m_k = max(z_k, z_dummy(k))``; its argmax is the projected prediction (paper eq. 6).
    ``logsumexp``: ``s_k = log(exp z_k + exp z_dummy(k))``, whose softmax is ``p_k + p_dummy(k)``;
    a smooth gradient source for attacks on the projected classifier.
    """
    c = dummy_index.numel()
    original, paired = logits[:, :c], logits[:, dummy_index.to(logits.device)]
    if mode == "max":
        return torch.maximum(original, paired)
    if mode == "logsumexp":
        return torch.logaddexp(original, paired)
    raise ValueError(f"unknown merge mode '{mode}'; choose 'max' or 'logsumexp'")


def project_predictions(logits: torch.Tensor, dummy_index: torch.Tensor) -> torch.Tensor:
    """Runtime projection (paper eq. 6): argmax over 2C, dummy classes mapped back; ``(B,)``."""
    c = dummy_index.numel()
    g = logits.argmax(dim=1)
    back = torch.empty(2 * c, dtype=torch.long, device=logits.device)
    back[:c] = torch.arange(c, device=logits.device)
    back[dummy_index.to(logits.device)] = torch.arange(c, device=logits.device)
    return back[g]


def find_last_linear(model: nn.Module) -> str:
    """Qualified name of the last ``nn.Linear`` in ``model.named_modules()`` order (the classifier)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("model has no nn.Linear layer to widen; pass layer_name explicitly")
    return names[-1]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def widen_linear(layer: nn.Linear, dummy_init: Literal["copy", "zero", "random"] = "copy") -> nn.Linear:
    """A ``C -> 2C`` copy of a classifier layer. Rows ``[0, C)`` copy the original weights.

    ``dummy_init``: ``copy`` duplicates the original rows into the dummy rows (in-order pairing;
    the model's permutation is applied by :func:`widen_model`), ``zero`` zeroes them, ``random``
    keeps PyTorch's default initialisation.
    """
    c = layer.out_features
    wide = nn.Linear(layer.in_features, 2 * c, bias=layer.bias is not None)
    wide = wide.to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        wide.weight[:c].copy_(layer.weight)
        if layer.bias is not None:
            wide.bias[:c].copy_(layer.bias)
        if dummy_init == "copy":
            wide.weight[c:].copy_(layer.weight)
            if layer.bias is not None:
                wide.bias[c:].copy_(layer.bias)
        elif dummy_init == "zero":
            wide.weight[c:].zero_()
            if layer.bias is not None:
                wide.bias[c:].zero_()
        elif dummy_init != "random":
            raise ValueError(f"unknown dummy_init '{dummy_init}'; choose copy, zero or random")
    return wide


class DummyClassModel(nn.Module):
    """A classifier with C original and C dummy outputs.

    ``forward(x)`` returns the raw ``(B, 2C)`` logits (what DUCAT trains). The pairing is the
    ``dummy_index`` buffer (``(C,)``, values in ``[C, 2C)``), saved in the state dict with the
    weights: it is part of the model, not a secret. ``projected()`` gives the C-class classifier
    that is deployed, and that attacks aware of the defense must target.
    """

    def __init__(self, net: nn.Module, dummy_index: torch.Tensor):
        super().__init__()
        if dummy_index.device.type != "meta":  # a meta tensor has no values to check
            check_pairing(dummy_index)
        self.net = net
        self.register_buffer("dummy_index", dummy_index.clone().long())

    @property
    def num_classes(self) -> int:
        return self.dummy_index.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def projected(self, mode: MergeMode = "max") -> "ProjectedClassifier":
        return ProjectedClassifier(self, mode)


class ProjectedClassifier(nn.Module):
    """C-class view of a :class:`DummyClassModel`: returns merged logits ``(B, C)``.

    With ``mode='max'`` its argmax is exactly the paper's runtime projection, so accuracy measured
    on it is the deployed accuracy, and any attack run on it (torchattacks, AutoAttack) is an
    attack on the projected classifier. ``mode='logsumexp'`` gives a smooth gradient variant.
    """

    def __init__(self, model: DummyClassModel, mode: MergeMode = "max"):
        super().__init__()
        if mode not in ("max", "logsumexp"):
            raise ValueError(f"unknown merge mode '{mode}'; choose 'max' or 'logsumexp'")
        self.model = model
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return merge_logits(self.model(x), self.model.dummy_index, self.mode)


def deployed(model: nn.Module) -> nn.Module:
    """The C-class classifier a user deploys: max-merged logits for a DUCAT model, the model itself otherwise."""
    return model.projected("max") if isinstance(model, DummyClassModel) else model


class OriginalLogits(nn.Module):
    """The first C raw logits of a :class:`DummyClassModel`, ``(B, C)`` (the paper's eq. 7 attack)."""

    def __init__(self, model: DummyClassModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, : self.model.num_classes]


def widen_model(
    model: nn.Module,
    dummy_index: torch.Tensor | None = None,
    layer_name: str | None = None,
    dummy_init: Literal["copy", "zero", "random"] = "copy",
) -> DummyClassModel:
    """Turn a C-output classifier into a :class:`DummyClassModel` with 2C outputs.

    The classifier layer (``layer_name``, default the last ``nn.Linear``) is replaced by a 2C one
    whose first C rows are the original ones, so the original logits are unchanged. With
    ``dummy_init='copy'`` the dummy row of class k starts as a copy of row k (placed at
    ``dummy_index[k]``).

    The model passed in is **modified in place** (its classifier layer is swapped) and wrapped: keep a
    ``copy.deepcopy`` first if you still need the C-output model.
    """
    layer_name = layer_name or find_last_linear(model)
    layer = model.get_submodule(layer_name)
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"layer '{layer_name}' is {type(layer).__name__}, not nn.Linear")
    c = layer.out_features
    dummy_index = make_pairing(c) if dummy_index is None else dummy_index.long().cpu()
    if dummy_index.numel() != c:
        raise ValueError(f"pairing has {dummy_index.numel()} classes but layer '{layer_name}' has {c} outputs")
    check_pairing(dummy_index)
    dummy_index = dummy_index.to(layer.weight.device)  # indexes the logits on their device, no copy per call
    wide = widen_linear(layer, dummy_init)
    if dummy_init == "copy":
        with torch.no_grad():
            wide.weight[dummy_index] = layer.weight.detach().clone()
            if layer.bias is not None:
                wide.bias[dummy_index] = layer.bias.detach().clone()
    _set_submodule(model, layer_name, wide)
    return DummyClassModel(model, dummy_index)


def deployed_prediction(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The deployed classifier's prediction from ``model``'s logits ``(B, K)``: the projection (paper eq. 6) for a
    :class:`DummyClassModel`, the argmax otherwise; ``(B,)``. The one place a prediction is made."""
    if isinstance(model, DummyClassModel):
        return project_predictions(logits, model.dummy_index)
    return logits.argmax(dim=1)


def model_view(model: nn.Module, view: View) -> nn.Module:
    """The function of the input an attack on ``model`` takes its gradients from (:class:`ducat.vocabulary.View`):
    the raw logits, the original C logits, the max-merged (deployed) or the logsumexp-merged classifier. A model
    without dummy classes has one view, itself (ValueError for the views only a dummy-class model has)."""
    if not isinstance(model, DummyClassModel):
        if view not in (View.RAW, View.MAX_MERGED):
            raise ValueError(f"a model without dummy classes has no {view.value} view")
        return model
    views = {View.RAW: lambda: model, View.ORIGINAL: lambda: OriginalLogits(model),
             View.MAX_MERGED: lambda: model.projected("max"), View.LSE_MERGED: lambda: model.projected("logsumexp")}
    if view not in views:
        raise ValueError(f"a dummy-class model has no {view.value} view of its own")
    return views[view]()
