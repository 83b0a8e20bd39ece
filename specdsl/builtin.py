"""The built-in plugin: registers specdsl's own ops, recipes, backends, targets and probes.

It goes through the same hooks as any third-party plugin. Every module imported here is cheap; the
heavy libraries load inside the backends when they run.
"""

from __future__ import annotations

from .hookspecs import hookimpl


@hookimpl
def register_ops(register):
    from .steps.concat import ConcatOp
    from .steps.export import ExportOp
    from .steps.filter import FilterOp
    from .steps.format import FormatOp
    from .steps.generate import GenerateOp
    from .steps.map import MapOp
    from .steps.tokenize import TokenizeOp
    from .steps.train import TrainOp

    for op in (GenerateOp(), FilterOp(), MapOp(), FormatOp(), ConcatOp(), TokenizeOp(), TrainOp(), ExportOp()):
        register(op)
    from .steps import designs

    for op in designs.OPS:
        register(op)
    from .steps.evaluate import EvaluateOp

    register(EvaluateOp())


@hookimpl
def register_recipes(register):
    from .recipes import RECIPES

    for recipe in RECIPES:
        register(recipe)


@hookimpl
def register_backends(register):
    from .backends.transformers_backend import TransformersBackend

    register(TransformersBackend())
    from .backends.litellm_backend import LiteLLMBackend

    register(LiteLLMBackend())


@hookimpl
def register_training_targets(register):
    from .backends.trl_target import CpuTarget, CudaTarget

    register(CpuTarget())
    register(CudaTarget())


@hookimpl
def register_probes(register):
    from .steps.evaluate import PROBES

    for probe in PROBES:
        register(probe)


@hookimpl
def register_executors(register):
    from .execute.local import LocalExecutor

    register(LocalExecutor())
    import importlib.util

    if importlib.util.find_spec("ray") is not None:  # the optional extra specdsl[ray]; ray itself loads on use
        from .execute.ray_executor import RayExecutor

        register(RayExecutor())
