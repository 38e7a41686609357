"""The ``graphopt`` command. The only place that prints errors and picks exit codes.

Exit codes: 0 ok, 1 verification failed, 2 bad input or usage, 3 backend unavailable,
4 a pass failed, 5 internal error (a bug in graphopt: please report it with --debug).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

EXIT_INTERNAL = 5


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _shapes(values: Sequence[str]) -> list[tuple[int, ...]] | None:
    if not values:
        return None
    from graphopt.capture import parse_shape

    return [parse_shape(v) for v in values]


def _tolerance_options(fn: Any) -> Any:
    for name, help_text in reversed(
        [
            ("max-abs-err", "fail if max |compiled − original| exceeds this"),
            ("max-rel-err", "fail if max error / max |original| exceeds this"),
            ("min-cosine", "fail if cosine similarity falls below this"),
            ("min-sqnr-db", "fail if SQNR (dB) falls below this"),
            ("min-top1", "fail if top-1 agreement falls below this (0..1)"),
        ]
    ):
        fn = click.option(f"--{name}", type=float, default=None, help=help_text + " (default: per precision)")(fn)
    return fn


def _tolerance(precision: str, kw: dict[str, Any], *, none_if_default: bool = False) -> Any:
    """The precision's default tolerance with the flags' overrides (None: no flag given, if asked)."""
    from graphopt.verify import default_tolerance

    overrides = {k: kw.pop(k) for k in ("max_abs_err", "max_rel_err", "min_cosine", "min_sqnr_db", "min_top1")}
    if none_if_default and all(v is None for v in overrides.values()):
        return None
    return default_tolerance(precision).with_overrides(**overrides)


_BACKEND = "backend__"  # python name prefix of the options the backends declare


def _plugins_in(args: Sequence[str]) -> list[str]:
    """The ``--plugin`` values on a command line (before click parses it)."""
    found = [v.split("=", 1)[1] for v in args if v.startswith("--plugin=")]
    found += [args[i + 1] for i, v in enumerate(args[:-1]) if v == "--plugin"]
    return found


class _CompileCommand(click.Command):
    """``compile``, with one option per option the registered backends declare (``--plugin`` ones included)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from graphopt.compiler import host_with
        from graphopt.errors import PluginError
        from graphopt.targets import options_of

        own = [p for p in self.params if not p.name or not p.name.startswith(_BACKEND)]
        taken = {o for p in own for o in p.opts}
        declared: dict[str, tuple[Any, list[str]]] = {}
        for t in host_with(_plugins_in(args)).targets:
            for option in options_of(t.backend):
                if option.flag in taken:
                    raise PluginError(f"target '{t.name}' declares backend option {option.flag}, which compile already has")
                declared.setdefault(option.name, (option, []))[1].append(t.name)
        self.params = own + [
            click.Option([o.flag, _BACKEND + name], default=None, help=f"{o.help} ({', '.join(targets)})",
                         **({"is_flag": True, "flag_value": True} if o.is_flag else {"metavar": o.type_text()}))
            for name, (o, targets) in declared.items()
        ]
        return super().parse_args(ctx, args)


class _Stages:
    """Progress on stderr (only on a terminal): the current stage, with a bar for counted steps."""

    def __init__(self, quiet: bool) -> None:
        self.progress = None
        if not quiet and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=_console(stderr=True), transient=True)
            self.task = self.progress.add_task("starting", total=None)
            self.progress.start()

    def __call__(self, stage: str, done: int | None = None, total: int | None = None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=stage, completed=done or 0, total=total)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphopt")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def cli(debug: bool) -> None:
    """graphopt: compile trained models, and prove they still compute what they did."""


@cli.command("compile", cls=_CompileCommand)
@click.argument("source", required=False)
@click.option("--model", "model_opt", metavar="SOURCE", help="The model source, if not given as the argument (pkg.module:factory).")
@click.option("-t", "--target", default="cpu-fp32", show_default=True, help="Target name (see `graphopt targets`).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "int8"]), default=None,
              help="With --target cpu: compile every CPU target of this precision, keep the fastest verified one [default: fp32].")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output folder [default: NAME.TARGET].")
