"""Position probing after IN2's VaL probing (An et al. 2024, arXiv 2404.16811, repo microsoft/FILM).

A position probe asks the same kind of question about a *target* placed at different relative positions
of a long context, and reports accuracy per position bucket. A model that uses its whole context scores
flat; a "lost in the middle" model sags in the middle buckets. The summary follows the paper's Table 1:
the average over buckets and the max-min gap between buckets.

Three tasks, one per retrieval pattern of VaL probing, all built offline and deterministically:

``document`` -- document sentence retrieval, *bi-directional*.
    The context is a run of English sentences taken from the docstrings of a fixed list of standard-library
    modules. The instruction quotes a piece (8 consecutive words) from the middle of one sentence and asks
    for the complete sentence, so the model has to read both backward and forward from the piece. Scored
    as in the paper's ``plot.py``: recall of the gold sentence's words in the answer.
``code`` -- code function retrieval, *backward*.
    The context is a run of Python functions taken from the source of a fixed list of standard-library
    modules. The instruction quotes one line of a function body and asks for the function's name, which
    stands *before* the line. Scored 1 when the name appears in the answer as a whole word.
``records`` -- structured record retrieval, *forward*.
    The context is a list of generated records ``id: ..., name: ..., label: ...``. The instruction gives
    an id and asks for the label, which stands *after* the id. Scored 1 when the label appears in the
    answer (case-insensitive).

Every target's query (piece, code line, id) occurs exactly once in its context, so each question has
exactly one right answer. Contexts are filled up to ``context_tokens`` as measured by the ``count_tokens``
callable passed in (default: :func:`approx_token_count`), and the target's *midpoint* is placed so that
its relative token position falls in the requested bucket. Everything is a pure function of the
arguments, the seed and the running Python's standard library (docstrings and sources change between
Python versions: :func:`source_fingerprint` names the material so caches can key on it).

The probe never talks to a model itself: :func:`run_position_probe` takes an ``answer(prompts) -> texts``
callable, so any generation backend (or a test oracle) can stand behind it.

The package: :mod:`.items` (tasks, template, item and result types), :mod:`.material` (the standard
library's sentences and functions), :mod:`.targets` (per-task targets and fillers), :mod:`.build`,
:mod:`.scoring` and :mod:`.report` (Table 1 rows, the plot).
"""

from __future__ import annotations

from specdsl.probes.position.build import bucket_of, build_position_probe
from specdsl.probes.position.items import (IN2_TEMPLATE, INSTRUCTIONS, MAX_CODE_QUERY_CHARS, POSITION_TASKS, AnswerFn,
                                          CountTokens, PositionResult, ProbeItem, approx_token_count)
from specdsl.probes.position.material import CODE_MODULES, DOC_MODULES, code_functions, document_sentences, source_fingerprint
from specdsl.probes.position.report import ResultsByModel, plot_position_results, results_table
from specdsl.probes.position.scoring import (combine_position_results, run_position_probe, score_answer,
                                            score_position_probe)

__all__ = [
    "AnswerFn", "CODE_MODULES", "CountTokens", "DOC_MODULES", "IN2_TEMPLATE", "INSTRUCTIONS", "MAX_CODE_QUERY_CHARS",
    "POSITION_TASKS", "PositionResult", "ProbeItem", "ResultsByModel", "approx_token_count", "bucket_of",
    "build_position_probe", "code_functions", "combine_position_results", "document_sentences",
    "plot_position_results", "results_table", "run_position_probe", "score_answer", "score_position_probe",
    "source_fingerprint",
]
