"""DP-SGD step for models with large embedding tables: exact clipping, Gaussian noise, lazy row noise.

One :meth:`DPSGD.step` is textbook DP-SGD (Abadi et al. 2016, https://arxiv.org/abs/1607.00133) with
Opacus's conventions (``opacus.optimizers.DPOptimizer``): the per-sample clipped gradient sum plus
N(0, (noise_multiplier * max_grad_norm)^2) noise per coordinate, divided by the *expected* batch size
N * q (Poisson batches vary in size; dividing by the realised size would leak it), then the wrapped
torch optimizer's update. Clipping comes from privacy.dp.per_sample (memory ~ rows touched).

Noise:

- ``lazy_noise=True`` (default): dense parameters get fresh noise every step; embedding rows get
  their accumulated noise when next read and at :meth:`DPSGD.flush` (privacy.dp.lazy_noise), with the
  same distribution as noising every row every step. Exact only for plain SGD, so anything else is
  refused: the optimizer must be ``torch.optim.SGD`` with momentum 0, weight_decay 0, nesterov and
  maximize False (the learning rate may change between steps). Checked at construction and before
  every step.
- ``lazy_noise=False``: every parameter, embedding tables included, gets dense noise every step and
  any torch optimizer may follow (Adam, Adagrad, momentum: post-processing keeps the guarantee).
  Correct but costs a dense table-sized gradient and noise draw per step.

Reads of embedding weights that bypass the modules' forward (``weight.data``, ``named_parameters``)
must call :meth:`DPSGD.flush` first; ``model.state_dict()`` flushes automatically.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from privacy.accounting.accountants import Accountant, check_noise_multiplier, check_sample_rate
from privacy.dp.lazy_noise import LazyRowNoise
from privacy.dp.noise import GaussianNoise
from privacy.dp.per_sample import ClippedGradients, PerSampleClipper
from privacy.errors import PrivacyError

LAZY_OPTIMIZERS = "torch.optim.SGD with momentum=0, weight_decay=0, nesterov=False, maximize=False"


class StepStats:
    """What one DP step did, for logging. Tensors stay on the device until read (no per-step sync).

    These are statistics of the private batch before noise: log them for debugging, do not publish.
    """

    def __init__(self, norms: torch.Tensor | None, clip_factors: torch.Tensor | None) -> None:
        self._norms = norms
        self._clip = clip_factors

    @property
    def batch_size(self) -> int:
        return 0 if self._norms is None else int(self._norms.numel())

    @property
    def clipped_fraction(self) -> float:
        if self._clip is None or self._clip.numel() == 0:
            return 0.0
        return float((self._clip < 1.0).double().mean())

    @property
    def mean_norm(self) -> float:
        if self._norms is None or self._norms.numel() == 0:
            return 0.0
        return float(self._norms.mean())


def check_lazy_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise unless lazy row noise is exact for ``optimizer`` (plain SGD only)."""
    if type(optimizer) is not torch.optim.SGD:
        raise PrivacyError(
            f"optimizer = {type(optimizer).__name__} with lazy_noise = True: expected {LAZY_OPTIMIZERS} "
            "(other optimizers need lazy_noise = False, i.e. dense noise every step)"
        )
    for index, group in enumerate(optimizer.param_groups):
        for key, allowed in (("momentum", 0), ("weight_decay", 0), ("nesterov", False), ("maximize", False)):
            if group.get(key, allowed) != allowed:
                raise PrivacyError(
                    f"optimizer param_groups[{index}].{key} = {group[key]!r} with lazy_noise = True: "
                    f"expected {allowed!r} (lazy noise is exact only for {LAZY_OPTIMIZERS})"
                )


