"""Per-sample gradient clipping for DP-SGD without per-sample gradients of embedding tables.

DP-SGD (Abadi et al. 2016, https://arxiv.org/abs/1607.00133) clips each sample's whole gradient g_i
to norm C and sums: sum_i min(1, C / ||g_i||) g_i. This module computes that sum exactly with one
forward and one backward that stops at module outputs (no weight gradients are formed by autograd):

- forward hooks keep each supported module's input and output;
- ``torch.autograd.grad(sum_i loss_i, outputs)`` gives each module's output gradient, whose row i
  belongs to sample i alone (the model must not mix samples: batch norm is refused);
- each module turns (input, output gradient) into per-sample squared norms:
  ``nn.Linear`` by the ghost-norm identity ||b_i a_i^T||^2 = ||a_i||^2 ||b_i||^2 (Goodfellow 2015,
  https://arxiv.org/abs/1510.01799; Li et al. 2021, https://arxiv.org/abs/2110.05679), embeddings from
  coalesced (sample, row) triples (privacy.dp.embedding_clip), a few other layers from Opacus's
  per-sample grad samplers;
- with c_i = min(1, C / (||g_i|| + 1e-6)) (Opacus's formula), each module forms its share of
  sum_i c_i g_i directly: ``(c * B)^T A`` for a linear layer, a row-sparse sum for an embedding.

Memory for an embedding is batch x rows looked up x dim, never batch x table rows x dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

from privacy.dp.embedding_clip import (
    Lookups,
    check_embedding_module,
    embedding_bag_lookups,
    embedding_lookups,
    grouped_per_sample_gradient,
)
from privacy.errors import PrivacyError

# Opacus per-sample grad samplers used as a fallback: layers without cross-sample state whose
# samplers take batch-first activations.
_OPACUS_FALLBACK = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.RMSNorm,
)

SUPPORTED_LAYERS = ("Linear", "Embedding", "EmbeddingBag", *(cls.__name__ for cls in _OPACUS_FALLBACK))

# Opacus's clip factor: C / (||g|| + 1e-6), capped at 1.
CLIP_EPS = 1e-6


@dataclass
class ClippedGradients:
    """The clipped gradient sum of one batch (before noise and normalisation).

    Attributes:
        dense: parameter -> sum_i c_i g_i (same shape as the parameter), for non-embedding parameters.
        sparse: embedding weight -> (rows, values): the clipped sum restricted to the rows the batch
            looked up, one entry per lookup; rows may repeat and their values add up (every other
            row's clipped sum is exactly zero).
        norms: per-sample gradient norms before clipping, shape (batch,).
        clip_factors: c_i, shape (batch,).
    """

    dense: dict[Any, torch.Tensor] = field(default_factory=dict)
    sparse: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    norms: Any = None  # Tensor once filled in
    clip_factors: Any = None

    @property
    def batch_size(self) -> int:
        return 0 if self.norms is None else int(self.norms.numel())

    def to_dense(self, param: nn.Parameter) -> torch.Tensor:
        """Dense clipped gradient sum of ``param`` (for tests and the dense-noise path)."""
        if param in self.dense:
            return self.dense[param]
        rows, values = self.sparse[param]
        return torch.zeros_like(param).index_add_(0, rows, values.to(param.dtype))


class _Tape:
    """What one module saw during the forward: its inputs (detached) and its output."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        # Any: the concrete layer type (Linear, EmbeddingBag, ...) depends on the subclass.
        self.module: Any = module
        self.inputs: Any = None
        self.kwargs: dict[str, Any] = {}
        self.output: Any = None
        self.grad_output: Any = None

    def record(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self.output is not None:
            raise PrivacyError(
                f"module '{self.name}' ({type(self.module).__name__}) ran twice in one DP step: "
                "expected one call per step (a shared module breaks per-sample clipping here)"
            )
        if not isinstance(output, torch.Tensor):
            raise PrivacyError(
                f"module '{self.name}': output of type {type(output).__name__}, expected a tensor"
            )
        self.inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        self.kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        self.output = output

    def clear(self) -> None:
        self.inputs = None
        self.kwargs = {}
        self.output = None
        self.grad_output = None

    def params(self) -> list[Any]:
        return [p for p in self.module.parameters(recurse=False) if p.requires_grad]

    def batch_size(self) -> int:
        assert self.output is not None
        return int(self.output.shape[0]) if self.output.dim() else 1

    # Subclasses: squared norms (batch,) and the clipped sum into ``out``.
    def squared_norms(self) -> torch.Tensor:
        raise NotImplementedError

    def clipped_sum(self, clip: torch.Tensor, out: ClippedGradients) -> None:
        raise NotImplementedError

    def zero_sum(self, out: ClippedGradients) -> None:
        for p in self.params():
            out.dense[p] = torch.zeros_like(p)


class _LinearTape(_Tape):
    def _flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.inputs[0]
        b = self.grad_output
        batch = b.shape[0]
        a = a.to(b.dtype).reshape(batch, -1, a.shape[-1])
        b = b.reshape(batch, -1, b.shape[-1])
        return a, b

    def squared_norms(self) -> torch.Tensor:
        a, b = self._flat()
        sq = torch.zeros(b.shape[0], device=b.device, dtype=b.dtype)
        if self.module.weight.requires_grad:
            if a.shape[1] == 1:
                sq = sq + a.pow(2).sum(dim=(1, 2)) * b.pow(2).sum(dim=(1, 2))
            elif a.shape[1] ** 2 <= a.shape[2] * b.shape[2]:
                # Ghost norm over a sequence: ||sum_t b_t a_t^T||^2 = sum_{s,t} (a_s.a_t)(b_s.b_t).
                sq = sq + (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(b, b.transpose(1, 2))).sum(dim=(1, 2))
            else:
                sq = sq + torch.einsum("bto,bti->boi", b, a).pow(2).sum(dim=(1, 2))
        if self.module.bias is not None and self.module.bias.requires_grad:
            sq = sq + b.sum(dim=1).pow(2).sum(dim=1)
        return sq

    def clipped_sum(self, clip: torch.Tensor, out: ClippedGradients) -> None:
        a, b = self._flat()
        cb = b * clip.to(b.dtype).view(-1, 1, 1)
        if self.module.weight.requires_grad:
            weight = cb.reshape(-1, cb.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
            out.dense[self.module.weight] = weight.to(self.module.weight.dtype)
        if self.module.bias is not None and self.module.bias.requires_grad:
            out.dense[self.module.bias] = cb.sum(dim=(0, 1)).to(self.module.bias.dtype)


class _EmbeddingTape(_Tape):
    """Embedding tables are clipped together, in groups of one dim/dtype/device (see _EmbeddingGroup)."""

    def lookups(self) -> Lookups:
        module = self.module
        if isinstance(module, nn.EmbeddingBag):
            indices = self.inputs[0]
            offsets = self.inputs[1] if len(self.inputs) > 1 else self.kwargs.get("offsets")
            psw = self.inputs[2] if len(self.inputs) > 2 else self.kwargs.get("per_sample_weights")
            return embedding_bag_lookups(module, indices, offsets, psw)
        indices = self.inputs[0]
        if indices.dim() == 0:
            raise PrivacyError(f"module '{self.name}' (Embedding): a 0-d index has no sample dimension")
        return embedding_lookups(module, indices)

    def batch_size(self) -> int:
        assert self.output is not None
        return int(self.output.shape[0])

    def zero_sum(self, out: ClippedGradients) -> None:
        weight = self.module.weight
        out.sparse[weight] = (
            torch.zeros(0, dtype=torch.long, device=weight.device),
            torch.zeros(0, weight.shape[1], dtype=weight.dtype, device=weight.device),
        )


class _EmbeddingGroup:
    """Embedding tapes of one (dim, dtype, device), coalesced in a single shared row space."""

    def __init__(self, tapes: list[_EmbeddingTape]) -> None:
        self.tapes = tapes

    def squared_norms(self) -> torch.Tensor:
        tables = [(t.lookups(), t.grad_output, t.module.num_embeddings) for t in self.tapes]
        self._grad = grouped_per_sample_gradient(tables)
        return self._grad.squared_norms()

    def clipped_sum(self, clip: torch.Tensor, out: ClippedGradients) -> None:
        for tape, (rows, values) in zip(self.tapes, self._grad.clipped_sums(clip)):
            weight = tape.module.weight
            out.sparse[weight] = (rows, values.to(weight.dtype))
        del self._grad


class _OpacusTape(_Tape):
    """Fallback: Opacus's per-sample grad sampler (materialises batch x parameter shape)."""

    def squared_norms(self) -> torch.Tensor:
        sampler = GradSampleModule.GRAD_SAMPLERS[type(self.module)]
        activations = [a for a in self.inputs if isinstance(a, torch.Tensor)]
        self._samples = sampler(self.module, activations, self.grad_output)
        batch = self.grad_output.shape[0]
        sq = torch.zeros(batch, device=self.grad_output.device, dtype=self.grad_output.dtype)
        for g in self._samples.values():
            sq = sq + g.reshape(batch, -1).pow(2).sum(dim=1).to(sq.dtype)
        return sq

    def clipped_sum(self, clip: torch.Tensor, out: ClippedGradients) -> None:
        for p, g in self._samples.items():
            out.dense[p] = torch.einsum("i,i...->...", clip.to(g.dtype), g).to(p.dtype)
        del self._samples


class _FreeParamTape(_Tape):
    """Parameters a container module owns directly (e.g. a model's global bias).

    No layer rule applies, so their per-sample gradients come from one batched backward
    (``is_grads_batched``) of the per-sample losses, restricted to these parameters: autograd only
    walks the path from the loss to them. Memory is batch x their size, so their total size is capped.
    """

    def set_samples(self, samples: dict[Any, torch.Tensor]) -> None:
        self._samples = samples

    def squared_norms(self) -> torch.Tensor:
        batch = next(iter(self._samples.values())).shape[0]
        sq = torch.zeros(batch, dtype=torch.float64, device=next(iter(self._samples.values())).device)
        for g in self._samples.values():
            sq += g.reshape(batch, -1).pow(2).sum(dim=1).to(torch.float64)
        return sq

    def clipped_sum(self, clip: torch.Tensor, out: ClippedGradients) -> None:
        for p, g in self._samples.items():
            out.dense[p] = torch.einsum("i,i...->...", clip.to(g.dtype), g).to(p.dtype)
        del self._samples


FREE_PARAMETER_LIMIT = 65_536  # elements; per-sample gradients of free parameters are kept densely


def _tape_for(name: str, module: nn.Module) -> _Tape:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise PrivacyError(
            f"module '{name}' ({type(module).__name__}): batch norm mixes samples, so per-sample "
            "gradients do not exist; expected GroupNorm or LayerNorm"
        )
    if type(module) is nn.Linear:
        return _LinearTape(name, module)
    if type(module) in (nn.Embedding, nn.EmbeddingBag):
        check_embedding_module(name, module)
        return _EmbeddingTape(name, module)
    if type(module) in _OPACUS_FALLBACK and type(module) in GradSampleModule.GRAD_SAMPLERS:
        return _OpacusTape(name, module)
    if any(True for _ in module.children()):
        return _FreeParamTape(name, module)
    raise PrivacyError(
        f"module '{name}' ({type(module).__name__}) has trainable parameters but no per-sample "
        f"gradient rule for DP-SGD; supported layers: {', '.join(SUPPORTED_LAYERS)}"
    )


class PerSampleClipper:
    """Hooks a model and returns the exact clipped per-sample gradient sum of each batch.

    Args:
        model: the model; every module that owns trainable parameters must be a supported layer,
            and no parameter may be shared between modules.
        max_grad_norm: clipping bound C > 0 on each sample's whole-model gradient norm.

    Raises:
        PrivacyError: an unsupported layer, a shared parameter or a bad ``max_grad_norm``.
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float) -> None:
        if (
            isinstance(max_grad_norm, bool)
            or not isinstance(max_grad_norm, int | float)
            or not max_grad_norm > 0
        ):
            raise PrivacyError(f"max_grad_norm = {max_grad_norm!r}: expected a number > 0")
        if max_grad_norm == float("inf"):
            raise PrivacyError(f"max_grad_norm = {max_grad_norm!r}: expected a finite number > 0")
        self.max_grad_norm = float(max_grad_norm)
        self.model = model
        self.tapes: list[_Tape] = []
        owner: dict[int, str] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                _tape_for(name, module)  # raises
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            for p in own:
                if id(p) in owner:
                    raise PrivacyError(
                        f"parameter shared by modules '{owner[id(p)]}' and '{name}': expected each "
                        "trainable parameter to belong to one module for per-sample clipping"
                    )
                owner[id(p)] = name
            self.tapes.append(_tape_for(name or type(module).__name__, module))
        if not self.tapes:
            raise PrivacyError("model has no trainable parameters: nothing to train with DP-SGD")
        self.free_tapes = [t for t in self.tapes if isinstance(t, _FreeParamTape)]
        free_size = sum(p.numel() for t in self.free_tapes for p in t.params())
        if free_size > FREE_PARAMETER_LIMIT:
            names = ", ".join(t.name or "<model>" for t in self.free_tapes)
            raise PrivacyError(
                f"modules {names} own {free_size} trainable parameter elements directly: expected at most "
                f"{FREE_PARAMETER_LIMIT} outside supported layers ({', '.join(SUPPORTED_LAYERS)})"
            )
        self._handles = [
            tape.module.register_forward_hook(self._make_hook(tape), with_kwargs=True)
            for tape in self.tapes
            if not isinstance(tape, _FreeParamTape)
        ]

    def _make_hook(self, tape: _Tape):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
                tape.record(args, kwargs, output)

        return hook

    @property
    def parameters(self) -> list[Any]:
        """Every trainable parameter, in module order."""
        return [p for tape in self.tapes for p in tape.params()]

    @property
    def embedding_weights(self) -> list[Any]:
        """Trainable embedding tables (their clipped sums come back row-sparse)."""
        return [t.module.weight for t in self.tapes if isinstance(t, _EmbeddingTape) and t.params()]

    def clear(self) -> None:
        """Forget what the hooks recorded (e.g. after a forward that will not be stepped)."""
        for tape in self.tapes:
            tape.clear()

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def clip(self, per_sample_loss: torch.Tensor) -> ClippedGradients:
        """Clipped gradient sum for the batch whose forward produced ``per_sample_loss``.

        Args:
            per_sample_loss: shape (batch, ...): row i depends on sample i only (reduction='none').

        Raises:
            PrivacyError: the loss is not per sample, or a module saw a different batch size.
        """
        try:
            return self._clip(per_sample_loss)
        finally:
            self.clear()

    def _clip(self, per_sample_loss: torch.Tensor) -> ClippedGradients:
        if per_sample_loss.dim() == 0:
            raise PrivacyError(
                "per-sample loss is a scalar: expected one loss per sample (use reduction='none')"
            )
        batch = int(per_sample_loss.shape[0])
        recorded = [t for t in self.tapes if t.output is not None]
        for tape in recorded:
            if tape.batch_size() != batch:
                raise PrivacyError(
                    f"module '{tape.name}' saw a batch of {tape.batch_size()} samples but the loss has "
                    f"{batch}: expected the first dimension (or bag count) to be the sample"
                )
        out = ClippedGradients()
        used: list[_Tape] = []
        free_params = [p for t in self.free_tapes for p in t.params()]
        if batch > 0 and free_params and per_sample_loss.requires_grad:
            # Row i of the identity picks loss_i: one vmapped backward gives every d loss_i / d p.
            losses = per_sample_loss.reshape(batch, -1).sum(dim=1)
            eye = torch.eye(batch, device=losses.device, dtype=losses.dtype)
            free_grads = torch.autograd.grad(
                losses,
                free_params,
                grad_outputs=eye,
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
            by_param = {
                id(p): (
                    p,
                    torch.zeros(batch, *p.shape, dtype=p.dtype, device=p.device) if g is None else g.detach(),
                )
                for p, g in zip(free_params, free_grads)
            }
            for tape in self.free_tapes:
                tape.set_samples({by_param[id(p)][0]: by_param[id(p)][1] for p in tape.params()})
                used.append(tape)
        if batch > 0 and recorded:
            grads = torch.autograd.grad(
                per_sample_loss.sum(), [t.output for t in recorded], allow_unused=True
            )
            for tape, grad in zip(recorded, grads):
                if grad is not None:
                    tape.grad_output = grad.detach()
                    used.append(tape)
        device = per_sample_loss.device
        groups: dict[tuple, list[_EmbeddingTape]] = {}
        for tape in used:
            if isinstance(tape, _EmbeddingTape):
                w = tape.module.weight
                groups.setdefault((w.shape[1], tape.grad_output.dtype, w.device), []).append(tape)
        parts: list[Any] = [t for t in used if not isinstance(t, _EmbeddingTape)]
        parts += [_EmbeddingGroup(g) for g in groups.values()]
        sq = torch.zeros(batch, device=device, dtype=torch.float64)
        for part in parts:
            sq += part.squared_norms().to(device=device, dtype=torch.float64)
        norms = sq.sqrt()
        clip = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        for part in parts:
            part.clipped_sum(clip, out)
        for tape in self.tapes:
            if tape not in used:
                tape.zero_sum(out)
        out.norms = norms
        out.clip_factors = clip
        return out
