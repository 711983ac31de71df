"""BatchNorm folding for attacks on eval-mode models: the same function, fewer and cheaper operators.

Also folded: adaptive average pooling into the linear layer after it (:class:`PooledLinear`), for an input
map smaller than the pooled one, where the pooling only replicates cells (small_cnn on 8x8 digits).

In eval mode a BatchNorm that directly follows a convolution is an affine map per channel, so it can be
folded into that convolution's weight and bias (``torch.nn.utils.fusion.fuse_conv_bn_weights``). PGD
runs 10 forward and backward passes per training step through the model in eval mode; without the
BatchNorms they are faster on a CPU (``docs/performance.md``, "The means of the defaults"). Training changes the
weights and the running statistics every step, so the model is traced and the graph rewritten only once
(``torch.fx``); :meth:`FoldedView.refresh` recomputes the folded weights from the live tensors, a few
small elementwise operations per convolution. The attack only takes gradients with respect to the
input, so the folded weights are detached: the model's parameters, buffers and train/eval mode are
never changed. A BatchNorm that does not directly follow a convolution (pre-activation networks)
stays as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.utils import _pair

from ducat.models.pooling import pooling_matrix


class FoldError(TypeError):
    """The module cannot be traced by ``torch.fx`` (data-dependent control flow, ...)."""


def foldable_pairs(graph_module: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """(conv node, BatchNorm node) pairs where the BatchNorm's only input is a zero-padded
    ``nn.Conv2d`` whose output nothing else uses, and the BatchNorm has running statistics."""
    modules = dict(graph_module.named_modules())
    pairs = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.BatchNorm2d, nn.SyncBatchNorm)):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        conv, bn = modules[source.target], modules[node.target]
        if (isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and bn.track_running_stats
                and len(node.args) == 1 and not node.kwargs):
            pairs.append((source, node))
    return pairs


def pooled_linears(graph_module: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """(pool, flatten, linear) node triples ``linear(torch.flatten(adaptive_avg_pool2d(x), 1))`` where each of
    the first two nodes has that one user."""
    modules = dict(graph_module.named_modules())
    triples = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Linear) or len(node.args) != 1:
            continue
        flat = node.args[0]
        if not (isinstance(flat, fx.Node) and flat.op == "call_function" and flat.target is torch.flatten
                and flat.args[1:] == (1,) and not flat.kwargs and len(flat.users) == 1):
            continue
        pool = flat.args[0]
        if (isinstance(pool, fx.Node) and pool.op == "call_module" and len(pool.users) == 1
                and isinstance(modules[pool.target], nn.AdaptiveAvgPool2d)):
            triples.append((pool, flat, node))
    return triples


class PooledLinear(nn.Module):
    """``linear(torch.flatten(adaptive_avg_pool2d(x, size), 1))`` for ``x`` ``(B, C, H, W)``, computed as one
    linear map of ``torch.flatten(x, 1)`` when H x W is smaller than the pooled size: the pooling then only
    replicates or averages cells, and folding it into the weight divides the layer's multiply-adds by
    ``size`` cells / (H x W) (4 for small_cnn on 8x8 digits, a 2x2 map pooled to 4x4). The same function
    to float rounding. Other inputs take the original path. ``linear`` is the live layer; call
    :meth:`refresh` after its weights change."""

    def __init__(self, pool: nn.AdaptiveAvgPool2d, linear: nn.Linear):
        super().__init__()
        self.size, self._held = _pair(pool.output_size), (pool, linear)  # held, not registered: the view owns no
        self._weights: dict[tuple[int, int], torch.Tensor] = {}            # parameters

    def refresh(self) -> None:
        self._weights.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (pool, linear), (h, w) = self._held, x.shape[-2:]
        cells = self.size[0] * self.size[1]
        if h * w >= cells or linear.in_features != x.shape[1] * cells:
            return linear(torch.flatten(pool(x), 1))
        if (h, w) not in self._weights:
            self._weights[(h, w)] = self._fold(linear, h, w)
        bias = None if linear.bias is None else linear.bias.detach()
        return F.linear(torch.flatten(x, 1), self._weights[(h, w)], bias)

    @torch.no_grad()
    def _fold(self, linear: nn.Linear, h: int, w: int) -> torch.Tensor:
        """The weight ``(out, C x h x w)`` of the pooling followed by ``linear``, from the pooling of each cell."""
        weight = linear.weight.detach()
        pooling = pooling_matrix(h, w, self.size, weight.dtype, weight.device)  # (h*w, cells): each cell's share
        per_channel = weight.view(weight.shape[0], -1, pooling.shape[1])  # (out, C, cells)
        return (per_channel @ pooling.T).flatten(1)


class _OneChannelConv(torch.autograd.Function):
    """A stride-1 convolution of a one-channel input whose input gradient is computed as a plain convolution of the
    output gradient with the flipped, transposed weight (C_out -> 1 channels). oneDNN's own input gradient for one
    input channel runs several times slower than that (``docs/performance.md``); it is the attack's first layer on
    grayscale images. Only the input gets a gradient: the weight and bias are the view's detached copies."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(weight)
        ctx.padding = padding
        return F.conv2d(x, weight, bias, 1, padding)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        (kh, kw), (ph, pw) = weight.shape[-2:], ctx.padding
        flipped = weight.flip(2, 3).transpose(0, 1).to(grad.dtype)  # (1, C_out, kh, kw)
        return F.conv2d(grad, flipped, None, 1, (kh - 1 - ph, kw - 1 - pw)), None, None, None


