"""What the importance passes record per weight: the token-weighted mean square of each input column
(the importance matrix) and, for the weights chosen, the weighted input second moments (H).

Shared by the whole-model pass (:mod:`.imatrix`) and the layer-by-layer pass (:mod:`.layerwise`),
so neither imports the other.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

# Weights with more input columns than this get the importance (diagonal) only: H would be
# columns² floats, and the compensated rounding's inverse grows as its cube.
HESSIAN_MAX_COLUMNS = 4096


def layer_hessian_names(modules: dict[str, Any], names: dict[str, str]) -> set[str]:
    """The GGUF names whose H the layer-by-layer pass records: every weight at most
    :data:`HESSIAN_MAX_COLUMNS` wide, whatever the model's dtype (the inputs are cast to float32)."""
    return {key for module_name, key in names.items()
            if int(modules[module_name].in_features) <= HESSIAN_MAX_COLUMNS}


class Stats:
    """Per GGUF name: Σ_t w_t x_t², Σ_t w_t and (for ``full``) Σ_t w_t x_t x_tᵀ, with w_t the
    squared output gradient of token t."""

    def __init__(self, full: set[str]) -> None:
        self.weighted: dict[str, Any] = {}
        self.weights: dict[str, Any] = {}
        self.full, self.outer = full, {}

    def hook(self, key: str) -> Callable:
        def forward(module: Any, inputs: tuple, output: Any) -> None:
            # Keep the input itself (q, k and v share one) until backward, not a float64 copy of
            # its square per layer: that copy was most of the backward pass's extra memory.
            x = inputs[0].detach()

            def backward(grad: Any) -> None:
                x2 = x.reshape(-1, x.shape[-1]).double().square()
                w = grad.detach().reshape(-1, grad.shape[-1]).double().square().sum(1)
                self.weighted[key] = self.weighted.get(key, 0) + w @ x2
                self.weights[key] = self.weights.get(key, 0) + w.sum()
                if key in self.full:
                    flat = x.reshape(-1, x.shape[-1]).float()
                    outer = (flat * w.float()[:, None]).T @ flat
                    self.outer[key] = outer if key not in self.outer else self.outer[key].add_(outer)

            if output.requires_grad:
                output.register_hook(backward)
        return forward

    def values(self) -> dict[str, np.ndarray]:
        """The importances; a weight no gradient reached gets no entry (quantized without weights)."""
        return {key: (weighted / self.weights[key]).float().cpu().numpy()
                for key, weighted in self.weighted.items() if float(self.weights[key]) > 0}

    def hessians(self) -> dict[str, np.ndarray]:
        return {key: (outer / float(self.weights[key])).cpu().numpy()
                for key, outer in self.outer.items() if float(self.weights[key]) > 0}
