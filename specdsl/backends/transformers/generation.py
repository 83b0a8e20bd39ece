"""Batched generation on a loaded model: requests sorted by prompt length and decoded together with a
KV cache, each sampled request drawing from its own seeded random stream.

A request that cannot be answered on its own comes back as an error result; a batch that runs out of
memory is split in halves and retried. torch and transformers are imported where they run.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from specdsl.backends.transformers.loading import LoadedModel
from specdsl.contract.hookspecs import GenRequest, GenResult


@dataclass
class _Item:
    """One request ready to decode: its prompt tokens and its own decoding parameters and seed."""

    request: GenRequest
    ids: list[int]
    max_new: int
    temperature: float
    top_p: float
    seed: int


def generate_batches(lm: LoadedModel, settings: Mapping[str, Any], requests: Sequence[GenRequest],
                     on_result: Callable[[GenResult], None]) -> None:
    """Answer ``requests`` on ``lm``, calling ``on_result`` once per request, after each batch."""
    items: list[_Item] = []
    for req in requests:
        item = _prepare(lm, settings, req)
        if isinstance(item, GenResult):
            on_result(item)
        else:
            items.append(item)

    # Batches share max_new_tokens (the batch runs until its longest answer is done); within a group,
    # longest prompts first: similar lengths share a batch, and running out of memory shows up on the
    # first batch rather than the last.
    items.sort(key=lambda it: (it.max_new, -len(it.ids)))
    size = int(settings["batch_size"])
    start = 0
    while start < len(items):
        group = items[start]
        end = start
        while end < len(items) and end - start < size and items[end].max_new == group.max_new:
            end += 1
        for result in _run_batch(lm, items[start:end]):
            on_result(result)
        start = end


def _prepare(lm: LoadedModel, settings: Mapping[str, Any], req: GenRequest) -> _Item | GenResult:
    """Tokenize one request and merge its params with the options, or explain why it cannot run."""
    # A None value means "not set" (callers build params from optional fields).
    params = {k: v for k, v in (req.params or {}).items() if v is not None}
    try:
        max_new = params.get("max_tokens", params.get("max_new_tokens", settings["max_new_tokens"]))
        temperature = params.get("temperature", settings["temperature"])
        top_p = params.get("top_p", settings["top_p"])
        if not (isinstance(max_new, int) and not isinstance(max_new, bool) and max_new >= 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_new!r}")
        if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
                and temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    except ValueError as e:
        return GenResult(key=req.key, error=f"invalid request parameters: {e}")

    messages = [dict(m) for m in req.messages]
    if not messages:
        return GenResult(key=req.key, error="the request has no messages")
    try:
        text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja errors, raise_exception() in templates, bad roles
        return GenResult(key=req.key, error=f"the model's chat template rejected the messages: "
                                            f"{type(e).__name__}: {e}")
    # The template already wrote the special tokens; letting the tokenizer add a BOS would double it.
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    ctx = lm.context_length
    if ctx is not None and len(ids) + max_new > ctx:
        return GenResult(
            key=req.key, input_tokens=len(ids),
            error=f"prompt too long: {len(ids)} prompt tokens + max_new_tokens {max_new} = "
                  f"{len(ids) + max_new}, more than the model's context of {ctx} tokens "
                  "(shorten the prompt or lower max_new_tokens)")
    seed_blob = f"{settings['seed']}\0{params.get('seed', '')}\0{req.key}".encode()
    seed = int.from_bytes(hashlib.sha256(seed_blob).digest()[:8], "big") & (2**63 - 1)
    return _Item(req, ids, max_new, float(temperature), float(top_p), seed)


def _run_batch(lm: LoadedModel, batch: list[_Item]) -> list[GenResult]:
    """Decode one batch; on out-of-memory, split it in halves and retry each."""
    import torch

    t0 = time.perf_counter()
    try:
        rows = _decode(lm, batch)
    except Exception as e:  # noqa: BLE001 - turned into per-request errors below
        if _is_oom(e):
            if lm.device == "cuda":
                torch.cuda.empty_cache()
            if len(batch) > 1:
                half = len(batch) // 2
                return _run_batch(lm, batch[:half]) + _run_batch(lm, batch[half:])
            msg = (f"out of memory generating {batch[0].max_new} tokens after a {len(batch[0].ids)}-"
                   f"token prompt on {lm.device} (lower max_new_tokens or use a smaller dtype)")
        else:
            msg = f"generation failed: {type(e).__name__}: {e}"
        return [GenResult(key=it.request.key, input_tokens=len(it.ids), error=msg) for it in batch]
    latency = time.perf_counter() - t0
    out = []
    for it, tokens in zip(batch, rows):
        n_out = len(tokens)
        end = next((i for i, t in enumerate(tokens) if t in lm.eos_ids), None)
        if end is not None:
            tokens, n_out = tokens[:end], end + 1  # the stop token counts as generated
        text = lm.tokenizer.decode(tokens, skip_special_tokens=True)
        out.append(GenResult(key=it.request.key, text=text, input_tokens=len(it.ids),
                             output_tokens=n_out, latency_s=latency))
    return out


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, (RuntimeError, MemoryError)) and (
        isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text)


def _decode(lm: LoadedModel, batch: list[_Item]) -> list[list[int]]:
    """Left-pad the prompts, run ``generate`` with a KV cache, return each row's new tokens."""
    import torch
    from transformers import LogitsProcessorList

    width = max(len(it.ids) for it in batch)
    input_ids = torch.full((len(batch), width), lm.pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, it in enumerate(batch):
        input_ids[row, width - len(it.ids):] = torch.tensor(it.ids, dtype=torch.long)
        attention[row, width - len(it.ids):] = 1

    processors = LogitsProcessorList()
    if any(it.temperature > 0 for it in batch):
        # Sampling happens in our processor, one seeded stream per row; generate() then runs in greedy
        # mode and takes the argmax, i.e. exactly the token the processor drew.
        processors.append(_row_sampler()(batch))
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=input_ids.to(lm.device), attention_mask=attention.to(lm.device),
            max_new_tokens=batch[0].max_new, do_sample=False, num_beams=1, use_cache=True,
            logits_processor=processors, pad_token_id=lm.pad_id, eos_token_id=sorted(lm.eos_ids))
    return out[:, width:].tolist()