@click.option("--force", is_flag=True, help="Replace the output folder if it holds a graphopt artifact (and nothing else).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="1x3x224x224", help="Shape of an input; repeat for several inputs.")
@click.option("--pipeline", help="Pass pipeline text, e.g. 'fuse-conv-bn-relu,dce' [default: the target's].")
@click.option("--verify-each", is_flag=True, help="Check every pass against its numerical contract.")
@click.option("--print-ir-after", multiple=True, metavar="PASS|all", help="Print the graph after a pass (repeatable).")
@click.option("--plugin", "plugins", multiple=True, metavar="FILE_OR_MODULE", help="Load passes/targets from a plugin.")
@click.option("--calib-data", metavar="FILE|DIR|PKG:FN",
              help="Real inputs: a .npy/.npz file, a folder of images or pkg.module:function yielding batches. "
                   "The first --calib-samples calibrate int8 and feed --recover-steps; verification uses the next ones.")
@click.option("--calib-samples", default=32, show_default=True, type=click.IntRange(min=1), help="Calibration samples (batches).")
@click.option("--calib-size", metavar="HxW", help="Resize images from a --calib-data folder to this size [default: the input's].")
@click.option("--calib-normalize", type=click.Choice(["none", "imagenet", "unit"]), default="none", show_default=True,
              help="Normalization of images from a --calib-data folder (pixels in [0,1] first).")
@click.option("--keep-fp32", "keep_fp32", multiple=True, metavar="NAMES|auto|none",
              help="Layers (module path or node name, comma-separated) to keep in fp32 in an int8 target; "
                   "'auto' (the default) keeps the most sensitive ones when full int8 misses the tolerance on the "
                   "calibration inputs; 'none': every layer int8.")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="Intra-op threads the artifact runs with, for every target that runs on the CPU; recorded in the "
                   "manifest [default: the cores this process may use]")
@click.option("--recover-steps", default=0, show_default=True, type=int,
              help="Distillation steps against the original after the passes (before quantization).")
@click.option("--recover-lr", default=1e-2, show_default=True, type=float, help="Peak learning rate for --recover-steps.")
@click.option("--recover-every", is_flag=True,
              help="Recover after every approximate structural pass (iterative pruning: prune, recover, k times).")
@click.option("--qat-steps", default=0, show_default=True, type=int,
              help="Quantization-aware fine-tuning steps after insert-quant-stubs (int8 targets).")
@click.option("--qat-lr", default=1e-4, show_default=True, type=float, help="Peak learning rate for --qat-steps.")
@click.option("--train-data", metavar="FILE|DIR|PKG:FN",
              help="Inputs for --recover-steps/--qat-steps (the --calib-data formats; a .npz may add 'labels'). "
                   "Default: the calibration samples.")
