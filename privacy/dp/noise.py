"""Gaussian noise sources for DP-SGD: a seeded PyTorch generator, or a cryptographically secure one.

``secure_mode=False`` draws from PyTorch's generators (Mersenne Twister on CPU, Philox on CUDA),
seeded for reproducibility. Their output is predictable from the seed/state, which is fine for
experiments but not for a deployment facing an adversary who might learn or guess the state.

``secure_mode=True`` draws every uniform from the operating system's CSPRNG (``os.urandom``) and turns
them into Gaussians with Box-Muller in float64. Like Opacus's secure mode it then returns
(z1 + z2 + z3 + z4) / 2 for four independent N(0, std^2) draws, the defence of Holohan & Braghin 2021
(https://arxiv.org/abs/2107.10138, section 5.1) against floating-point attacks on Gaussian samplers
(Jin et al. 2022, https://arxiv.org/abs/2112.05307). Opacus itself needs ``torchcsprng`` for this,
which has no build for current PyTorch; this module needs nothing beyond the standard library and
NumPy. Noise for CUDA tensors is drawn on the CPU and copied over. Cost: 32 random bytes and four
logarithms per noise value (figures in docs/privacy.md).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

_TWO_POW_MINUS_53 = 2.0**-53


def _secure_standard_normal(count: int) -> np.ndarray:
    """``count`` independent N(0, 1) float64 samples from os.urandom via Box-Muller."""
    pairs = (count + 1) // 2
    bits = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs) >> np.uint64(11)
    u1 = (bits[0].astype(np.float64) + 1.0) * _TWO_POW_MINUS_53  # (0, 1]: log is finite
    u2 = bits[1].astype(np.float64) * _TWO_POW_MINUS_53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * math.pi * u2
    out = np.empty(2 * pairs, dtype=np.float64)
    out[:pairs] = radius * np.cos(angle)
    out[pairs:] = radius * np.sin(angle)
    return out[:count]


class GaussianNoise:
    """Source of N(0, std^2) noise tensors.

    Args:
        secure_mode: draw from the OS CSPRNG (see module docstring); ``seed`` must then be None.
        seed: seed for the PyTorch generators (one per device); None = nondeterministic.
    """

    def __init__(self, *, secure_mode: bool = False, seed: int | None = None) -> None:
        from privacy.errors import PrivacyError

        if secure_mode and seed is not None:
            raise PrivacyError(
                f"seed = {seed!r} with secure_mode = True: expected no seed (secure noise is unseeded)"
            )
        self.secure_mode = bool(secure_mode)
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """The PyTorch generator used for ``device`` (non-secure mode)."""
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed)
            self._generators[key] = gen
        return self._generators[key]

    def normal(
        self,
        shape: tuple[int, ...] | torch.Size,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Standard normal noise of ``shape`` (scale it yourself: secure mode already includes the sum)."""
        device = torch.device(device)
        count = math.prod(shape)
        if self.secure_mode:
            total = np.zeros(count, dtype=np.float64)
            for _ in range(4):
                total += _secure_standard_normal(count)
            total *= 0.5
            return torch.from_numpy(total).to(dtype=dtype).reshape(shape).to(device)
        return torch.randn(shape, generator=self.generator(device), device=device, dtype=dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Generator states (empty in secure mode: there is nothing to restore)."""
        return {key: gen.get_state() for key, gen in self._generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.secure_mode:
            return
        for key, value in state.items():
            self.generator(torch.device(key)).set_state(value.to("cpu", torch.uint8))
