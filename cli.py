"""`up2you-budget`: photos of one person -> textured 3D human, inside the GPU memory that is really free.

    up2you-budget --vram 12GB photos/            run a job (12GB = 12 x 2^30 bytes)
    up2you-budget --vram 12GB photos/ --plan     print the plan, run nothing
    up2you-budget plan --vram 8GB photos/        the same as --plan
    up2you-budget gpus                           what NVML sees: GPUs, free memory, processes
    up2you-budget calibrate --gpu 0 [--quick]    measure this GPU, write the next budget table
    up2you-budget setup                          build nvdiffrast once for this machine (no job pays for it)

The main command has a positional folder, which does not mix with click subcommands, so `main`
dispatches on argv[1] itself: a word in SUBCOMMANDS selects that command, anything else is a run.
(A photo folder literally named like a subcommand can be passed as ./gpus.)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console

from orchestrator.console import gpu_table, plan_table
from orchestrator.inputs import EXIT_USAGE
from orchestrator.job import SMOKE_TEST, JobError, RunOptions, default_out_dir, plan_job, run_job
from orchestrator.probe import NvmlProbe, ProbeError
from orchestrator.sizes import gib, parse_duration, parse_size
from stages.plan import RESOLUTION_CHOICES, VIEW_CHOICES
from stages.spec import EXIT_INTERRUPTED, EXIT_NO_DEVICE, UP2YOU

err = Console(stderr=True)


def _vram(value: str) -> str:
    if value != "auto":
        try:
            parse_size(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


def _auto_int(choices: tuple[int, ...] | None) -> Callable[[str], int | None]:
    def parse(value: str) -> int | None:
        if value == "auto":
            return None
        if not value.isdigit() or int(value) < 1 or (choices and int(value) not in choices):
            allowed = "auto or " + ("|".join(map(str, choices)) if choices else "a positive integer")
            raise typer.BadParameter(f"{value!r}: expected {allowed}")
        return int(value)

    return parse


def _duration(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def run_command(
    input_dir: Path = typer.Argument(..., help="Folder of photos of one person (JPEG/PNG)."),
    vram: str = typer.Option("auto", callback=_vram, help="Memory cap: SIZE (12GB = 12 x 2^30 bytes; GB, GiB, MB, "
                             "MiB, G, M accepted) or auto (free now minus a reserve)."),
    gpu: str = typer.Option("auto", help="auto (the GPU with the most free memory) or an NVML index."),
    out: Path | None = typer.Option(None, help="Output folder (default: <input>_up2you/ beside the input)."),
    views: str = typer.Option("auto", help=f"auto or {'|'.join(map(str, VIEW_CHOICES))}."),
    resolution: str = typer.Option("auto", help=f"auto or {'|'.join(map(str, RESOLUTION_CHOICES))}."),
    steps: int | None = typer.Option(None, min=1, help="Denoising steps (default 50)."),
    thg_interval: str = typer.Option("auto", help="Tortoise-and-Hare guidance interval: auto (3) or N."),
    weights: Path | None = typer.Option(None, help="Folder of released checkpoints (default ./weights)."),
    max_retries: int = typer.Option(3, min=0, help="Out-of-memory retries before giving up."),
    wait_for_vram: str = typer.Option("0", callback=_duration, help="Wait this long (90s, 10m) for memory another "
                                      "process holds, instead of lowering the plan."),
    prefer: str = typer.Option("quality", help="quality: never lose views/pixels while a memory knob fits; speed: "
                               "rather lose quality than offload."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    device: str = typer.Option("cuda", help="cuda, or cpu (tiny test models only)."),
    tiny: bool = typer.Option(False, help="Smoke test: tiny random weights (the output is noise)."),
    plan: bool = typer.Option(False, "--plan", help="Print the plan and exit; run nothing."),
) -> None:  # fmt: skip
    """Run UP2You on INPUT_DIR within a GPU memory budget."""
    if prefer not in ("quality", "speed"):
        raise typer.BadParameter(f"{prefer!r}: expected quality or speed", param_hint="--prefer")
    if device not in ("cuda", "cpu"):
        raise typer.BadParameter(f"{device!r}: expected cuda or cpu", param_hint="--device")
    options = RunOptions(
        vram=vram, gpu=gpu, views=_auto_int(VIEW_CHOICES)(views), resolution=_auto_int(RESOLUTION_CHOICES)(resolution),
        steps=steps, thg_interval=_auto_int(None)(thg_interval), weights=weights, max_retries=max_retries,
        wait_for_vram_s=float(wait_for_vram), prefer=prefer, device=device, tiny=tiny, plan_only=plan, quiet=json_out,
    )  # fmt: skip
    if plan:
        _print_plan(input_dir, options, json_out)
        return
    report = run_job(input_dir, out, options)
    if json_out:
        print(json.dumps(report.to_dict(), indent=1, default=str))
    elif report.ok:
        err.print(f"[green]done in {report.wall_s:.0f} s[/green] -> {report.out_dir}")
        for d in report.deliverables:
            err.print(f"  {report.out_dir / d}")
        if report.smoke_test:
            err.print(f"[bold yellow]{SMOKE_TEST}[/bold yellow]")
    else:
        err.print(f"[red]error:[/red] {report.message}\n  report: {report.out_dir / 'run.json'}")
    raise typer.Exit(report.exit_code)


def _print_plan(input_dir: Path, options: RunOptions, json_out: bool) -> None:
    jp = plan_job(input_dir, options)
    if json_out:
        print(json.dumps({"plan": jp.choice.plan.to_dict(), "label": jp.choice.candidate.label,
                          "budget_bytes": jp.budget.bytes, "budget_source": jp.budget.source,
                          "degradations": list(jp.choice.degradations),
                          "stages": {f.stage: {"predicted_bytes": f.prediction.total_bytes, "need_bytes": f.need_bytes}
                                     for f in jp.choice.fits}}, indent=1))  # fmt: skip
        return
    con = Console()
    for p in jp.inputs.ignored:
        con.print(f"note: {p.name} is not an image, ignored")
    if options.tiny:
        con.print(f"[bold yellow]{SMOKE_TEST}[/bold yellow]")
    con.print(plan_table(UP2YOU, jp.choice, f"plan: {jp.choice.candidate.label} — budget {jp.budget.source}"))
    for d in jp.choice.degradations:
        con.print(f"[yellow]  {d}[/yellow]")
    con.print(f"output would go to {default_out_dir(input_dir)}; nothing was run (--plan)")


def gpus_command(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """What NVML sees: per GPU total/free/used memory and each compute process."""
    try:
        gpus = NvmlProbe().gpus()
    except ProbeError as exc:
        raise JobError(str(exc), EXIT_NO_DEVICE) from None
    if json_out:
        print(json.dumps([{**g.__dict__, "processes": [p.__dict__ for p in g.processes]} for g in gpus], indent=1))
        return
    if not gpus:
        raise JobError("NVML sees no GPU; use --device cpu --tiny for a CPU smoke test", EXIT_NO_DEVICE)
    Console().print(gpu_table(gpus))
    free = max(gpus, key=lambda g: g.free)
    Console().print(f"--gpu auto would pick GPU {free.index} ({gib(free.free)} free)")


def plan_command(
    input_dir: Path = typer.Argument(..., help="Folder of photos of one person."),
    vram: str = typer.Option("auto", callback=_vram, help="Memory cap (12GB = 12 x 2^30 bytes) or auto."),
    gpu: str = typer.Option("auto", help="auto or an NVML index."),
    views: str = typer.Option("auto"), resolution: str = typer.Option("auto"),
    prefer: str = typer.Option("quality"), device: str = typer.Option("cuda"), tiny: bool = typer.Option(False),
    json_out: bool = typer.Option(False, "--json"),
) -> None:  # fmt: skip
    """Print the plan for INPUT_DIR and run nothing (same as the main command with --plan)."""
    options = RunOptions(vram=vram, gpu=gpu, views=_auto_int(VIEW_CHOICES)(views),
                         resolution=_auto_int(RESOLUTION_CHOICES)(resolution), prefer=prefer, device=device,
                         tiny=tiny, plan_only=True)  # fmt: skip
    _print_plan(input_dir, options, json_out)


def calibrate_command(
    gpu: str = typer.Option("0", help="NVML index of the GPU to measure."),
    quick: bool = typer.Option(False, help="A 3-point grid (about a minute) instead of the full one."),
    out: Path | None = typer.Option(None, help="Table file to write (default: budgets/tables/up2you-v<next>.json)."),
    work: Path | None = typer.Option(None, help="Scratch folder for photos and the job (default: a temp folder)."),
    device: str = typer.Option("cuda", help="cuda, or cpu (with --tiny: tests the machinery, measures host RSS)."),
    tiny: bool = typer.Option(False, help="Tiny random weights and small plans (CPU test of the machinery)."),
    part: str = typer.Option("", help="K/N: run only part K of N of the grid (to split it across sessions)."),
    add: list[Path] = typer.Option([], "--add-measurements",
                                   help="measurements.json of earlier parts, fitted together with this one."),
) -> None:  # fmt: skip
    """Measure every stage on this GPU over a grid of plans and write a new budget table (budgets.fit)."""
    import tempfile

    from orchestrator.calibrate import calibrate, load_measurements

    try:
        split = tuple(int(x) for x in part.split("/")) if part else None
        if split is not None and len(split) != 2:
            raise ValueError
    except ValueError:
        raise typer.BadParameter(f"{part!r}: expected K/N, e.g. 1/2", param_hint="--part") from None

    if device not in ("cuda", "cpu"):
        raise typer.BadParameter(f"{device!r}: expected cuda or cpu", param_hint="--device")
    if device == "cpu" and not tiny:
        raise typer.BadParameter("--device cpu needs --tiny (full-size models on a CPU take hours)")
    with tempfile.TemporaryDirectory(prefix="up2you-calibrate-") as tmp:
        try:
            earlier = [m for f in add for m in load_measurements(f)]
            result = calibrate(work or Path(tmp), gpu=gpu, quick=quick, out=out, device=device, tiny=tiny,
                               log=lambda m: err.print(m, highlight=False), part=split,  # type: ignore[arg-type]
                               earlier=earlier)  # fmt: skip
        except ProbeError as exc:
            raise JobError(str(exc), EXIT_NO_DEVICE) from None
    failed = result.table.provenance.get("failed", [])
    for f in failed:
        err.print(f"[yellow]not measured: {f}[/yellow]")
    for stage, e in result.errors.items():
        err.print(f"  {stage:10s} worst fit error {e * 100:5.1f} %" if e == e else f"  {stage:10s} no rows")
    err.print(f"[green]table v{result.table.version} written to {result.path}[/green] ({result.wall_s:.0f} s)")


def setup_command() -> None:
    """One-time machine set-up: build nvdiffrast's CUDA plugin now, so that no job pays for it (~28 s)."""
    import subprocess

    err.print("building nvdiffrast (once per machine; about 30 s) ...")
    proc = subprocess.run([sys.executable, "-m", "up2you.render.nvdiffrast_backend"], capture_output=True, text=True)
    if proc.returncode != 0:  # the child says why in one line (no CUDA, no nvcc, a compiler error)
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise JobError(tail, EXIT_NO_DEVICE if proc.returncode == EXIT_NO_DEVICE else 1)
    err.print(f"[green]{proc.stdout.strip()}[/green]")


# Subcommands, selected by argv[1].
SUBCOMMANDS: dict[str, Callable[..., None]] = {"gpus": gpus_command, "plan": plan_command,
                                               "calibrate": calibrate_command, "setup": setup_command}  # fmt: skip


def _app(command: Callable[..., None], name: str) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=command not in (gpus_command, setup_command))
    app.command(name=name)(command)
    return app


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns (and, as a script, exits with) the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    name = "up2you-budget"
    command: Callable[..., None] = run_command
    if args and args[0] in SUBCOMMANDS:
        name, command = f"up2you-budget {args[0]}", SUBCOMMANDS[args[0]]
        args = args[1:]
    click_cmd = typer.main.get_command(_app(command, name))
    try:
        code = click_cmd.main(args=args, prog_name=name, standalone_mode=False)
        return code if isinstance(code, int) else 0
    except JobError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        # click's usage errors (click itself, or the copy newer typer vendors) know how to show themselves
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            return code or EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
