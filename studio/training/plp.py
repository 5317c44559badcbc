"""Break-for-Make's partly-learnable-projection (PLP) adapters (docs/methods.md §4, docs/break-for-make.md):
their factors, files and assembly, and the layer that trains them.

On to_q / to_k / to_v / to_out.0: up = [A; B] (rows; A frozen, B learnable), down = [C | D] (columns;
C frozen, D learnable), ΔW = [[AC, AD], [BC, BD]]. The content adapter learns D, the style adapter B;
"make" takes D from the content adapter into the style adapter: [[AC, A·D_c], [B_s·C, B_s·D_c]].
Assembly is only valid when both adapters share A and C (made from one seed); two ordinary LoRAs have
arbitrary internal bases, so they are refused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from studio.errors import LoraError

PLP_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0")
NOT_B4M = ("B4M assembly combines a content and a style adapter trained as B4M partly-learnable projections from "
           "one seed; {name} is an ordinary LoRA, whose internal basis is arbitrary, so the halves would not fit "
           "together. Use the merge, regional or another method for ordinary LoRAs.")


@dataclass
class PLPFactors:
    """One layer's factors: up = [A; B] (out × r), down = [C | D] (r × in)."""
    A: torch.Tensor  # (out_top, r) frozen
    B: torch.Tensor  # (out - out_top, r) learnable (style)
    C: torch.Tensor  # (r, in_left) frozen
    D: torch.Tensor  # (r, in - in_left) learnable (content)

    @property
    def up(self) -> torch.Tensor:
        return torch.cat([self.A, self.B], 0)

    @property
    def down(self) -> torch.Tensor:
        return torch.cat([self.C, self.D], 1)

    def delta(self) -> torch.Tensor:
        return self.up @ self.down


def frozen_halves(out_features: int, in_features: int, rank: int, generator: torch.Generator):
    """A and C of one layer, from the seed: for square layers the rows of one random orthogonal basis
    (A its first out/2 rows, C the next in/2 rows, transposed); otherwise A = 0 and C random."""
    top, left = out_features // 2, in_features // 2
    if out_features == in_features:
        basis, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=generator))
        return basis[:top].clone(), basis[top:top + left].T.clone()
    return torch.zeros(top, rank), torch.randn(rank, left, generator=generator) / left ** 0.5


def create_plp_adapter(unet: nn.Module, rank: int, seed: int) -> dict[str, PLPFactors]:
    """PLP factors for every attention projection of the UNet; B and D start at zero. Two adapters made
    with one seed have identical A and C."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(PLP_TARGETS):
            A, C = frozen_halves(module.out_features, module.in_features, rank, generator)
            factors[name] = PLPFactors(A, torch.zeros(module.out_features - A.shape[0], rank), C,
                                       torch.zeros(rank, module.in_features - C.shape[1]))
    return factors


def frozen_fingerprint(factors: dict[str, PLPFactors]) -> str:
    digest = hashlib.sha256()
    for name in sorted(factors):
        digest.update(name.encode())
        digest.update(factors[name].A.float().numpy().tobytes())
        digest.update(factors[name].C.float().numpy().tobytes())
    return digest.hexdigest()[:16]


# --- files -----------------------------------------------------------------------------------------------
def save_plp_adapter(path: Path, factors: dict[str, PLPFactors], role: str, seed: int, extra: dict | None = None,
                     embeddings: dict | None = None):
    """A B4M adapter is saved as an ordinary kohya LoRA (up = [A; B], down = [C | D], alpha = rank) plus
    metadata saying which halves are frozen, so that it also loads and runs on its own; a learnt trigger word
    goes with it as a bundled embedding."""
    from studio.lora.kohya_export import save_kohya

    modules = {("unet", name): (f.down, f.up, float(f.A.shape[1])) for name, f in factors.items()}
    meta = {"b4m_role": role, "b4m_seed": str(seed), "b4m_frozen": frozen_fingerprint(factors),
            "b4m_splits": json.dumps({n: [f.A.shape[0], f.C.shape[1]] for n, f in factors.items()}),
            "ss_base_model_version": "shapes_world_v1"}
    meta.update(extra or {})
    return save_kohya(path, modules, meta, dtype=torch.float32, embeddings=embeddings)


def read_plp_adapter(path: Path) -> tuple[dict[str, PLPFactors], dict]:
    from studio.lora import load_lora

    weights = load_lora(path)
    meta = weights.info.metadata
    if "b4m_role" not in meta:
        raise LoraError(NOT_B4M.format(name=Path(path).name))
    splits = json.loads(meta["b4m_splits"])
    factors = {}
    for (component, target), module in weights.modules.items():
        top, left = splits[target]
        up, down = module.up, module.down
        factors[target] = PLPFactors(up[:top], up[top:], down[:, :left], down[:, left:])
    return factors, meta


def assemble(content_path: Path, style_path: Path, out_path: Path | None = None) -> dict[str, PLPFactors]:
    """"Make": the style adapter with the content adapter's D: ΔW = [[AC, A·D_c], [B_s·C, B_s·D_c]]."""
    content, content_meta = read_plp_adapter(content_path)
    style, style_meta = read_plp_adapter(style_path)
    if content_meta["b4m_role"] != "content" or style_meta["b4m_role"] != "style":
        raise LoraError(f"B4M assembly needs a content adapter and a style adapter; {Path(content_path).name} is "
                        f"{content_meta['b4m_role']} and {Path(style_path).name} is {style_meta['b4m_role']}.")
    if content_meta["b4m_frozen"] != style_meta["b4m_frozen"] or set(content) != set(style) or not all(
            torch.equal(content[n].A, style[n].A) and torch.equal(content[n].C, style[n].C) for n in content):
        raise LoraError(f"{Path(content_path).name} and {Path(style_path).name} were not created from the same seed "
                        "(their frozen halves A and C differ), so they cannot be assembled.")
    fused = {n: PLPFactors(style[n].A, style[n].B, style[n].C, content[n].D) for n in content}
    if out_path is not None:
        save_assembled(out_path, fused, content_path, style_path, content_meta)
    return fused