def conv2d_folded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
                  padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> torch.Tensor:
    """``F.conv2d`` with a detached ``weight`` (the folded one), through :class:`_OneChannelConv` where that applies:
    one input channel, stride and dilation 1, an integer padding no wider than the kernel less one."""
    one_channel = (weight.shape[1] == 1 and groups == 1 and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
                   and not isinstance(padding, str)
                   and all(0 <= p < k for p, k in zip(_pair(padding), weight.shape[-2:])))
    if one_channel and x.requires_grad and not weight.requires_grad:
        return _OneChannelConv.apply(x, weight, bias, _pair(padding))
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class FoldedView(nn.Module):
    """``module`` in eval mode with its conv-BatchNorm pairs folded: same logits (to float rounding).

    ``module``: any traceable model or view (a :class:`~ducat.dummy.DummyClassModel`, its
    ``projected()`` or ``OriginalLogits`` view, a plain classifier). Inputs and outputs as ``module``.
    The view shares every other layer with ``module`` (live weights) and holds only the folded
    weights, computed by :meth:`refresh` -- call it after every change of the weights or running
    statistics (every training step). ``folded`` names the convolutions that absorbed a BatchNorm,
    ``pooled`` the linear layers that may absorb the adaptive pooling before them (:class:`PooledLinear`).
    Raises :class:`FoldError` when ``module`` cannot be traced.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        try:
            graph_module = fx.symbolic_trace(module)
        except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ... on dynamic code
            raise FoldError(f"cannot trace {type(module).__name__} for BatchNorm folding: {exc}") from exc
        # kept out of nn.Module registration: train()/eval()/to() on the view must not reach the model
        self._held = (module, graph_module)
        self.sources: list[tuple[nn.Conv2d, nn.BatchNorm2d, str]] = []
        self.folded: list[str] = []
        for conv_node, bn_node in foldable_pairs(graph_module):
            self._rewrite(graph_module, conv_node, bn_node)
        self.pooled: list[str] = []
        for pool_node, flat_node, linear_node in pooled_linears(graph_module):
            self._pool_into_linear(graph_module, pool_node, flat_node, linear_node)
        graph_module.graph.lint()
        graph_module.recompile()
        self._layers = [graph_module.get_submodule(node.target) for node in graph_module.graph.nodes
                        if node.op == "call_module"]  # leaf layers: their own mode is their only mode
        self.refresh()

    def _rewrite(self, gm: fx.GraphModule, conv_node: fx.Node, bn_node: fx.Node) -> None:
        """Replace ``bn(conv(x))`` by ``F.conv2d(x, folded weight, folded bias)`` in the graph."""
        conv, bn = gm.get_submodule(conv_node.target), gm.get_submodule(bn_node.target)
        name = f"_folded{len(self.sources)}"
        gm.register_buffer(f"{name}_weight", torch.empty(0), persistent=False)
        gm.register_buffer(f"{name}_bias", torch.empty(0), persistent=False)
        with gm.graph.inserting_before(conv_node):
            weight, bias = gm.graph.get_attr(f"{name}_weight"), gm.graph.get_attr(f"{name}_bias")
            fused = gm.graph.call_function(conv2d_folded, (conv_node.args[0], weight, bias, conv.stride,
                                                           conv.padding, conv.dilation, conv.groups))
        bn_node.replace_all_uses_with(fused)
        gm.graph.erase_node(bn_node)
        gm.graph.erase_node(conv_node)
        self.sources.append((conv, bn, name))
        self.folded.append(str(conv_node.target))

    def _pool_into_linear(self, gm: fx.GraphModule, pool_node: fx.Node, flat_node: fx.Node,
                          linear_node: fx.Node) -> None:
        """Replace ``linear(flatten(pool(x), 1))`` by a :class:`PooledLinear` call in the graph."""
        name = f"_pooled{len(self.pooled)}"
        gm.add_submodule(name, PooledLinear(gm.get_submodule(pool_node.target), gm.get_submodule(linear_node.target)))
        with gm.graph.inserting_before(linear_node):
            fused = gm.graph.call_module(name, (pool_node.args[0],))
        linear_node.replace_all_uses_with(fused)
        for node in (linear_node, flat_node, pool_node):
            gm.graph.erase_node(node)
        self.pooled.append(str(linear_node.target))

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the folded weights from the live conv and linear weights and BatchNorm statistics: the
        arithmetic of ``fuse_conv_bn_weights`` in the same order, as ``torch._foreach`` operations over every
        folded BatchNorm at once (a handful of kernel launches on CUDA instead of about eight per convolution)."""
        graph_module = self._held[1]
        for name in range(len(self.pooled)):
            graph_module.get_submodule(f"_pooled{name}").refresh()
        if not self.sources:
            return
        convs, bns, names = zip(*self.sources)
        weights = [torch.ones_like(bn.running_var) if bn.weight is None else bn.weight for bn in bns]
        offsets = [torch.zeros_like(bn.running_mean) if bn.bias is None else bn.bias for bn in bns]
        inv_std = torch._foreach_rsqrt(torch._foreach_add([bn.running_var for bn in bns], [bn.eps for bn in bns]))
        scales = torch._foreach_mul(weights, inv_std)
        biases = torch._foreach_neg([bn.running_mean for bn in bns])  # conv bias - mean (a missing bias is 0)
        for bias, conv in zip(biases, convs):
            if conv.bias is not None:
                bias.add_(conv.bias)
        torch._foreach_mul_(biases, inv_std)
        torch._foreach_mul_(biases, weights)
        torch._foreach_add_(biases, offsets)
        for conv, scale, bias, name in zip(convs, scales, biases, names):
            folded = conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
            layout = torch.channels_last if conv.weight.is_contiguous(memory_format=torch.channels_last) \
                and not conv.weight.is_contiguous() else torch.contiguous_format
            setattr(self._held[1], f"{name}_weight", folded.contiguous(memory_format=layout))
            setattr(self._held[1], f"{name}_bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The eval-mode function: a layer the graph calls that is in train mode (an unfolded BatchNorm of a
        pre-activation net inside a training model) runs in eval mode for this call, and only that layer."""
        training = [layer for layer in self._layers if layer.training]
        for layer in training:
            layer.training = False
        try:
            return self._held[1](x)
        finally:
            for layer in training:
                layer.training = True


def folded(module: nn.Module) -> nn.Module:
    """A :class:`FoldedView` of ``module`` with its current weights, or ``module`` itself when it has
    nothing to fold or cannot be traced (then the caller runs unchanged). Refresh it when the
    weights change (``getattr(view, 'refresh', None)``)."""
    try:
        view = FoldedView(module)
    except FoldError:
        return module
    return view if view.folded or view.pooled else module
