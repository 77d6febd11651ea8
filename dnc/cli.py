"""The `dnc` command line. Every DncError becomes one line on stderr and exit 2.

Heavy imports (torch, onnx, rich) happen inside the commands that need them, so
that `dnc validate` and `dnc summary` stay fast.

Exit codes: 0 success, 1 a difference or failed check (diff, verify, compile
--check), 2 a user's mistake (one line on stderr), 3 a bug in dnc, 130 interrupted,
141 the reader of stdout went away. Every line printed that carries text from
outside (a path, a key, a revision) goes through `text.echoed`, so one error is
one line, no spec can forge a line or send a terminal escape, and no argument floods a log.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import sys
import warnings
from pathlib import Path

import click

from dnc import __version__
from dnc.errors import DncError, DncWarning
from dnc.ir.limits import Limits
from dnc.pipeline import build  # every command loads specs: networkx, pydantic, ruamel
from dnc.targets import TARGETS
from dnc.text import echoed

TARGET_NAMES = list(TARGETS)

EXIT_ERROR = 2
EXIT_BUG = 3
EXIT_PIPE = 141  # 128 + SIGPIPE, as a shell reports a writer killed by a closed pipe
MAX_BATCH = 10**9  # --batch: far beyond any device, and every figure of the estimate stays a finite float

spec_args = click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
spec_arg = click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="PATH=VALUE",
    help="Override a spec field, e.g. --set growth_rate=48 --set blocks.2.layers=32 (repeatable).",
)


force_option = click.option(
    "--force", is_flag=True, help="Replace an existing file that dnc did not write (dnc replaces only its own)."
)


def build_options(command):
    """--limit and --spec-root, handed to the command as one `policy` of keyword arguments for `build`."""

    @click.option(
        "--limit",
        "limit_texts",
        multiple=True,
        metavar="NAME=N",
        help="Raise a network limit, e.g. --limit layers_per_block=1024 (repeatable; see README, Security).",
    )
    @click.option(
        "--spec-root",
        "spec_roots",
        multiple=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Another folder `extends:` may read from [default: the spec's git work tree, or its folder].",
    )
    @functools.wraps(command)
    def wrapper(*args, limit_texts, spec_roots, **kwargs):
        try:
            limits = Limits().raised(limit_texts)
        except DncError as err:
            fail(err)
        return command(*args, policy={"limits": limits, "roots": spec_roots}, **kwargs)

    return wrapper


def pass_options(command):
    """-O LEVEL, --pass NAME, --no-pass NAME: which optimisation passes run (see `dnc passes`)."""
    command = click.option(
        "--no-pass", "no_pass", multiple=True, metavar="NAME[,NAME]", help="Skip these passes (see dnc passes)."
    )(command)
    command = click.option(
        "--pass", "pass_", multiple=True, metavar="NAME[,NAME]", help="Also run these passes, whatever the level."
    )(command)
    return click.option(
        "-O",
        "--opt-level",
        "opt_level",
        type=click.IntRange(0, 2),
        default=None,
        help="Optimisation level: 0 none, 1 passes that keep training, 2 eval-only ones too "
        "[default: torch 0, onnx 2].",
    )(command)


def _pass_settings(t, opt_level, pass_, no_pass) -> dict:
    """The pass options as a compile records them: only what differs from the target's default."""
    out = {}
    if opt_level is not None and opt_level != t.default_level:
        out["opt_level"] = opt_level
    for key, names in (("pass", pass_), ("no_pass", no_pass)):
        if names:
            out[key] = ",".join(sorted({w.strip() for text in names for w in text.split(",") if w.strip()}))
    return out


def _passes(t, settings: dict) -> list:
    """The passes a compile with these settings runs (`_pass_settings`, or a generated file's record).

    A record is read back from a file anyone can edit: settings no compile writes are refused.
    """
    from dnc.ir.passes import select

    _check_settings(t, settings)
    level = settings.get("opt_level", t.default_level)
    on, off = ([w for w in settings.get(k, "").split(",") if w] for k in ("pass", "no_pass"))
    both = sorted(set(on) & set(off))
    if both:
        raise DncError(f"--pass {both[0]} and --no-pass {both[0]} contradict each other: give one")
    return select(t.name, level, on, off)


