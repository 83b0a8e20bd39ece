"""What a request costs: per-token list prices from litellm's local cost map (never fetched).

A model the cost map does not know (a self-hosted one) has no price: its cost is unknown, not zero.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from specdsl.backends.litellm.loader import import_litellm

Prices = tuple[float, float]  # USD per input token, per output token


class PriceTable:
    """Per-token prices by model name, asked of litellm once per model (shared by a backend's copies)."""

    def __init__(self) -> None:
        self._prices: dict[str, Prices | None] = {}
        self._lock = threading.Lock()

    def per_token(self, model: str) -> Prices | None:
        with self._lock:
            if model in self._prices:
                return self._prices[model]
        litellm = import_litellm()
        prices: Prices | None
        try:
            info = litellm.get_model_info(model)
            pin, pout = info.get("input_cost_per_token"), info.get("output_cost_per_token")
            prices = (float(pin), float(pout)) if pin is not None and pout is not None else None
        except Exception:  # not in the cost map (a self-hosted model): unknown price, not free
            prices = None
        with self._lock:
            self._prices[model] = prices
        return prices


def cost(prices: Prices | None, input_tokens: int, output_tokens: int) -> float | None:
    """USD for one request's tokens, or None when the price is unknown."""
    return None if prices is None else input_tokens * prices[0] + output_tokens * prices[1]


_COST_MAP: dict[str, Any] | None = None


def cost_map_prices(model: str) -> Prices | None:
    """Per-token prices from litellm's bundled cost map, read as data (no ``import litellm``)."""
    global _COST_MAP
    if _COST_MAP is None:
        import importlib.util

        _COST_MAP = {}
        spec = importlib.util.find_spec("litellm")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = os.path.join(folder, "model_prices_and_context_window_backup.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as fh:
                    _COST_MAP = json.load(fh)
                break
    for name in (model, model.partition("/")[2]):
        info = _COST_MAP.get(name)
        if isinstance(info, dict) and info.get("input_cost_per_token") is not None \
                and info.get("output_cost_per_token") is not None:
            return float(info["input_cost_per_token"]), float(info["output_cost_per_token"])
    return None
