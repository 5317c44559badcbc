"""The studio's own LoRA injection. Each adapted nn.Linear / nn.Conv2d is wrapped once in a LoraLayer
that adds the deltas of any number of named adapters, each with its own weight, optionally only a
chosen subset (`override`) and optionally masked per region (`gate`): what the composers need and
PEFT's merged adapters do not offer.

Attaching validates everything first and only then mutates; any failure while mutating rolls the
pipeline back to exactly its previous state."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from studio.errors import LoraError
from studio.lora.embeddings import add_embeddings, check_embeddings, remove_embeddings
from studio.lora.keys import COMPONENTS
from studio.lora.weights import LoraModule, LoraWeights, load_lora
from studio.models import model_family

__all__ = ["LoraLayer", "attach_lora", "detach_lora", "set_lora_weights", "attached_adapters", "lora_layers",
           "text_encoder_layers", "only_adapters", "fit_to_layer", "load_lora"]

# (adapter name, its delta output or, for low-rank adapters, its rank-r hidden) -> a mask over batch and spatial /
# token axes (never over channels), broadcastable to either
Gate = Callable[[str, Tensor], "Tensor | None"]


class LoraLayer(nn.Module):
    """Wraps an nn.Linear or nn.Conv2d (kept as self.base, its weights untouched).
    forward(x) = base(x) + Σ_{name in active} w_name · gate(name, Δ_name(x)) · Δ_name(x)

    The adapters' tensors are plain attributes, not parameters or buffers, and the state dict hides
    the `base.` level: the wrapped model saves and loads exactly like the unwrapped one."""

    def __init__(self, base: nn.Module, name: str):
        super().__init__()
        self.base = base
        self.name = name  # e.g. "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
        self.adapters: dict[str, LoraModule] = {}
        self.weights: dict[str, float] = {}
        self.override: list[str] | None = None  # when set, ONLY these adapters apply
        self.gate: Gate | None = None  # a mask over batch and token / spatial axes (see Gate), or None = everywhere
        self.register_state_dict_post_hook(_hide_base_in_state_dict)
        self.register_load_state_dict_pre_hook(_restore_base_in_state_dict)

    def __getattr__(self, attr: str):
        # Code that reads `layer.weight`, `in_features`, `kernel_size` ... of the wrapped module keeps working.
        try:
            return super().__getattr__(attr)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")  # absent while copying / unpickling
            if base is None or attr == "base":
                raise
            return getattr(base, attr)

    def add_adapter(self, name: str, module: LoraModule, weight: float) -> None:
        self.adapters[name] = module
        self.weights[name] = float(weight)

    def remove_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)
        self.weights.pop(name, None)

    def active_adapters(self) -> list[str]:
        names = self.adapters if self.override is None else (n for n in self.override if n in self.adapters)
        return [n for n in names if self.weights[n] != 0.0]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base(x, *args, **kwargs)
        low_rank: dict[tuple, list] = {}  # down-kernel shape -> [(name, module, scale)]: applied together
        for name in self.active_adapters():
            module = self._on_device_of_base(name)
            scale = self.weights[name] * module.scale
            if module.down is not None and module.mid is None:
                low_rank.setdefault(tuple(module.down.shape[1:]), []).append((name, module, scale))
                continue
            delta = self.delta(module, x)
            mask = self.gate(name, delta) if self.gate is not None else None
            if mask is not None:
                delta = delta * mask
            out = out + scale * delta
        for adapters in low_rank.values():
            out = self._add_low_rank(out, x, adapters)
        return out

    def _add_low_rank(self, out: Tensor, x: Tensor, adapters: list) -> Tensor:
        """out + Σ_k scale_k · gate_k ⊙ up_k(down_k(x)) for several low-rank adapters at once. Their down projections
        are stacked into one matrix of Σ r_k rows, so the input is read once; each adapter's gate and scale act on its
        slice of the rank-Σr hidden (a gate never varies across output channels); the stacked up projections are
        added by one fused multiply-add for linear layers. No full-width delta tensor is ever made."""
        conv = isinstance(self.base, nn.Conv2d)
        modules = [module for _, module, _ in adapters]
        down = modules[0].down if len(modules) == 1 else torch.cat([m.down for m in modules])
        up = modules[0].up if len(modules) == 1 else torch.cat([m.up for m in modules], dim=1)
        if conv:
            geometry = dict(stride=self.base.stride, padding=self.base.padding, dilation=self.base.dilation)
            hidden = F.conv2d(x, down, None, **geometry)
        else:
            hidden = F.linear(x, down)
        axis = 1 if conv else hidden.dim() - 1
        pieces, start = [], 0
        for name, module, scale in adapters:
            piece = hidden.narrow(axis, start, module.down.shape[0])
            start += module.down.shape[0]
            mask = self.gate(name, piece) if self.gate is not None else None
            if mask is not None:
                piece = piece * (mask * scale if scale != 1.0 else mask)
            elif scale != 1.0:
                piece = piece * scale
            pieces.append(piece)
        hidden = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=axis)
        needs_graph = torch.is_grad_enabled() and (out.requires_grad or hidden.requires_grad)
        if conv:
            delta = F.conv2d(hidden, up)
            return out + delta if needs_graph else out.add_(delta)
        flat_out, flat_hidden = out.reshape(-1, out.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
        if needs_graph:
            return torch.addmm(flat_out, flat_hidden, up.t()).view(out.shape)
        return flat_out.addmm_(flat_hidden, up.t()).view(out.shape)

    def delta(self, module: LoraModule, x: Tensor) -> Tensor:
        """Δ(x) of one adapter, unscaled: low rank as up(down(x)), dense with the dense ΔW."""
        if module.kron is not None:
            return self._kron_delta(module, x)
        if isinstance(self.base, nn.Conv2d):
            return self._conv_delta(module, x)
        if module.dense is not None:
            return F.linear(x, module.dense)
        return F.linear(F.linear(x, module.down), module.up)

    def _conv_delta(self, module: LoraModule, x: Tensor) -> Tensor:
        conv = self.base
        geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        if module.dense is not None:
            return F.conv2d(x, module.dense, None, groups=conv.groups, **geometry)
        if module.mid is not None:  # LoCon-CP: the 1×1 down, the k×k mid with the layer's geometry, the 1×1 up
            hidden = F.conv2d(F.conv2d(x, module.down), module.mid, None, **geometry)
        else:
            hidden = F.conv2d(x, module.down, None, **geometry)
        return F.conv2d(hidden, module.up)

    def _kron_delta(self, module: LoraModule, x: Tensor) -> Tensor:
        """kron(w1, w2) applied without building it: input channels split as (a2, b2), output as (a1, b1);
        w2 acts inside each block of b2 channels, w1 mixes the blocks."""
        w1, w2 = module.kron
        a2 = w1.shape[1]
        if isinstance(self.base, nn.Conv2d) and w2.dim() == 2:  # kron over the flattened (channel, kh, kw) axis
            conv = self.base
            patches = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (B, in·kh·kw, L)
            blocks = patches.reshape(x.shape[0], a2, -1, patches.shape[-1])
            out = torch.einsum("pr,brsl,qs->bpql", w1, blocks, w2).reshape(x.shape[0], -1, patches.shape[-1])
            rows = (x.shape[2] + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
            return out.reshape(x.shape[0], out.shape[1], rows, -1)
        if isinstance(self.base, nn.Conv2d):
            conv = self.base
            batch, _, height, width = x.shape
            inner = F.conv2d(x.reshape(batch * a2, -1, height, width), w2, None, stride=conv.stride,
                             padding=conv.padding, dilation=conv.dilation)
            inner = inner.reshape(batch, a2, *inner.shape[1:])
            return torch.einsum("pr,brqhw->bpqhw", w1, inner).reshape(batch, -1, *inner.shape[-2:])
        blocks = x.reshape(*x.shape[:-1], a2, -1)
        return torch.einsum("pr,...rs,qs->...pq", w1, blocks, w2).reshape(*x.shape[:-1], -1)

    def _on_device_of_base(self, name: str) -> LoraModule:
        """Follow the base layer after `pipe.to(...)`: the adapter tensors are not buffers."""
        module = self.adapters[name]
        weight = self.base.weight
        first = next(t for t in (module.dense, module.down, *(module.kron or ())) if t is not None)
        if first.device != weight.device or first.dtype != weight.dtype:
            module = _cast(module, weight)
            self.adapters[name] = module
        return module

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}"


def _hide_base_in_state_dict(module, state_dict, prefix, local_metadata) -> None:
    inner = prefix + "base."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _restore_base_in_state_dict(module, state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
        state_dict[prefix + "base." + key[len(prefix):]] = state_dict.pop(key)


def _cast(module: LoraModule, like: Tensor) -> LoraModule:
    def cast(t):
        return None if t is None else t.to(device=like.device, dtype=like.dtype)
    kron = None if module.kron is None else (cast(module.kron[0]), cast(module.kron[1]))
    return LoraModule(module.component, module.target, cast(module.down), cast(module.up), cast(module.mid),
                      cast(module.dense), module.scale, cast(module.magnitude), kron)


# --- attaching --------------------------------------------------------------------------------------------


@dataclass
class _Step:
    """One validated module of an attach plan."""
    root: nn.Module  # the component (pipe.unet, ...)
    path: str  # module path inside it, as resolved
    layer_name: str
    fitted: LoraModule


def attach_lora(pipe, weights: LoraWeights | str | Path, adapter_name: str | None = None, weight: float = 1.0) -> int:
    """Add a LoRA to the pipeline under `adapter_name` (default: the file's stem) and return the number
    of parameters injected. Refused before touching the pipeline when its base model differs, when a
    target layer is missing or of another shape, or when nothing would be injected; if anything fails
    while wrapping, the pipeline is rolled back to exactly how it was."""
    if not isinstance(weights, LoraWeights):
        weights = load_lora(weights)
    name = adapter_name or weights.name
    if name in attached_adapters(pipe):
        raise LoraError(f"An adapter named {name!r} is already attached; detach it first or choose another name.")
    plan = check_fits(pipe, weights)
    injected = sum(t.numel() for step in plan for t in step.fitted.tensors())
    if injected == 0:
        raise LoraError(f"{weights.info.name} has no layer to inject into this model.")
    check_embeddings(pipe, weights.embeddings, weights.info.name)
    _apply(plan, name, weight, weights.info.name)
    try:
        add_embeddings(pipe, name, weights.embeddings)
    except BaseException as exc:
        _remove_layers(pipe, name)
        _raise_as_lora_error(exc, weights.info.name)
    return injected + weights.embedding_parameter_count()


def check_fits(pipe, weights: LoraWeights) -> list[_Step]:
    """Refused in one sentence, before the pipeline is touched: a LoRA made for another base model, or with a
    layer this model lacks or shapes otherwise. Returns each module fitted to its layer."""
    _check_base(pipe, weights)
    return [_validate(pipe, weights, module) for module in weights.modules.values()]


def _check_base(pipe, weights: LoraWeights) -> None:
    family = model_family(pipe)
    base = weights.info.base_model
    if base is not None and base != family:
        raise LoraError(f"{weights.info.name} was made for {base}; this model is {family}.")


def _validate(pipe, weights: LoraWeights, module: LoraModule) -> _Step:
    file = weights.info.name
    root = getattr(pipe, module.component, None)
    if not isinstance(root, nn.Module):
        raise LoraError(f"{file} has {module.component} layers, but this pipeline has no {module.component}.")
    path = _resolve(root, module.target)
    if path is None:
        raise LoraError(f"{file} targets {module.component}.{module.target}, which this model does not have.")
    layer = root.get_submodule(path)
    base = layer.base if isinstance(layer, LoraLayer) else layer
    fitted = fit_to_layer(module, base, f"{file}: {module.component}.{path}")
    return _Step(root, path, f"{module.component}.{path}", fitted)


def _resolve(root: nn.Module, target: str) -> str | None:
    """The target's path in this component; text encoder paths may differ by a `text_model.` level
    between transformers versions and CLIP classes."""
    alternative = target.removeprefix("text_model.") if target.startswith("text_model.") else f"text_model.{target}"
    for path in (target, alternative):
        try:
            root.get_submodule(path)
            return path
        except AttributeError:
            continue
    return None


def fit_to_layer(module: LoraModule, layer: nn.Module, where: str) -> LoraModule:
    """The module's tensors shaped for `layer` (low-rank factors as F.linear / F.conv2d kernels, or one
    dense ΔW for LoKr, LoHa, DoRA and grouped convs) on its device and dtype; a LoraError naming the
    file and layer when they do not fit."""
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise LoraError(f"{where} is a {type(layer).__name__}, not a linear or convolution layer.")
    weight = layer.weight.detach()
    grouped = isinstance(layer, nn.Conv2d) and layer.groups != 1
    if module.is_low_rank and module.magnitude is None and not grouped:
        fitted = _fit_low_rank(module, layer, where)
    elif module.kron is not None and module.magnitude is None and not grouped and _kron_for_layer(module, layer):
        fitted = _kron_for_layer(module, layer)
    else:
        fitted = _fit_dense(module, weight, where)
    return _cast(fitted, weight)


def _fit_dense(module: LoraModule, weight: Tensor, where: str) -> LoraModule:
    """DoRA depends on the frozen base weight, so its exact ΔW is computed here once, like LoKr/LoHa's."""
    raw = module.unscaled_delta()
    if raw.numel() != weight.numel():
        raise LoraError(f"{where} does not fit: the layer's weight is {tuple(weight.shape)} but the LoRA's update is "
                        f"{tuple(raw.shape)}.")
    delta = module.delta_weight(weight.float())
    return LoraModule(module.component, module.target, None, None, None, delta, 1.0)