def _check_settings(t, settings: dict) -> None:
    """Refuse a setting that `dnc compile` does not take, or a value of another type or below its least."""
    types = {"opt_level": (int, None), "pass": (str, None), "no_pass": (str, None)}
    types |= {o.name: (str if o.type is Path else o.type, o.minimum) for o in t.options}
    for key, value in settings.items():
        if key not in types:
            raise DncError(f"{key}: not an option of --target {t.name}")
        kind, least = types[key]
        # a string (or a path given on the command line), or exactly an int: a record's true, 1.5 or 1e999 is not one
        ok = isinstance(value, str | Path) if kind is str else type(value) is kind and (least is None or value >= least)
        if not ok:
            expected = "a string" if kind is str else "an integer"
            expected += f" of at least {least}" if least is not None else ""
            raise DncError(f"{key}: expected {expected}, got {json.dumps(value)[:40]}")


def _option_type(opt):
    if opt.type is Path:
        return click.Path(dir_okay=False, path_type=Path)
    return click.IntRange(min=opt.minimum) if opt.minimum is not None else opt.type


def target_options(command):
    """Add every registered target's own options to `command` (each refused for the other targets)."""
    from dnc.targets import all_options

    for name, (opt, owners) in reversed(all_options().items()):
        command = click.option(
            f"--{name}",
            type=_option_type(opt),
            default=None,
            metavar=opt.metavar,
            help=f"{', '.join(owners)}: {opt.help}",
        )(command)
    return command


def report_errors(command):
    """Turn DncError into `file:line:col: error: message` and exit 2; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default", DncWarning)
                if not os.environ.get("DNC_DEBUG"):  # torch's and ruamel's warnings are not the user's business
                    warnings.filterwarnings("ignore", module=r"(?!dnc)")
                warnings.showwarning = _show_warning
                return command(*args, **kwargs)
        except DncError as err:
            fail(err)
        except KeyboardInterrupt:
            sys.exit(130)
        except BrokenPipeError:
            closed_pipe()
        except Exception as err:  # a bug in dnc: one line, the traceback on request
            if os.environ.get("DNC_DEBUG"):
                raise
            say(f"dnc: internal error: {type(err).__name__}: {err} (set DNC_DEBUG=1 for a traceback)", err=True)
            sys.exit(EXIT_BUG)

    return wrapper


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if isinstance(message, DncWarning):
        where = f"{message.location}: " if message.location else "dnc: "
        say(f"{where}warning: {message.message}", err=True)
    else:  # only with DNC_DEBUG: a library's warning, on one line
        say(f"dnc: note: {category.__name__}: {str(message).strip().splitlines()[0] if str(message) else ''}", err=True)


def say(line: str, err: bool = False) -> None:
    """Echo one line of text that may carry outside text: controls, newlines and bidi marks shown escaped, cut short."""
    click.echo(echoed(line), err=err)


def closed_pipe() -> None:
    """The reader of stdout went away (`dnc resolve spec | head -c1`): stop quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's final flush must not raise again
    except (OSError, ValueError):
        pass
    sys.exit(EXIT_PIPE)


def error_line(err: DncError) -> str:
    """`file:line:col: error: message`, on one line whatever the path and message hold."""
    line = f"{err.location}: error: {err.message}" if err.location else f"dnc: error: {err.message}"
    return echoed(line)


MAX_ERRORS = 20  # lines of errors shown for one spec; then "… and N more"