@click.option("--verify-samples", default=8, show_default=True, type=click.IntRange(min=1), help="Number of verification inputs.")
@click.option("--seed", default=0, show_default=True, help="Seed for random inputs.")
@click.option("--weights", type=click.Path(path_type=Path), help="A state_dict file to load into the model a factory builds.")
@click.option("--trust-pickle", is_flag=True, help="Allow unpickling a .pt that holds a whole nn.Module (runs code from the file).")
@click.option("--no-latency", is_flag=True, help="Skip the latency measurement.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@_tolerance_options
def compile_cmd(source: str | None, model_opt: str | None, target: str, precision: str | None, output: Path | None, force: bool,
                input_shapes: tuple[str, ...], pipeline: str | None, verify_each: bool,
                print_ir_after: tuple[str, ...], plugins: tuple[str, ...], calib_data: str | None,
                calib_samples: int, calib_size: str | None, calib_normalize: str, keep_fp32: tuple[str, ...],
                threads: int | None, recover_steps: int, recover_lr: float, recover_every: bool, qat_steps: int, qat_lr: float,
                train_data: str | None, verify_samples: int, seed: int,
                weights: Path | None, trust_pickle: bool, no_latency: bool, as_json: bool, quiet: bool,
                **kw: Any) -> None:
    """Compile SOURCE (zoo:NAME, pkg.module:factory, model.pt2, model.pt) for a target.

    The options the targets' backends declare (see `graphopt targets`) are listed last.
    """
    from graphopt.compiler import CompileOptions, default_output_dir, host_with
    from graphopt.compiler import compile as do_compile
    from graphopt.errors import UsageError

    if source and model_opt:
        raise UsageError("give the model either as the SOURCE argument or with --model, not both")
    source = source or model_opt
    if not source:
        raise UsageError("missing SOURCE: zoo:NAME, pkg.module:factory, model.pt2 or model.pt (see graphopt compile --help)")
    backend_options = {k[len(_BACKEND):]: kw.pop(k) for k in list(kw) if k.startswith(_BACKEND)}
    from graphopt.autotarget import compile_best, family_precision, render_candidates

    family = family_precision(target, precision)  # --target cpu / cpu-int8-any: every CPU target of a precision
    target_precision = family or host_with(plugins).targets.get(target).precision
    out = output or default_output_dir(source, target)
    stages = _Stages(quiet or as_json)
    options = CompileOptions(
        target=target, input_shapes=_shapes(input_shapes), pipeline=pipeline, output=out, force=force,
        verify_each=verify_each, data=calib_data, verify_samples=verify_samples, calib_samples=calib_samples,
        calib_size=calib_size, calib_normalize=calib_normalize, keep_fp32=keep_fp32,
        backend_options={k: v for k, v in backend_options.items() if v is not None}, threads=threads,
        recover_steps=recover_steps, recover_lr=recover_lr, recover_every=recover_every, qat_steps=qat_steps, qat_lr=qat_lr,
        train_data=train_data, seed=seed, tolerance=_tolerance(target_precision, kw, none_if_default=True), plugins=plugins,
        weights=weights, trust_pickle=trust_pickle, print_ir_after=print_ir_after, measure=not no_latency, on_stage=stages,
    )
    rows = None
    try:
        if family:
            result, rows = compile_best(source, options, family)
        else:
            result = do_compile(source, options)
    except Exception as exc:
        stages.stop()
        report = getattr(exc, "report", None)
        if report is not None and not quiet:
            report.render(_console(stderr=True))
        raise
    stages.stop()
    if as_json:
        click.echo(json.dumps(result.report.to_json(), indent=2))
    elif not quiet:
        console = _console()
        result.report.render(console)
        if rows is not None:
            render_candidates(console, rows)
        console.print(f"wrote {out}/" + (f" ({result.report.target}, the fastest verified candidate)" if rows else ""))


def _duration(text: str | None) -> float | None:
    """``20m``, ``90s``, ``1.5h`` or plain seconds -> seconds."""
    from graphopt.errors import UsageError

    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    value, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(value) * units[unit]
    except ValueError:
        raise UsageError(f"--time-budget '{text}': give a duration such as 20m, 90s or 1.5h") from None
    if not seconds > 0:
        raise UsageError(f"--time-budget '{text}' must be > 0")
    return seconds


@cli.command("tune")
@click.argument("source")
@click.option("-t", "--target", "targets", required=True, metavar="T[,T...]",
              help="Target(s); several (comma-separated) make the target a searched dimension.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Study folder: study.db, tune.json, report.html, pareto_*.png, best/.")
@click.option("--eval", "eval_fn", metavar="PKG.MODULE:FN",
              help="fn(model) -> float, higher is better (your validation accuracy). Default: top-1 agreement with the original.")
@click.option("--max-drop", default=1.0, show_default=True, type=float, help="Largest score drop below the original's for 'best'.")
@click.option("--trials", default=30, show_default=True, type=int, help="Trials the study holds when done (a resume runs the rest).")
@click.option("--time-budget", metavar="20m", help="Start no trial after this long (s, m or h).")
@click.option("--search", default="prune,substitute,quant,recover", show_default=True,
              help="Search space: parts prune, substitute, quant, recover, each with optional {dim=lo..hi|[a,b]|value}.")
@click.option("--objective", type=click.Choice(["latency", "size", "macs"]), default="macs", show_default=True,
              help="The cost minimized next to the score.")
@click.option("--sampler", type=click.Choice(["tpe", "nsga2"]), default="tpe", show_default=True, help="Optuna sampler.")
@click.option("--resume", is_flag=True, help="Continue the study in OUT (after Ctrl-C or a crash).")
@click.option("--storage", metavar="URL", help="An Optuna RDB storage URL (PostgreSQL, MySQL, SQLite) shared by several workers.")
@click.option("--trial-timeout", default=900.0, show_default=True, type=float, help="Seconds before a trial's process is killed.")
@click.option("--calib-data", metavar="FILE|DIR|PKG:FN", help="Calibration and verification inputs (as for compile).")
@click.option("--train-data", metavar="FILE|DIR|PKG:FN", help="Recovery/QAT inputs (as for compile; .npz may add 'labels').")
@click.option("--calib-samples", default=32, show_default=True, type=click.IntRange(min=1), help="Calibration samples.")
@click.option("--verify-samples", default=64, show_default=True, type=click.IntRange(min=1), help="Verification inputs per trial.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="1x3x224x224", help="Shape of an input; repeat for several.")
@click.option("--plugin", "plugins", multiple=True, metavar="FILE_OR_MODULE", help="Load passes/targets from a plugin.")
@click.option("--weights", type=click.Path(path_type=Path), help="A state_dict file to load into the model a factory builds.")
@click.option("--seed", default=0, show_default=True, help="Seed of the sampler and of every trial.")
@click.option("--no-latency", is_flag=True, help="Skip latency measurements (not with --objective latency).")
def tune_cmd(source: str, targets: str, output: Path, eval_fn: str | None, max_drop: float, trials: int, time_budget: str | None,
             search: str, objective: str, sampler: str, resume: bool, storage: str | None, trial_timeout: float,
             calib_data: str | None, train_data: str | None, calib_samples: int, verify_samples: int,
             input_shapes: tuple[str, ...], plugins: tuple[str, ...], weights: Path | None, seed: int, no_latency: bool) -> None:
    """Search pipelines and options of SOURCE for the best score/cost trade-off (an Optuna study of compiles)."""
    from graphopt.errors import UsageError
    from graphopt.tune import TuneSettings, tune

    if no_latency and objective == "latency":
        raise UsageError("--no-latency cannot go with --objective latency")
    shared: dict[str, Any] = {"data": calib_data, "train_data": train_data, "calib_samples": calib_samples,
                              "verify_samples": verify_samples, "input_shapes": _shapes(input_shapes), "seed": seed,
                              "plugins": list(plugins), "weights": str(weights) if weights else None, "measure": not no_latency}
    settings = TuneSettings(source=source, targets=targets.split(","), output=output, search=search, eval=eval_fn,
                            max_drop=max_drop, trials=trials, time_budget_s=_duration(time_budget), objective=objective,
                            resume=resume, storage=storage, sampler=sampler, seed=seed, trial_timeout_s=trial_timeout,
                            compile={k: v for k, v in shared.items() if v not in (None, [])})
    console = _console()
    if train_data is None and (calib_data is None):
        console.print("[bold red]WARNING: no --train-data or --calib-data: recovery and QAT would train on RANDOM data, "
                      "and int8 would calibrate on it[/]")

    def on_trial(row: dict[str, Any]) -> None:
        score = f"score {row['score']:.2f}" if "score" in row else row.get("error") or ""
        console.print(f"trial {row['number']}: {row.get('status')} {score}")

    try:
        result = tune(settings, on_trial=on_trial)
    except KeyboardInterrupt:
        console.print(f"interrupted: {output}/ keeps every finished trial (and its reports); rerun with --resume to go on")
        raise
    from graphopt.tune.report import render_table

    summary = result.summary
    render_table(console, result.rows, objective, summary["baseline"], summary["metric"])
    if summary["note"]:
        console.print(f"[bold]{summary['note']}[/]")
    console.print(f"wrote {output}/tune.json, {output}/report.html and the plots")
    if result.best is None:
        console.print(f"no trial stayed within --max-drop {max_drop:g} of the original ({summary['baseline']:.2f})")
        return
    console.print(f"best within --max-drop {max_drop:g}: trial #{result.best['number']}, compiled into {result.best_output}/")
    console.print(f"pipeline: {result.best['pipeline']}")
    console.print(f"rerun it with: {result.best['command']}")


@cli.command("passes")
@click.option("--plugin", "plugins", multiple=True, metavar="FILE_OR_MODULE", help="Load passes from a plugin.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def passes_cmd(plugins: tuple[str, ...], as_json: bool) -> None:
    """List the registered passes: name, contract, doc, options."""
    from rich.table import Table

    from graphopt.compiler import host_with

    host = host_with(plugins)
    rows = []
    for spec in host.passes:
        opts = [{"name": o.text_name, "type": o.type_text(), "default": _plain(o.default)} for o in spec.options.values()]
        rows.append({"name": spec.name, "contract": spec.contract, "doc": spec.doc, "options": opts, "from": host.passes.origin(spec.name)})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table()
    for col in ("pass", "contract", "description", "options"):
        table.add_column(col)
    for r in rows:
        opts = "\n".join(f"{o['name']}: {o['type']} = {o['default']}" for o in r["options"]) or "–"
        table.add_row(r["name"], r["contract"], r["doc"], opts)
    _console().print(table)


def _plain(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)


@cli.command("targets")
@click.option("--plugin", "plugins", multiple=True, metavar="FILE_OR_MODULE", help="Load targets from a plugin.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def targets_cmd(plugins: tuple[str, ...], as_json: bool) -> None:
    """List the targets: backend, precision, default pipeline, available here or why not."""
    from rich.table import Table

    from graphopt.compiler import host_with
    from graphopt.targets import options_of
    from graphopt.threads import THREADS_OPTION, uses_threads

    host = host_with(plugins)
    rows = []
    for t in host.targets:
        reason = t.backend.unavailable_reason()
        options = [THREADS_OPTION] * uses_threads(t.backend) + list(options_of(t.backend))
        rows.append({"name": t.name, "backend": t.backend.name, "precision": t.precision, "pipeline": t.pipeline,
                     "options": [o.to_json() for o in options], "available": reason is None, "why_not": reason,
                     "doc": t.doc})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.markup import escape

    table = Table()
    for col in ("target", "backend", "precision", "default pipeline", "options", "available here"):
        table.add_column(col)
    for r in rows:
        opts = "\n".join(f"{o['flag']} {o['type']}" for o in r["options"]) or "–"
        available = "yes" if r["available"] else f"no: {r['why_not']}"
        # plain text, not markup: an install hint such as pip install 'graphopt[tensorrt]' keeps its brackets
        table.add_row(*(escape(c) for c in (r["name"], r["backend"], r["precision"], r["pipeline"], opts, available)))
    _console().print(table)


@cli.command("profile")
@click.argument("source")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="1x3x224x224", help="Shape of an input; repeat for several inputs.")
@click.option("--runs", default=10, show_default=True, type=click.IntRange(min=1), help="Timed runs (the median is shown).")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0), help="Untimed runs first.")
@click.option("--top", type=click.IntRange(min=1), help="Show only the N slowest nodes.")
@click.option("--pipeline", help="Run these passes first (e.g. 'fuse-conv-bn-relu,dce') and profile the result.")
@click.option("--plugin", "plugins", multiple=True, metavar="FILE_OR_MODULE", help="Load passes from a plugin.")
@click.option("--weights", type=click.Path(path_type=Path), help="A state_dict file to load into the model a factory builds.")
@click.option("--trust-pickle", is_flag=True, help="Allow unpickling a .pt that holds a whole nn.Module.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def profile_cmd(source: str, input_shapes: tuple[str, ...], runs: int, warmup: int, top: int | None, pipeline: str | None,
                plugins: tuple[str, ...], weights: Path | None, trust_pickle: bool, as_json: bool) -> None:
    """Per-node latency, MACs and params of SOURCE, slowest first: where the time goes."""
    from graphopt.capture import capture
    from graphopt.compiler import host_with
    from graphopt.pipeline import PassManager, parse_pipeline
    from graphopt.profile import profile_program

    program = capture(source, input_shapes=_shapes(input_shapes), weights=weights, trust_pickle=trust_pickle)
    if pipeline:
        PassManager(parse_pipeline(pipeline, host_with(plugins).passes)).run(program)
    result = profile_program(program, runs=runs, warmup=warmup)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        result.render(_console(), top=top)


@cli.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--golden", type=click.Path(path_type=Path),
              help="Golden file from `graphopt golden record` [default: the artifact's own goldens.npz, where it has one].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_tolerance_options
def verify_cmd(artifact: Path, golden: Path | None, as_json: bool, **tol: Any) -> None:
    """Check a compiled ARTIFACT folder against a golden file's recorded outputs.

    A TensorRT artifact made with --defer-engine carries its goldens: on a GPU machine this
    builds its engine (cached beside it once it matches them) and checks it.
    """
    from graphopt.compiler import load_artifact, run_all
    from graphopt.errors import DataError, UsageError, VerificationError
    from graphopt.report import Verification
    from graphopt.verify import GOLDENS_FILE, check_golden_fits, compare, load_golden

    if golden is None:
        golden = artifact / GOLDENS_FILE
        if not golden.is_file():
            raise UsageError(f"'{artifact}' holds no {GOLDENS_FILE}: give --golden (a file from `graphopt golden record`)")
    art = load_artifact(artifact)
    gold = load_golden(golden)
    tolerance = _tolerance(art.precision, tol)
    check_golden_fits(gold, art.input_specs, f"golden '{golden}'", f"'{artifact}'")
    try:
        comparison = compare(gold.outputs, run_all(art.run, gold.inputs))
    except ValueError as exc:
        raise DataError(f"golden '{golden}' does not match '{artifact}': {exc}") from None
    bad = tolerance.violations(comparison.metrics)
    result = Verification(not bad, comparison.metrics, tolerance, len(gold.inputs), bad, comparison)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        m = comparison.metrics
        runtime = getattr(art, "runtime", None)
        where = f"{artifact} on {runtime}" if runtime else f"{artifact}"
        _console().print(
            f"{where} vs {golden} ({len(gold.inputs)} inputs): max_abs_err {m.max_abs_err:.3g}, "
            f"max_rel_err {m.max_rel_err:.3g}, cosine {m.cosine:.6f}, sqnr {m.sqnr_db:.1f} dB"
        )
    if bad:
        raise VerificationError(f"'{artifact}' does not match golden '{golden}': {'; '.join(bad)}")


@cli.group("golden")
def golden_group() -> None:
    """Record golden inputs and outputs of a model."""


@golden_group.command("record")
@click.argument("source")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Golden file to write (.npz).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="1x3x224x224")
@click.option("--samples", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True)
@click.option("--calib-data", type=click.Path(path_type=Path), help="Use these inputs (.npz/.npy) instead of random ones.")
@click.option("--weights", type=click.Path(path_type=Path))
@click.option("--trust-pickle", is_flag=True)
@click.option("--force", is_flag=True, help="Replace the golden file if it exists.")
def golden_record_cmd(source: str, output: Path, input_shapes: tuple[str, ...], samples: int, seed: int,
                      calib_data: Path | None, weights: Path | None, trust_pickle: bool, force: bool) -> None:
    """Run SOURCE on fixed inputs and save inputs + outputs to a golden file."""
    from graphopt.capture import capture
    from graphopt.compiler import run_all
    from graphopt.data import samples_for
    from graphopt.errors import UsageError
    from graphopt.verify import check_finite, save_golden

    if output.exists() and not force:
        raise UsageError(f"golden file '{output}' already exists; pass --force to replace it")
    if output.suffix != ".npz":
        raise UsageError(f"golden file '{output}' must end in .npz")
    if not output.parent.is_dir():
        raise UsageError(f"-o '{output}': folder '{output.parent}' does not exist")
    program = capture(source, input_shapes=_shapes(input_shapes), weights=weights, trust_pickle=trust_pickle)
    inputs = samples_for(program.input_specs, n=samples, seed=seed, path=calib_data)
    outputs = run_all(program.run_reference, inputs)
    check_finite(outputs)
    save_golden(output, inputs, outputs, {"source": source, "seed": seed})
    _console().print(f"wrote {output} ({len(inputs)} inputs)")


