"""specdsl-textstats: an example specdsl plugin.

It provides, through the ``specdsl`` entry point ``textstats``:

* backend ``template`` -- deterministic offline answers from a Jinja2 template or a rule table;
* ops ``stats`` (length columns) and ``dedupe`` (drop repeated rows);
* recipe ``textstats.clean`` -- dedupe + stats + a word-count filter;
* probe ``answer_length`` -- how long each model's answers are.

Importing this module is cheap: the hook functions import the implementation modules when called, and
those import nothing heavier than jinja2 (and only when a method runs).
"""

from __future__ import annotations

from specdsl.contract.hookspecs import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_backends(register):
    from .backend import TemplateBackend

    register(TemplateBackend())


@hookimpl
def register_ops(register):
    from .ops import DedupeOp, StatsOp

    register(StatsOp())
    register(DedupeOp())


@hookimpl
def register_recipes(register):
    from .recipes import CleanRecipe

    register(CleanRecipe())


@hookimpl
def register_probes(register):
    from .probes import AnswerLengthProbe

    register(AnswerLengthProbe())