def error_lines(err: DncError) -> list[str]:
    """One line per error (a spec can have several), at most MAX_ERRORS of them and a count of the rest."""
    errors = getattr(err, "errors", None) or [err]
    lines = [error_line(e) for e in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        lines.append(f"… and {len(errors) - MAX_ERRORS} more errors")
    return lines


def fail(err: DncError) -> None:
    click.echo("\n".join(error_lines(err)), err=True)
    sys.exit(EXIT_ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dnc")
@click.pass_context
def main(ctx: click.Context):
    """dnc: compile declarative DenseNet specs to PyTorch and ONNX."""
    # NOTE: the imports above are long-lived; without this, each GC pass rescans them
    # while the IR is built, which costs more than building it.
    gc.freeze()
    if ctx.invoked_subcommand != "verify" and gc.isenabled():
        # the IR makes no reference cycles: the collector would only rescan what the pipeline pauses it for
        # (pipeline.cycle_collector_paused) once it resumes; `verify` runs models, and keeps it
        gc.disable()
        ctx.call_on_close(gc.enable)  # the command may run in a longer process (click's test runner)


@main.command()
@spec_args
@set_option
@build_options
@report_errors
def validate(specs, overrides, policy):
    """Check specs: load, validate and infer every shape. Exit 0 if all are valid, 2 if not."""
    failed = 0
    for path in specs:
        try:
            spec, _ = build(path, overrides, **policy)
        except DncError as err:
            click.echo("\n".join(error_lines(err)), err=True)
            failed += 1
        else:
            say(f"{path}: ok ({spec.name})")
    sys.exit(EXIT_ERROR if failed else 0)


@main.command()
@spec_arg
@set_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--target", default="torch", show_default=True, help="The target whose passes run (MACs after them).")
@click.option(
    "--batch",
    type=click.IntRange(1, MAX_BATCH),
    default=None,
    help="Also estimate the memory a float32 training step with this batch size takes (no torch needed).",
)
@pass_options
@build_options
@report_errors
def summary(spec, overrides, fmt, target, batch, opt_level, pass_, no_pass, policy):
    """Per-stage output shape, channels, parameters and MACs, with totals."""
    from dnc.ir.graph import inference_only
    from dnc.reports.memory import training_memory
    from dnc.reports.summary import summarize
    from dnc.targets import target as find_target

    t = find_target(target)
    settings = _pass_settings(t, opt_level, pass_, no_pass)
    _, graph = build(spec, overrides, passes=_passes(t, settings), **policy)
    result = summarize(graph)
    if batch and inference_only(graph):
        by = graph.graph.get("inference_only_by", "")
        raise DncError(
            f"--batch estimates training memory, but pass {by} makes the network inference-only "
            f"(it is exact in eval mode only): run only passes that keep training (-O0 or -O1, without --pass {by})"
        )
    memory = training_memory(graph, batch) if batch else None
    if fmt == "json":
        data = result.to_json()
        if memory:
            data["training_memory"] = memory.to_json()
        click.echo(json.dumps(data, indent=2))
        return
    from dnc.reports.render import memory_table, summary_table

    summary_table(result, _level_label(opt_level, settings))
    if memory:
        memory_table(memory)


def _level_label(opt_level: int | None, settings: dict) -> str:
    """What the passes given on the command line were, for a title: `-O2`, `-O0 --pass fold_conv_bn`."""
    words = [f"-O{opt_level}"] if opt_level is not None else []
    return " ".join(words + [f"--{k.replace('_', '-')} {settings[k]}" for k in ("pass", "no_pass") if k in settings])


@main.command()
@spec_arg
@set_option
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
@build_options
@report_errors
def resolve(spec, overrides, fmt, policy):
    """Print the fully resolved spec: extends merged, overrides applied, defaults written out."""
    from dnc.frontend.loader import load_spec, resolved_data

    data = resolved_data(load_spec(spec, overrides, policy["roots"]))
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
        return
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = None
    yaml.sort_base_mapping_type_on_output = False
    yaml.dump(data, sys.stdout)


SPECS_DIR = Path("specs")


@main.command("compile")
@click.argument("specs", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", default="torch", show_default=True, help=f"One of: {', '.join(TARGET_NAMES)}.")
@click.option(
    "-o",
    "--out-dir",
    type=click.Path(path_type=Path),
    help="Output folder [torch: generated/, onnx: build/onnx/]; for one spec, a path ending in .py or .onnx "
    "is the file.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Write nothing; exit 1 naming each output that is missing or stale (judged by the options recorded in it).",
)
@force_option
@target_options
@pass_options
@set_option
@build_options
@report_errors
def compile_(specs, target, out_dir, check, force, overrides, policy, opt_level, pass_, no_pass, **options):
    """Emit code for SPECS (default: every specs/*.yaml), one file per spec: OUT_DIR/<name>.py or .onnx.

    Every spec is compiled before anything is written; a file is rewritten (atomically)
    only when its content changed, and only if dnc wrote it (or with --force). Each file
    records the command that regenerates it.
    """
    from dnc.targets import target as find_target
    from dnc.targets.outputs import Destination, plan_outputs, stale_outputs, write_outputs

    t = find_target(target)
    given = {name: value for name, value in options.items() if value is not None}
    foreign = [f"--{name}" for name in given if name not in {o.name for o in t.options}]
    if foreign:
        raise DncError(f"{', '.join(foreign)}: not an option of --target {t.name}")
    if "weights" in given and len(specs) != 1:
        raise DncError(f"--weights fits one network: give exactly one spec, not {len(specs) or 'all of specs/'}")
    given |= _pass_settings(t, opt_level, pass_, no_pass)
    _passes(t, given)  # unknown names fail before any spec is read
    out = Destination.given(out_dir, t.default_out, t.suffix)
    if out.file and len(specs) != 1:
        raise DncError(f"-o {out.path}: a {t.suffix} file holds one network: give exactly one spec, or -o a folder")
    every_spec = not specs
    recorded = check and not overrides and not given
    outputs = plan_outputs(
        specs or _all_specs(),
        overrides,
        t.emit,
        given,
        t.suffix,
        out,
        recorded=recorded,
        policy=policy,
        passes=functools.partial(_passes, t),
    )
    if check:
        problems = stale_outputs(outputs, out.path, t.suffix, every_spec=every_spec and not out.file)
        for line in problems:
            say(line, err=True)
        if problems:
            click.echo(f"dnc: {len(problems)} generated file(s) out of date; regenerate with dnc compile", err=True)
            sys.exit(1)
        click.echo(f"{len(outputs)} generated file(s) up to date")
        return
    changed = write_outputs(outputs, out.within, force=force)
    for path in outputs:
        say(f"{path}: {'written' if path in changed else 'unchanged'}")


def _all_specs() -> list[Path]:
    specs = sorted(SPECS_DIR.glob("*.yaml"))
    if not specs:
        raise DncError(f"no specs given and none in {SPECS_DIR}/ (run from the project root or name the specs)")
    return specs


@main.command()
@spec_args
@set_option
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), help="A .safetensors or .pth checkpoint.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the input (and of the weights)."
)
@click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--target", default="torch", show_default=True, help=f"What to run: one of {', '.join(TARGET_NAMES)}.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Run the target in this dtype (cast after loading); judged against what -O0 costs in it.",
)
@pass_options
@build_options
@report_errors
def verify(specs, overrides, weights, device, seed, batch, target, dtype, opt_level, pass_, no_pass, policy):
    """Run what dnc compile emits and compare it with the IR interpreter and torchvision.

    --target torch runs the generated PyTorch model, --target onnx the ONNX model on
    onnxruntime, at the -O level asked for. The reference is dnc's IR interpreter run in
    float64 on the spec's -O0 IR, and torchvision's DenseNet too where it can express the
    spec. All get the same weights (--weights, or seeded random ones with randomised BN
    statistics) and the same seeded input, in eval mode. Exit 0 if every spec agrees with
    each reference within a relative error of 1e-5, 1 if one does not.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        raise DncError("dnc verify runs the models: it needs torch (pip install -e '.[torch,onnxruntime]')") from None
    from dnc.check.verify import check_device
    from dnc.check.verify import verify as verify_one
    from dnc.targets import target as find_target
    from dnc.targets.outputs import display_path

    t = find_target(target)
    check_device(device)
    passes = _passes(t, _pass_settings(t, opt_level, pass_, no_pass))
    failed = 0
    for path in specs:
        spec, graph = build(display_path(path), overrides, passes=passes, **policy)
        label = str(path) if opt_level is None else f"{path} (-O{opt_level})"
        outcome = verify_one(
            spec,
            graph,
            label,
            target=t,
            weights=weights,
            device=device,
            seed=seed,
            batch=batch,
            limits=policy["limits"],
            dtype=dtype,
        )
        say(outcome.line)
        failed += not outcome.ok
    sys.exit(1 if failed else 0)


@main.command("ir")
@spec_arg
@set_option
@click.option("--target", default="torch", show_default=True, help="The target whose passes run.")
@pass_options
@build_options
@report_errors
def ir_(spec, overrides, target, opt_level, pass_, no_pass, policy):
    """Print the inferred IR, one line per node: name, op, attributes, inputs, output shape."""
    from dnc.reports.ir_text import ir_text
    from dnc.targets import target as find_target

    t = find_target(target)
    _, graph = build(spec, overrides, passes=_passes(t, _pass_settings(t, opt_level, pass_, no_pass)), **policy)
    click.echo(ir_text(graph), nl=False)


@main.command("passes")
@report_errors
def passes_():
    """List the optimisation passes: name, -O level, targets, what each does; rewrites, then settings."""
    from dnc.ir.passes import PASSES

    kinds = {"rewrite": "rewrites (change nodes):", "setting": "settings (change how the whole network runs):"}
    for kind, title in kinds.items():
        click.echo(title)
        for p in PASSES.values():
            if p.kind == kind:
                click.echo(f"  {p.name:<14} {p.levels:<4} {','.join(sorted(p.targets)):<11} {' '.join(p.doc.split())}")


@main.command()
@report_errors
def schema():
    """Print the JSON Schema of the spec format (for editors)."""
    from dnc.frontend.schema import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@main.command()
@click.argument("a")
@click.argument("b")
@set_option
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]), default="text", show_default=True)
@build_options
@report_errors
def diff(a, b, overrides, fmt, policy):
    """Compare the networks two specs build. A and B are spec files or REV:path (git).

    Specs whose IRs are equal (ops, attributes, wiring, shapes) are the same network, however
    they are written. --set applies to B. Exit 0 same network and options, 1 different networks,
    4 the same network with other options (memory_efficient), 2 error.
    """
    from dnc.reports.diff import compare, exit_status, load_side
    from dnc.reports.diff_report import to_json, to_markdown

    result = compare(load_side(a, policy=policy), load_side(b, overrides, policy=policy))
    if fmt == "json":
        click.echo(json.dumps(to_json(result), indent=2))
    elif fmt == "markdown":
        click.echo(to_markdown(result))
    else:
        from dnc.reports.render import diff_text

        diff_text(result)
    sys.exit(exit_status(result))


@main.command()
@spec_arg
@set_option
@click.option(
    "--detail",
    type=click.Choice(["block", "layer"]),
    default="block",
    show_default=True,
    help="block: one box per stage; layer: every dense layer with its concatenation inputs.",
)
@click.option("--format", "fmt", type=click.Choice(["dot", "mermaid", "svg", "png"]), default="dot", show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write here (atomically). Default: stdout for dot and mermaid, <name>.svg / <name>.png for images.",
)
@force_option
@build_options
@report_errors
def graph(spec, overrides, detail, fmt, output, force, policy):
    """Draw the architecture: DOT or Mermaid source, or SVG/PNG through Graphviz `dot`."""
    from dnc.reports.pictures import IMAGE_FORMATS, check_layout, picture, render_image, render_text
    from dnc.targets.outputs import write_outputs

    spec_model, ir = build(spec, overrides, **policy)
    drawing = picture(ir, detail)
    if fmt in IMAGE_FORMATS:
        check_layout(drawing)
    text = render_text(drawing, "dot" if fmt in IMAGE_FORMATS else fmt)
    if fmt not in IMAGE_FORMATS and output is None:
        click.echo(text, nl=False)
        return
    data = render_image(text, fmt) if fmt in IMAGE_FORMATS else text.encode()
    output = output or Path(f"{spec_model.name}.{fmt}")
    write_outputs({output: data}, output.parent, force=force)
    say(f"wrote {output}", err=True)


def run() -> None:
    """The console entry point: click's own usage errors become one line and exit 2 too."""
    try:
        code = main.main(prog_name="dnc", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as err:  # bare `dnc`: the help, as click prints it, and exit 2
        err.show()
        sys.exit(err.exit_code)
    except click.ClickException as err:  # a bad option, a missing argument, a bad choice
        ctx = getattr(err, "ctx", None)
        where = ctx.command_path if ctx else "dnc"
        say(f"{where}: error: {err.format_message()} (see {where} --help)", err=True)
        sys.exit(EXIT_ERROR)
    except click.Abort:
        sys.exit(130)
    except BrokenPipeError:  # --help or --version into a closed pipe
        closed_pipe()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
