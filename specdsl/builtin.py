"""The built-in plugin: registers specdsl's own ops, recipes, backends, targets and probes.

It goes through the same hooks as any third-party plugin. Every module imported here is cheap; the
heavy libraries load inside the backends when they run.
"""

from __future__ import annotations

from specdsl.contract.hookspecs import hookimpl


@hookimpl
def register_ops(register):
    from specdsl.ops.concat import ConcatOp
    from specdsl.ops.export import ExportOp
    from specdsl.ops.filter import FilterOp
    from specdsl.ops.format import FormatOp
    from specdsl.ops.generate import GenerateOp
    from specdsl.ops.map import MapOp
    from specdsl.ops.source import SourceOp
    from specdsl.ops.tokenize import TokenizeOp
    from specdsl.ops.train import TrainOp

    for op in (SourceOp(), GenerateOp(), FilterOp(), MapOp(), FormatOp(), ConcatOp(), TokenizeOp(), TrainOp(),
               ExportOp()):
        register(op)
    from specdsl.ops import designs

    for op in designs.OPS:
        register(op)
    from specdsl.ops.evaluate import EvaluateOp

    register(EvaluateOp())


@hookimpl
def register_recipes(register):
    from specdsl.recipes import RECIPES

    for recipe in RECIPES:
        register(recipe)


@hookimpl
def register_backends(register):
    from specdsl.backends.transformers.backend import TransformersBackend

    register(TransformersBackend())
    from specdsl.backends.litellm.backend import LiteLLMBackend

    register(LiteLLMBackend())


@hookimpl
def register_training_targets(register):
    from specdsl.training.trl import CpuTarget, CudaTarget

    # In order of preference: `target: auto` takes the first available target (see Services.training_target).
    register(CudaTarget())
    register(CpuTarget())


@hookimpl
def register_probes(register):
    from specdsl.ops.evaluate import PROBES

    for probe in PROBES:
        register(probe)


@hookimpl
def register_executors(register):
    from specdsl.executors.local import LocalExecutor

    register(LocalExecutor())
    import importlib.util

    if importlib.util.find_spec("ray") is not None:  # the optional extra specdsl[ray]; ray itself loads on use
        from specdsl.executors.ray import RayExecutor

        register(RayExecutor())


@hookimpl
def register_sources(register):
    from specdsl.sources.formats import SOURCES

    for source in SOURCES:
        register(source)
