"""What a request costs: per-token list prices from litellm's local cost map (never fetched).

A model the cost map does not know (a self-hosted one) has no price: its cost is unknown, not zero.
"""

from __future__ import annotations

import json
import os
import re
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


def _cost_map() -> dict[str, Any]:
    """litellm's bundled cost map, read once as data (no ``import litellm``); {} without litellm."""
    global _COST_MAP
    if _COST_MAP is None:
        import importlib.util

        cost_map: dict[str, Any] = {}
        spec = importlib.util.find_spec("litellm")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = os.path.join(folder, "model_prices_and_context_window_backup.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as fh:
                    cost_map = json.load(fh)
                break
        _COST_MAP = cost_map
    return _COST_MAP


def cost_map_prices(model: str) -> Prices | None:
    """Per-token prices from litellm's bundled cost map, read as data (no ``import litellm``)."""
    cost_map = _cost_map()
    for name in (model, model.partition("/")[2]):
        info = cost_map.get(name)
        if isinstance(info, dict) and info.get("input_cost_per_token") is not None \
                and info.get("output_cost_per_token") is not None:
            return float(info["input_cost_per_token"]), float(info["output_cost_per_token"])
    return None


# OpenAI's own model families, whose request parameters litellm rewrites per model (o-series and gpt-5:
# max_tokens -> max_completion_tokens, temperature refused or dropped; audio and search variants: fewer
# parameters). Matched by name, anywhere in it as litellm matches "gpt-5", so a family newer than the
# bundled cost map is still recognised.
_OPENAI_FAMILY = re.compile(r"(?i)gpt-|chatgpt|(?:^|[/:])(?:o\d|ft:|text-|davinci|babbage|computer-use|codex)")


def litellm_maps_openai_params(name: str) -> bool:
    """Whether litellm may rewrite the parameters of ``openai/<name>``: a model its cost map knows, or
    one of OpenAI's own families. For any other name (a server's own model behind an OpenAI-compatible
    endpoint) litellm's openai provider sends max_tokens, temperature, top_p and seed unchanged."""
    if _OPENAI_FAMILY.search(name):
        return True
    cost_map = _cost_map()
    return name in cost_map or f"openai/{name}" in cost_map