class DPSGD:
    """Differentially private training step over a model and a torch optimizer.

    Args:
        model: the model; its layers must be supported by privacy.dp.per_sample.
        optimizer: a torch optimizer over the model's trainable parameters (all of them).
        noise_multiplier: sigma > 0: noise std is sigma * max_grad_norm.
        max_grad_norm: C > 0: bound on each sample's gradient norm.
        sample_rate: Poisson sampling probability q of each example per step.
        num_examples: N, the training examples; the noisy sum is divided by N * q.
        lazy_noise: defer embedding-row noise until the row is read (plain SGD only).
        secure_mode: draw noise from the OS CSPRNG (privacy.dp.noise).
        seed: seed of the non-secure noise generators.
        accountant: if given, every step is recorded in it.

    Raises:
        PrivacyError: bad parameters, an unsupported layer, or an optimizer lazy noise cannot serve.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        num_examples: int,
        lazy_noise: bool = True,
        secure_mode: bool = False,
        seed: int | None = None,
        accountant: Accountant | None = None,
    ) -> None:
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.sample_rate = check_sample_rate(sample_rate)
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise PrivacyError(f"num_examples = {num_examples!r}: expected a positive integer")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise PrivacyError(f"optimizer = {optimizer!r}: expected a torch.optim.Optimizer")
        self.num_examples = num_examples
        self.expected_batch_size = num_examples * self.sample_rate
        self.lazy_noise = bool(lazy_noise)
        self.model = model
        self.optimizer = optimizer
        self.accountant = accountant
        self.clipper = PerSampleClipper(model, max_grad_norm=max_grad_norm)
        self.max_grad_norm = self.clipper.max_grad_norm
        self.noise = GaussianNoise(secure_mode=secure_mode, seed=seed)
        self.steps = 0
        if self.lazy_noise:
            check_lazy_optimizer(optimizer)
        self._group_of = self._check_optimizer_covers_model()
        self._embedding_weights = self.clipper.embedding_weights
        self._embedding_ids = {id(w) for w in self._embedding_weights}
        self._dense_params = [p for p in self.clipper.parameters if id(p) not in self._embedding_ids]
        groups: dict[tuple, list] = {}
        for p in self._dense_params:
            groups.setdefault((p.device, p.dtype), []).append(p)
        self._dense_groups = list(groups.values())
        self.lazy: dict[int, LazyRowNoise] = {}
        self._handles: list[Any] = []
        if self.lazy_noise:
            for tape in self.clipper.tapes:
                weight = getattr(tape.module, "weight", None)
                if weight is not None and id(weight) in self._embedding_ids:
                    self.lazy[id(weight)] = LazyRowNoise(weight, noise=self.noise)
                    self._handles.append(
                        tape.module.register_forward_pre_hook(self._flush_hook(weight), with_kwargs=True)
                    )
                    self._handles.append(
                        tape.module.register_state_dict_pre_hook(self._state_dict_hook(weight))
                    )
        optimizer.zero_grad(set_to_none=True)

    # ---- setup checks -----------------------------------------------------------------------------

    def _check_optimizer_covers_model(self) -> dict[int, dict]:
        group_of: dict[int, dict] = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                group_of[id(p)] = group
        model_params = {id(p) for p in self.clipper.parameters}
        for p in self.clipper.parameters:
            if id(p) not in group_of:
                raise PrivacyError(
                    f"optimizer does not hold a trainable model parameter of shape {tuple(p.shape)}: "
                    "expected the optimizer over all of model.parameters()"
                )
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in model_params:
                    raise PrivacyError(
                        f"optimizer holds a parameter of shape {tuple(p.shape)} that is not in the model: "
                        "it would be updated without clipping or noise"
                    )
        return group_of

    def _flush_hook(self, weight: nn.Parameter):
        lazy_id = id(weight)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            indices = args[0] if args else kwargs.get("input")
            if isinstance(indices, torch.Tensor):
                self.lazy[lazy_id].flush_rows(indices)

        return hook

    def _state_dict_hook(self, weight: nn.Parameter):
        lazy_id = id(weight)

        def hook(module: nn.Module, prefix: str, keep_vars: bool) -> None:
            self.lazy[lazy_id].flush()

        return hook

    # ---- the step ---------------------------------------------------------------------------------

    def step(self, per_sample_loss: torch.Tensor) -> StepStats:
        """Clip, noise and apply one Poisson batch's update; record it in the accountant.

        Args:
            per_sample_loss: shape (batch, ...) from the forward of this batch (reduction='none');
                an empty tensor for an empty Poisson batch (noise is still added).
        """
        if self.lazy_noise:
            check_lazy_optimizer(self.optimizer)  # fail closed if the optimizer was changed
        clipped = self.clipper.clip(per_sample_loss)
        self._apply(clipped)
        self.steps += 1
        if self.accountant is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return StepStats(clipped.norms, clipped.clip_factors)

    @torch.no_grad()
    def _apply(self, clipped: ClippedGradients) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        scale = 1.0 / self.expected_batch_size
        for params in self._dense_groups:
            # One draw for all dense parameters of a device and dtype, and list ops over its chunks:
            # a handful of tensor operations per step instead of several per parameter, same law.
            noise = self.noise.normal(
                (sum(p.numel() for p in params),), device=params[0].device, dtype=params[0].dtype
            )
            grads = [c.view_as(p) for c, p in zip(noise.split([p.numel() for p in params]), params)]
            torch._foreach_mul_(grads, std)
            torch._foreach_add_(grads, [clipped.dense[p] for p in params])
            torch._foreach_mul_(grads, scale)
            for p, grad in zip(params, grads):
                p.grad = grad
        for weight in self._embedding_weights:
            rows, values = clipped.sparse[weight]
            if self.lazy_noise:
                lr = float(self._group_of[id(weight)]["lr"])
                weight.grad = None
                weight.index_add_(0, rows, values, alpha=-lr * scale)
                self.lazy[id(weight)].advance((lr * std * scale) ** 2)
            else:
                grad = self.noise.normal(weight.shape, device=weight.device, dtype=weight.dtype).mul_(std)
                grad.index_add_(0, rows, values)
                weight.grad = grad.mul_(scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- lazy noise, state ------------------------------------------------------------------------

    def flush(self) -> None:
        """Apply all pending row noise (before export, checkpoint, evaluation or parameter reads)."""
        for lazy in self.lazy.values():
            lazy.flush()

    @property
    def is_flushed(self) -> bool:
        return all(lazy.is_flushed for lazy in self.lazy.values())

    def state_dict(self) -> dict[str, Any]:
        """Flushes, then returns the step count and noise generator states."""
        self.flush()
        return {"steps": self.steps, "noise": self.noise.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("steps"), int):
            raise PrivacyError(f"DP-SGD state = {state!r:.80}: expected a mapping with an integer 'steps'")
        self.flush()
        self.steps = state["steps"]
        self.noise.load_state_dict(state.get("noise", {}))

    def close(self) -> None:
        """Flush and remove every hook from the model."""
        self.flush()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clipper.remove()