def _one_line(text: str) -> str:
    """The first line of a message; a longer one says where the rest is."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} (… more with --debug)"


def _click_error(exc: click.ClickException) -> str:
    """click's own usage errors (bad option value, unknown option, missing argument) as one line."""
    message = " ".join(ln.strip() for ln in exc.format_message().splitlines() if ln.strip()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"graphopt: usage error: {message}{hint}"


def _split_debug(args: list[str]) -> tuple[list[str], bool]:
    """Remove ``--debug`` wherever it is (before a ``--``): it is accepted after the subcommand too."""
    end = args.index("--") if "--" in args else len(args)
    kept = [a for a in args[:end] if a != "--debug"] + args[end:]
    return kept, len(kept) != len(args)


def _exit_site(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the CLI, turn errors into one line on stderr and an exit code.

    Every error is one line unless ``--debug`` (anywhere on the command line) asks for the traceback.
    """
    args, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    if not debug:  # libraries' log warnings (torch logs tracebacks before re-raising) would break the one line
        logging.disable(logging.WARNING)
    try:
        cli.main(args=args, prog_name="graphopt", standalone_mode=False)
    except click.exceptions.Abort as exc:  # click turns KeyboardInterrupt (and our Terminated) into Abort
        from graphopt.errors import Terminated

        if isinstance(exc.__cause__, Terminated):
            name = signal.Signals(exc.__cause__.signum).name
            click.echo(f"graphopt: terminated by {name}; nothing was written", err=True)
            return 128 + exc.__cause__.signum
        click.echo("aborted", err=True)
        return 130
    except click.exceptions.NoArgsIsHelpError as exc:  # `graphopt` alone: the help text
        exc.show()
        return 2
    except click.ClickException as exc:  # usage errors from click itself
        click.echo(_click_error(exc), err=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:  # a plugin, factory or data source called sys.exit: it may not end graphopt silently
        if debug:
            traceback.print_exc()
        click.echo(f"graphopt: error: sys.exit({exc.code!r}) was called{_exit_site(exc)} while graphopt was running; "
                   "code graphopt runs must raise an exception instead (nothing was written)", err=True)
        return 2
    except Exception as exc:
        from graphopt.errors import GraphoptError

        if debug:
            traceback.print_exc()
        if isinstance(exc, GraphoptError):
            click.echo(f"graphopt: {exc.kind}: {_one_line(str(exc))}", err=True)
            return exc.exit_code
        click.echo(f"graphopt: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
                   "(run with --debug for the traceback)", err=True)
        return EXIT_INTERNAL
    finally:
        logging.disable(logging.NOTSET)
    return 0


if __name__ == "__main__":
    sys.exit(main())
