"""The vocabulary of position probing: the tasks, the IN2 template and instructions, the token estimate,
and what a probe is made of (:class:`ProbeItem`) and scores to (:class:`PositionResult`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

POSITION_TASKS: tuple[str, ...] = ("document", "code", "records")
# The longest code line a ``code`` instruction quotes (the plan's estimate sizes prompts by it).
MAX_CODE_QUERY_CHARS = 100

# The IN2 training/evaluation template (FACTS.md), without Mistral's [INST] tags: the chat template of
# whichever model answers adds its own turn markers around the user message.
IN2_TEMPLATE = (
    "Below is a context and an instruction. Based on the information provided in the context, "
    "write a response for the instruction.\n\n### Context:\n{context}\n\n### Instruction:\n{instruction}"
)

INSTRUCTIONS: Mapping[str, str] = {
    "document": 'In the above context, which sentence contains the piece "{query}"? '
                "Output the complete sentence.",
    "code": 'In the above context, which function contains the code line "{query}"? '
            "Output the function name.",
    "records": 'In the above context, what is the label of the record whose id is "{query}"? '
               "Output the label.",
}

# How units are joined into a context. Sentences read as one running document (the paper's contexts are
# prose); functions are separated like in a source file; records are one per line.
JOINERS: Mapping[str, str] = {"document": " ", "code": "\n\n\n", "records": "\n"}

CountTokens = Callable[[str], int]
AnswerFn = Callable[[list[list[dict]]], list[str]]


def approx_token_count(text: str) -> int:
    """A tokenizer-free token estimate: the larger of the word count and characters / 4.

    It is subadditive (the count of a concatenation never exceeds the sum of the parts), so a context
    assembled from counted parts never overshoots its budget under this estimate.
    """
    return max(len(text.split()), -(-len(text) // 4))


@dataclass(frozen=True)
class ProbeItem:
    """One question of a position probe.

    ``position`` is the relative token position of the target's midpoint in the context, in [0, 1);
    ``bucket`` is ``floor(position * n_buckets)``. ``context_span`` locates the context inside the last
    message's content and ``target_span`` locates the target inside the context (character offsets), so
    the context is not stored twice.
    """

    task: str
    messages: tuple[Mapping[str, str], ...]
    expected: str
    bucket: int
    position: float
    n_buckets: int
    query: str
    context_tokens: int
    context_span: tuple[int, int]
    target_span: tuple[int, int]

    @property
    def context(self) -> str:
        start, end = self.context_span
        return self.messages[-1]["content"][start:end]

    @property
    def target(self) -> str:
        start, end = self.target_span
        return self.context[start:end]

    def prompt(self) -> list[dict]:
        """The chat messages as fresh mutable dicts, the shape an ``answer`` callable receives."""
        return [dict(message) for message in self.messages]

    def to_dict(self) -> dict:
        return {
            "task": self.task, "messages": self.prompt(), "expected": self.expected,
            "bucket": self.bucket, "position": self.position, "n_buckets": self.n_buckets,
            "query": self.query, "context_tokens": self.context_tokens,
            "context_span": list(self.context_span), "target_span": list(self.target_span),
        }


@dataclass(frozen=True)
class PositionResult:
    """Scores of one probe, in percent (0-100) like the paper's Table 1.

    ``per_bucket[b]`` is the mean item score in bucket b (NaN for a bucket without items; JSON gets
    null); ``avg`` is the mean over non-empty buckets and ``gap`` their max minus min.
    """

    task: str
    per_bucket: tuple[float, ...]
    counts: tuple[int, ...]
    avg: float
    gap: float
    n: int
    bucket_scores: tuple[tuple[float, ...], ...] = ()  # each item's score (0-1) per bucket, for intervals

    @property
    def n_buckets(self) -> int:
        return len(self.per_bucket)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "per_bucket": [None if math.isnan(v) else v for v in self.per_bucket],
            "counts": list(self.counts),
            "avg": None if math.isnan(self.avg) else self.avg,
            "gap": None if math.isnan(self.gap) else self.gap,
            "n": self.n,
            **self.intervals(),
        }

    def intervals(self) -> dict:
        """95% intervals: per bucket (Wilson when items score 0 or 1, else a bootstrap of the mean) and
        of the max-min gap (items resampled within their buckets). Empty without item scores."""
        from specdsl.probes.stats import bootstrap_interval, max_min_gap, percent_interval

        if not self.bucket_scores:
            return {}
        per_bucket = []
        for scores in self.bucket_scores:
            if not scores:
                per_bucket.append(None)
            elif all(s in (0.0, 1.0) for s in scores):
                per_bucket.append(percent_interval(int(sum(scores)), len(scores)))
            else:
                per_bucket.append(bootstrap_interval([[100 * s for s in scores]], lambda g: sum(g[0]) / len(g[0])))
        filled = [[100 * s for s in scores] for scores in self.bucket_scores if scores]
        gap = bootstrap_interval(filled, max_min_gap) if len(filled) > 1 else None
        return {"per_bucket_ci95": per_bucket, "gap_ci95": gap}


def check_task(task: str) -> None:
    if task not in POSITION_TASKS:
        raise ValueError(f"unknown position task {task!r}; expected one of {', '.join(POSITION_TASKS)}")