def _kron_for_layer(module: LoraModule, layer: nn.Module) -> LoraModule | None:
    """LoKr's factors shaped to apply factored to this layer (w2 as a conv kernel for convs, which files
    may store flattened), or None when they cannot (then its dense ΔW is built)."""
    w1, w2 = module.kron
    if w1.dim() != 2:
        return None
    if isinstance(layer, nn.Linear):
        fits = w2.dim() == 2 and w1.shape[0] * w2.shape[0] == layer.out_features \
            and w1.shape[1] * w2.shape[1] == layer.in_features
        return module if fits else None
    if layer.out_channels != w1.shape[0] * w2.shape[0] or isinstance(layer.padding, str):
        return None
    if w2.dim() == 2:  # applied to unfolded patches: the factors split the flattened (channel, kh, kw) axis
        patch = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        return module if w1.shape[1] * w2.shape[1] == patch else None
    if layer.in_channels % w1.shape[1]:
        return None
    kernel = (w2.shape[0], layer.in_channels // w1.shape[1], *layer.kernel_size)
    if w2.numel() != kernel[0] * kernel[1] * kernel[2] * kernel[3] or (w2.dim() == 4 and tuple(w2.shape) != kernel):
        return None
    return LoraModule(module.component, module.target, None, None, None, None, module.scale, None,
                      (w1, w2.reshape(kernel)))


def _fit_low_rank(module: LoraModule, layer: nn.Module, where: str) -> LoraModule:
    down, up, mid = module.down, module.up, module.mid
    rank = down.shape[0]
    if isinstance(layer, nn.Linear):
        if mid is not None:
            raise LoraError(f"{where} is a linear layer but the LoRA has a convolution middle (lora_mid).")
        down, up = down.reshape(rank, -1), up.reshape(up.shape[0], -1)
        expected = {"down": (rank, layer.in_features), "up": (layer.out_features, rank)}
    else:
        kernel = tuple(layer.kernel_size)
        if up.dim() == 2:
            up = up[:, :, None, None]
        if mid is None:
            if down.dim() == 2 and down.shape[1] == layer.in_channels * kernel[0] * kernel[1]:
                down = down.reshape(rank, layer.in_channels, *kernel)
            expected = {"down": (rank, layer.in_channels, *kernel), "up": (layer.out_channels, rank, 1, 1)}
        else:
            if down.dim() == 2:
                down = down[:, :, None, None]
            expected = {"down": (rank, layer.in_channels, 1, 1), "mid": (mid.shape[0], rank, *kernel),
                        "up": (layer.out_channels, mid.shape[0], 1, 1)}
    actual = {"down": tuple(down.shape), "up": tuple(up.shape)}
    if mid is not None:
        actual["mid"] = tuple(mid.shape)
    if actual != expected:
        raise LoraError(f"{where} does not fit: the layer is {_describe(layer)} but the LoRA's matrices are "
                        f"{', '.join(f'{k} {v}' for k, v in actual.items())}.")
    return LoraModule(module.component, module.target, down, up, mid, None, module.scale)


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return f"Linear({layer.in_features} → {layer.out_features})"
    return f"Conv2d({layer.in_channels} → {layer.out_channels}, kernel {tuple(layer.kernel_size)})"


def _apply(plan: list[_Step], name: str, weight: float, file: str) -> None:
    created: list[_Step] = []
    touched: list[LoraLayer] = []
    try:
        for step in plan:
            layer = step.root.get_submodule(step.path)
            if not isinstance(layer, LoraLayer):
                layer = LoraLayer(layer, step.layer_name)
                replace_module(step.root, step.path, layer)
                created.append(step)
            layer.add_adapter(name, step.fitted, weight)
            touched.append(layer)
    except BaseException as exc:
        for layer in touched:
            layer.remove_adapter(name)
        for step in reversed(created):
            replace_module(step.root, step.path, step.root.get_submodule(step.path).base)
        _raise_as_lora_error(exc, file)


def _raise_as_lora_error(exc: BaseException, file: str) -> None:
    """Re-raise a failure met while attaching, after the rollback: an unexpected error becomes one sentence
    naming the file; a LoraError, an interrupt or an exit passes through as it is."""
    if isinstance(exc, Exception) and not isinstance(exc, LoraError):
        raise LoraError(f"{file} could not be attached ({type(exc).__name__}: {exc}); the pipeline was left "
                        "unchanged.") from exc
    raise exc


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at `path` inside `root` (ModuleList indices included)."""
    parent_path, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, new)


# --- managing attached adapters ------------------------------------------------------------------------------


def lora_layers(pipe) -> dict[str, LoraLayer]:
    """Every LoraLayer of the pipeline's unet / text_encoder / text_encoder_2, by its name."""
    layers = {}
    for component in COMPONENTS:
        root = getattr(pipe, component, None)
        if isinstance(root, nn.Module):
            layers.update({m.name: m for m in root.modules() if isinstance(m, LoraLayer)})
    return layers


def text_encoder_layers(pipe) -> dict[str, LoraLayer]:
    """The LoraLayers of the text encoders (their deltas cannot be masked spatially)."""
    return {name: layer for name, layer in lora_layers(pipe).items() if name.startswith("text_encoder")}


def attached_adapters(pipe) -> dict[str, float]:
    """Adapter name -> its weight, for every adapter attached to the pipeline."""
    adapters = {}
    for layer in lora_layers(pipe).values():
        adapters.update(layer.weights)
    return adapters


def detach_lora(pipe, adapter_name: str) -> None:
    """Remove an adapter, and the words it brought; layers left without adapters are unwrapped back to the
    original modules."""
    if not _remove_layers(pipe, adapter_name):
        raise LoraError(f"No adapter named {adapter_name!r} is attached.")
    remove_embeddings(pipe, adapter_name)


def _remove_layers(pipe, adapter_name: str) -> bool:
    found = False
    for layer in lora_layers(pipe).values():
        if adapter_name in layer.adapters:
            found = True
            layer.remove_adapter(adapter_name)
            if not layer.adapters:
                component, _, path = layer.name.partition(".")
                replace_module(getattr(pipe, component), path, layer.base)
    return found


def set_lora_weights(pipe, weights: Mapping[str, float]) -> None:
    """Set the weight of attached adapters, e.g. {"style": 0.6, "hero": 1.0}."""
    layers = lora_layers(pipe).values()
    unknown = [n for n in weights if not any(n in layer.adapters for layer in layers)]
    if unknown:
        raise LoraError(f"No adapter named {unknown[0]!r} is attached.")
    for layer in layers:
        for name, weight in weights.items():
            if name in layer.adapters:
                layer.weights[name] = float(weight)


@contextlib.contextmanager
def only_adapters(pipe_or_layers, names: Iterable[str] | None) -> Iterator[None]:
    """Within the block, only `names` apply on the given layers (a pipeline's, a {name: layer} dict or an
    iterable of modules, of which the LoraLayers count); the previous overrides come back afterwards.
    `names=None` changes nothing."""
    if names is None:  # leave the layers as they are
        yield
        return
    layers = [layer for layer in _layers_of(pipe_or_layers) if isinstance(layer, LoraLayer)]
    previous = [(layer, layer.override) for layer in layers]
    names = list(names)
    try:
        for layer in layers:
            layer.override = names
        yield
    finally:
        for layer, override in previous:
            layer.override = override


def _layers_of(target) -> list[LoraLayer]:
    if isinstance(target, LoraLayer):
        return [target]
    if isinstance(target, Mapping):
        return list(target.values())
    if any(isinstance(getattr(target, c, None), nn.Module) for c in COMPONENTS):
        return list(lora_layers(target).values())
    if isinstance(target, nn.Module):
        return [m for m in target.modules() if isinstance(m, LoraLayer)]
    return list(target)