_SAMPLER_CLASS = None


def _row_sampler():
    """The per-row sampling processor class (built on first use: it subclasses a transformers class)."""
    global _SAMPLER_CLASS
    if _SAMPLER_CLASS is not None:
        return _SAMPLER_CLASS
    import torch
    from transformers import LogitsProcessor

    class RowSampler(LogitsProcessor):
        """Draws each sampled row's next token from that row's own generator.

        Temperature and top-p are applied per row, then the token is drawn by inverse transform with
        one uniform number from the row's generator (on CPU, so CPU and CUDA runs share seeds). The
        returned scores are 0 for the drawn token and -inf elsewhere; greedy rows pass through.
        """

        def __init__(self, batch: list[_Item]):
            self.rows = [i for i, it in enumerate(batch) if it.temperature > 0]
            self.temperature = [batch[i].temperature for i in self.rows]
            self.top_p = [batch[i].top_p for i in self.rows]
            self.generators = [torch.Generator().manual_seed(batch[i].seed) for i in self.rows]

        def __call__(self, input_ids, scores):
            dev = scores.device
            rows = torch.tensor(self.rows, device=dev)
            # The floor keeps a vanishing temperature from dividing logits into inf - inf = NaN.
            temperature = torch.tensor(self.temperature, device=dev).clamp_min(1e-4).unsqueeze(1)
            logits = scores[rows].float() / temperature
            probs = torch.softmax(logits, dim=-1)
            if any(p < 1.0 for p in self.top_p):
                probs, order = probs.sort(dim=-1, descending=True, stable=True)
                before = probs.cumsum(dim=-1) - probs
                keep = before < torch.tensor(self.top_p, device=dev).unsqueeze(1)
                probs = probs * keep  # the most likely token is always kept (before == 0)
            else:
                order = None
            cdf = probs.cumsum(dim=-1)
            u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
            target = (u.to(dev) * cdf[:, -1].double()).to(cdf.dtype).unsqueeze(1)
            pick = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)
            # Rounding could land past the last kept token; step back onto one with probability.
            pick = torch.where(probs.gather(1, pick) > 0, pick, probs.argmax(dim=-1, keepdim=True))
            token = order.gather(1, pick) if order is not None else pick
            out = scores.clone()
            out[rows] = float("-inf")
            out[rows.unsqueeze(1), token] = 0.0
            return out

    _SAMPLER_CLASS = RowSampler
    return RowSampler