def save_assembled(out_path: Path, fused: dict[str, PLPFactors], content_path: Path, style_path: Path,
                    content_meta: dict, words: dict | None = None, extra: dict | None = None) -> Path:
    """`words`: as `assembled_embeddings` gives them (read from the pair when not given)."""
    return save_plp_adapter(out_path, fused, "assembled", int(content_meta["b4m_seed"]),
                            {"b4m_content": Path(content_path).name, "b4m_style": Path(style_path).name,
                             "ss_base_model_version": content_meta.get("ss_base_model_version", "shapes_world_v1"),
                             **(extra or {})},
                            embeddings=assembled_embeddings(content_path, style_path) if words is None else words)


def assembled_embeddings(content_path: Path, style_path: Path) -> dict:
    """The words both adapters bring (a learnt trigger each, if any): the assembled adapter brings them all."""
    from studio.lora import load_lora

    content, style = load_lora(content_path).embeddings, load_lora(style_path).embeddings
    shared = sorted(content.keys() & style.keys())
    if shared:
        raise LoraError(f"{Path(content_path).name} and {Path(style_path).name} both bring the word {shared[0]!r}, "
                        "so the assembled adapter cannot give it one meaning.")
    return {**content, **style}


def assembled_weights(fused: dict[str, PLPFactors], info, embeddings: dict | None = None):
    """The assembled adapter as one ordinary LoRA (`LoraWeights`, scale 1) for `attach_lora`, with the words
    of both adapters when given (not when the two adapters are attached beside it and bring them already)."""
    from studio.lora.weights import LoraModule, LoraWeights

    return LoraWeights("b4m_assembled", info, {("unet", n): LoraModule("unet", n, f.down, f.up, None, None, 1.0)
                                               for n, f in fused.items()}, embeddings or {})

class PLPLinear(nn.Module):
    """A Linear with a PLP adapter whose learnable halves are parameters (training only)."""

    def __init__(self, base: nn.Linear, factors: PLPFactors):
        super().__init__()
        self.base = base
        self.register_buffer("A", factors.A.clone())
        self.register_buffer("C", factors.C.clone())
        self.B = nn.Parameter(factors.B.clone())
        self.D = nn.Parameter(factors.D.clone())

    def forward(self, x):
        up = torch.cat([self.A, self.B], 0).to(x.dtype)  # fp32 halves, computed in the model's dtype
        down = torch.cat([self.C, self.D], 1).to(x.dtype)
        return self.base(x) + F.linear(F.linear(x, down), up)

    def factors(self) -> PLPFactors:
        return PLPFactors(self.A.detach().clone(), self.B.detach().clone(), self.C.detach().clone(),
                          self.D.detach().clone())


def wrap(unet: nn.Module, factors: dict[str, PLPFactors]) -> dict[str, PLPLinear]:
    from studio.lora.inject import replace_module

    wrapped = {}
    for name, f in factors.items():
        base = unet.get_submodule(name)
        wrapped[name] = PLPLinear(base, f).to(base.weight.device)
        replace_module(unet, name, wrapped[name])
    return wrapped


def unwrap(unet: nn.Module, wrapped: dict[str, PLPLinear]) -> None:
    from studio.lora.inject import replace_module

    for name, layer in wrapped.items():
        replace_module(unet, name, layer.base)
