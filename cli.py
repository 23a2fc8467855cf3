"""`up2you-budget`: photos of one person -> textured 3D human, inside the GPU memory that is really free.

    up2you-budget --vram 12GB photos/            run a job (12GB = 12 x 2^30 bytes)
    up2you-budget --vram 12GB photos/ --plan     print the plan, run nothing
    up2you-budget plan --vram 8GB photos/        the same as --plan
    up2you-budget gpus                           what NVML sees: GPUs, free memory, processes
    up2you-budget calibrate --gpu 0 [--quick]    measure this GPU, write the next budget table
    up2you-budget --vram 12GB subjects/          one folder per person: a queue over every GPU
    up2you-budget ray-worker --address HEAD:6379 join a Ray cluster, one raylet per GPU
    up2you-budget weights fetch [--accept-smplx-license]   download and verify the released checkpoints
    up2you-budget weights verify | where         check them / say where each one is found
    up2you-budget doctor [--json]                what stands between this machine and a real run
    up2you-budget demo [--device cpu]            the whole chain with tiny weights, no photos/GPU needed
    up2you-budget setup                          compile bytecode, build nvdiffrast: once a machine (no job pays)

The main command has a positional folder, which does not mix with click subcommands, so `main`
dispatches on argv[1] itself: a word in SUBCOMMANDS selects that command, anything else is a run.
(A photo folder literally named like a subcommand can be passed as ./gpus.)
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from budgets.table import table_gpu
from orchestrator.console import gpu_table, ledger_table, plan_table
from orchestrator.fleet.queue import BACKENDS, FleetOptions, parse_gpus, run_fleet
from orchestrator.fleet.subjects import Subject, detect_subjects
from orchestrator.inputs import EXIT_USAGE, InputError
from orchestrator.job import SMOKE_TEST, JobError, RunOptions, default_out_dir, plan_job, plan_notes, run_job
from orchestrator.ledger import Ledger, LedgerError
from orchestrator.probe import ProbeError, default_probe
from orchestrator.runner import cpu_note
from orchestrator.sizes import gib, parse_duration, parse_size
from orchestrator.testenv import job_doubles
from stages.jobfs import shown
from stages.plan import RESOLUTION_CHOICES, VIEW_CHOICES
from stages.spec import EXIT_DISK_FULL, EXIT_INTERRUPTED, EXIT_NO_DEVICE, UP2YOU

err = Console(stderr=True)


def _vram(value: str) -> str:
    if value != "auto":
        try:
            parse_size(value)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


def _auto_int(choices: tuple[int, ...] | None, option: str) -> Callable[[str], int | None]:
    def parse(value: str) -> int | None:
        if value == "auto":
            return None
        if not value.isdigit() or int(value) < 1 or (choices and int(value) not in choices):
            allowed = "auto or " + ("|".join(map(str, choices)) if choices else "a positive integer")
            raise typer.BadParameter(f"{value!r}: expected {allowed}", param_hint=option)
        return int(value)

    return parse


def _steps(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise typer.BadParameter(f"{value!r}: expected a positive number of denoising steps, like 50", param_hint="--steps")
    return int(value)


def _duration(value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _time_budget(value: str | None) -> float | None:
    """`--time-budget 90s|10m|none`: seconds, or None for no time budget."""
    if value is None or value.strip().lower() in ("", "none"):
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--time-budget") from None
    if seconds <= 0:
        raise typer.BadParameter(f"{value!r}: a time budget must be positive, like 90s or 10m",
                                 param_hint="--time-budget")  # fmt: skip
    return seconds


TIME_BUDGET_HELP = ("Also fit the predicted run time: 90s, 10m (the planner raises the THG interval, then lowers "
                    "steps, then views). Default: none.")


def run_command(
    input_dir: Path = typer.Argument(..., help="Folder of photos of one person (JPEG/PNG)."),
    vram: str = typer.Option("auto", callback=_vram, help="Memory cap: SIZE (12GB = 12 x 2^30 bytes; GB, GiB, MB, "
                             "MiB, G, M accepted) or auto (free now minus a reserve)."),
    gpu: str = typer.Option("auto", help="auto (the GPU with the most free memory) or an NVML index."),
    out: Path | None = typer.Option(None, help="Output folder (default: <input>_up2you/ beside the input)."),
    views: str = typer.Option("auto", help=f"auto or {'|'.join(map(str, VIEW_CHOICES))}."),
    resolution: str = typer.Option("auto", help=f"auto or {'|'.join(map(str, RESOLUTION_CHOICES))}."),
    steps: str | None = typer.Option(None, help="Denoising steps (default 50)."),
    thg_interval: str = typer.Option("auto", help="Tortoise-and-Hare guidance interval: auto (3) or N."),
    weights: Path | None = typer.Option(None, help="Folder of released checkpoints (default ./weights)."),
    max_retries: int = typer.Option(3, min=0, help="Out-of-memory retries before giving up."),
    wait_for_vram: str = typer.Option("0", callback=_duration, help="Wait this long (90s, 10m) for memory another "
                                      "process holds, instead of lowering the plan."),
    wait_for_siblings: str = typer.Option("1h", callback=_duration, help="Wait up to this long for memory our own "
                                          "jobs on this host hold (they give it back), before lowering the plan."),
    prefer: str = typer.Option("quality", help="quality: never lose views/pixels while a memory knob fits; speed: "
                               "rather lose quality than offload."),
    cpu_fallback: str = typer.Option("auto", help="auto: a stage that no GPU plan fits once --wait-for-vram is up "
                                     "(a neighbour left too little) runs on the CPU, slowly, nothing recomputed; "
                                     "never: exit 75 instead."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    device: str = typer.Option("cuda", help="cuda, or cpu (tiny test models only)."),
    tiny: bool = typer.Option(False, help="Smoke test: tiny random weights (the output is noise)."),
    plan: bool = typer.Option(False, "--plan", help="Print the plan and exit; run nothing."),
    gpus: str = typer.Option("all", help="Folder of subjects: the GPUs to spread them over, all or 0,1."),
    jobs_per_gpu: str = typer.Option("auto", help="Folder of subjects: jobs side by side on one GPU, auto (as many "
                                     "as fit, at most half the CPU cores on the host) or N."),
    backend: str = typer.Option("local", help="Folder of subjects: local (this host's GPUs) or ray (a Ray cluster)."),
    address: str | None = typer.Option(None, help="--backend ray: the cluster's address (default: a running one)."),
    full_random: bool = typer.Option(False, "--full-random", hidden=True,
                                     help="Benchmarks: full-size architectures with random weights, no files."),
    set_fields: list[str] = typer.Option([], "--set", hidden=True, help="Benchmarks: fix a Plan field, KEY=VALUE."),
    time_budget: str | None = typer.Option(None, "--time-budget", help=TIME_BUDGET_HELP),
) -> None:  # fmt: skip
    """Run UP2You on INPUT_DIR (photos of one person, or one folder of photos per person) within a GPU memory budget."""
    if prefer not in ("quality", "speed"):
        raise typer.BadParameter(f"{prefer!r}: expected quality or speed", param_hint="--prefer")
    if device not in ("cuda", "cpu"):
        raise typer.BadParameter(f"{device!r}: expected cuda or cpu", param_hint="--device")
    if cpu_fallback not in ("auto", "never"):
        raise typer.BadParameter(f"{cpu_fallback!r}: expected auto or never", param_hint="--cpu-fallback")
    options = RunOptions(
        vram=vram, gpu=gpu, views=_auto_int(VIEW_CHOICES, "--views")(views),
        resolution=_auto_int(RESOLUTION_CHOICES, "--resolution")(resolution),
        steps=_steps(steps), thg_interval=_auto_int(None, "--thg-interval")(thg_interval), weights=weights, max_retries=max_retries,
        wait_for_vram_s=float(wait_for_vram), wait_for_siblings_s=float(wait_for_siblings), prefer=prefer, device=device,
        tiny=tiny, plan_only=plan, quiet=json_out,
        full_random=full_random, overrides=_overrides(set_fields),
        time_budget_s=_time_budget(time_budget), cpu_fallback=cpu_fallback == "auto",
    )  # fmt: skip
    fleet = _fleet_options(gpus, jobs_per_gpu, backend, address)
    subjects = _subjects(input_dir, out)
    if subjects is not None:
        if plan:
            for s in subjects:
                err.print(f"[bold]{s.name}[/bold]")
                _print_plan(s.folder, options, json_out)
            return
        if gpu != "auto":
            raise typer.BadParameter("a folder of subjects is spread over --gpus (all or 0,1), not --gpu",
                                     param_hint="--gpu")  # fmt: skip
        raise typer.Exit(_run_fleet(subjects, out or default_out_dir(input_dir), options, fleet, json_out))
    if fleet != FleetOptions():
        raise typer.BadParameter(f"{input_dir} holds photos of one person: --gpus, --jobs-per-gpu, --backend and "
                                 "--address are for a folder of subject folders (use --gpu INDEX)")  # fmt: skip
    if plan:
        _print_plan(input_dir, options, json_out)
        return
    report = run_job(input_dir, out, options, **job_doubles())
    if json_out:
        print(json.dumps(report.to_dict(), indent=1, default=str))
    elif report.ok:
        cpu = report.pipeline_result.cpu_stages if report.pipeline_result else []
        on_cpu = f"; {cpu_note(cpu)}" if cpu else ""
        err.print(f"[green]done in {report.wall_s:.0f} s[/green] -> {report.out_dir}{on_cpu}")
        for d in report.deliverables:
            err.print(f"  {report.out_dir / d}")
        if report.smoke_test:
            err.print(f"[bold yellow]{SMOKE_TEST}[/bold yellow]")
    else:
        err.print(f"[red]error:[/red] {escape(shown(report.message))}\n  report: {escape(str(report.out_dir / 'run.json'))}",
                  highlight=False, soft_wrap=True)
    raise typer.Exit(report.exit_code)


def _print_plan(input_dir: Path, options: RunOptions, json_out: bool) -> None:
    jp = plan_job(input_dir, options, **job_doubles())
    if json_out:
        print(json.dumps({"plan": jp.choice.plan.to_dict(), "label": jp.choice.candidate.label,
                          "table": {"name": jp.table.name, "version": jp.table.version,
                                    "measured_on": table_gpu(jp.table), "path": jp.table.path},
                          "budget_bytes": jp.budget.bytes, "budget_source": jp.budget.source,
                          "degradations": list(jp.choice.degradations),
                          "stages": {f.stage: {"predicted_bytes": f.prediction.total_bytes, "need_bytes": f.need_bytes}
                                     for f in jp.choice.fits},
                          "predicted_seconds": jp.choice.times.to_dict() if jp.choice.times else None}, indent=1))  # fmt: skip
        return
    con = Console()
    for line in plan_notes(jp):
        con.print(f"note: {line}", markup=False, highlight=False, soft_wrap=True)
    if options.tiny:
        con.print(f"[bold yellow]{SMOKE_TEST}[/bold yellow]")
    con.print(plan_table(UP2YOU, jp.choice, f"plan: {jp.choice.candidate.label} — budget {jp.budget.source}"))
    for d in jp.choice.degradations:
        con.print(f"[yellow]  {d}[/yellow]")
    con.print(f"output would go to {default_out_dir(input_dir)}; nothing was run (--plan)")


def _overrides(items: list[str]) -> tuple[tuple[str, object], ...]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--set")
        out.append((key, int(value) if value.lstrip("-").isdigit() else value))
    return tuple(out)


def _fleet_options(gpus: str, jobs_per_gpu: str, backend: str, address: str | None) -> FleetOptions:
    try:
        selected = parse_gpus(gpus)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--gpus") from None
    if backend not in BACKENDS:
        raise typer.BadParameter(f"{backend!r}: expected {' or '.join(BACKENDS)}", param_hint="--backend")
    if backend == "ray" and selected is not None:
        raise typer.BadParameter("with --backend ray the workers offer their GPUs (up2you-budget ray-worker --gpus)",
                                 param_hint="--gpus")  # fmt: skip
    if backend != "ray" and address is not None:
        raise typer.BadParameter("--address is the Ray cluster's: use it with --backend ray", param_hint="--address")
    return FleetOptions(gpus=selected, jobs_per_gpu=_auto_int(None, "--jobs-per-gpu")(jobs_per_gpu), backend=backend, address=address)


def _subjects(input_dir: Path, out: Path | None) -> list[Subject] | None:
    try:
        return detect_subjects(input_dir, exclude=out)
    except InputError as exc:
        raise JobError(str(exc), exc.exit_code) from None


def _run_fleet(subjects: list[Subject], out: Path, options: RunOptions, fleet: FleetOptions, json_out: bool) -> int:
    result = run_fleet(subjects, out, options, fleet, console=err)
    if json_out:
        print(json.dumps(result.rows, indent=1, default=str))
    err.print(f"summary: {result.out_dir / 'summary.csv'}", highlight=False)
    return result.exit_code


def gpus_command(json_out: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """What NVML sees: per GPU total/free/used memory and each compute process; and the ledger's reservations."""
    try:
        probe = default_probe()
        assert probe is not None
        gpus = probe.gpus()
        ledger = Ledger(probe=probe)
        views = [ledger.view(g) for g in gpus]
    except ProbeError as exc:
        raise JobError(str(exc), EXIT_NO_DEVICE) from None
    except LedgerError as exc:
        raise JobError(str(exc), EXIT_DISK_FULL) from None
    if json_out:
        print(json.dumps([{**g.__dict__, "processes": [p.__dict__ for p in g.processes],
                           "available_bytes": v.available(),
                           "reservations": [{**h.reservation.__dict__, "allocated_bytes": h.allocated, "alive": h.alive}
                                            for h in v.holdings],
                           "waiting": [t.__dict__ for t in v.tickets]} for g, v in zip(gpus, views, strict=True)], indent=1))  # fmt: skip
        return
    if not gpus:
        raise JobError("NVML sees no GPU; use --device cpu --tiny for a CPU smoke test", EXIT_NO_DEVICE)
    Console().print(gpu_table(gpus))
    Console().print(ledger_table(views))
    best = max(views, key=lambda v: v.available())
    Console().print(f"--gpu auto would pick GPU {best.gpu.index} ({gib(best.available())} free and unreserved)")


def plan_command(
    input_dir: Path = typer.Argument(..., help="Folder of photos of one person."),
    vram: str = typer.Option("auto", callback=_vram, help="Memory cap (12GB = 12 x 2^30 bytes) or auto."),
    gpu: str = typer.Option("auto", help="auto or an NVML index."),
    views: str = typer.Option("auto"), resolution: str = typer.Option("auto"),
    prefer: str = typer.Option("quality"), device: str = typer.Option("cuda"), tiny: bool = typer.Option(False),
    json_out: bool = typer.Option(False, "--json"),
    time_budget: str | None = typer.Option(None, "--time-budget", help=TIME_BUDGET_HELP),
) -> None:  # fmt: skip
    """Print the plan for INPUT_DIR and run nothing (same as the main command with --plan)."""
    options = RunOptions(vram=vram, gpu=gpu, views=_auto_int(VIEW_CHOICES, "--views")(views),
                         resolution=_auto_int(RESOLUTION_CHOICES, "--resolution")(resolution), prefer=prefer, device=device,
                         tiny=tiny, plan_only=True, time_budget_s=_time_budget(time_budget))  # fmt: skip
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
    tp = result.table.time.provenance if result.table.time else {}
    if tp:
        err.print(f"  time: worst fit error {100 * (tp.get('worst_fit_error') or 0):.0f} %; "
                  f"{len(tp.get('not_fitted', []))} terms kept from the template, {len(tp.get('excluded_rows', []))} "
                  "rows excluded (the table's time.provenance says which)")  # fmt: skip
    err.print(f"[green]table v{result.table.version} written to {result.path}[/green] ({result.wall_s:.0f} s)")


def ray_worker_command(
    address: str = typer.Option(..., help="The Ray head's address (HOST:6379), from `ray start --head`."),
    gpus: str = typer.Option("all", help="The GPUs of this host to offer: all or 0,1."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the ray start commands; run nothing."),
) -> None:  # fmt: skip
    """Join a Ray cluster with one raylet per GPU (its own CUDA_VISIBLE_DEVICES, num_gpus=1, vram_gib)."""
    from orchestrator.fleet.ray_worker import raylets, start_raylets

    try:
        selected = parse_gpus(gpus)
        probe = default_probe()
        assert probe is not None  # on a GPU host: NVML (or the simulated GPUs of the tests)
        found = probe.gpus()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--gpus") from None
    except ProbeError as exc:
        raise JobError(str(exc), EXIT_NO_DEVICE) from None
    chosen = [g for g in found if selected is None or g.index in selected]
    if not chosen:
        raise JobError(f"--gpus {gpus}: no such GPU here (see `up2you-budget gpus`)", EXIT_NO_DEVICE)
    plan = raylets(chosen, address)
    for r in plan:
        print(r.shell())
    if not dry_run:
        raise typer.Exit(start_raylets(plan))


def weights_fetch_command(
    to: Path | None = typer.Option(None, "--to", help="Weights folder to fill (default: --weights resolution: "
                                   "$UP2YOU_WEIGHTS, else ./weights)."),
    only: list[str] = typer.Option([], "--only", help="Fetch only these checkpoints (repeatable): "
                                   "sd21, rgb_adapter, normal_adapter, shape_predictor, feature_aggregator, dinov2, "
                                   "birefnet, smplx, mano_ids, smplx_lmkid."),
    accept_smplx_license: bool = typer.Option(False, "--accept-smplx-license", help="You accept the SMPL-X licence "
                                              "(smpl-x.is.tue.mpg.de/modellicense.html): fetch the SMPL-X files too."),
) -> None:  # fmt: skip
    """Download exactly the files the stages read, verify their size and sha256; a rerun resumes / does nothing."""
    from orchestrator.fetch import fetch, fetch_files, licence_notice, select
    from orchestrator.weightfiles import folder_candidates
    from stages.spec import EXIT_MISSING_WEIGHTS

    try:
        downloads = select(only)
    except ValueError as exc:
        raise JobError(str(exc), EXIT_USAGE) from None
    dest = (to.expanduser().resolve() if to else folder_candidates(None)[0].path)
    err.print(f"weights folder: {dest}")
    result = fetch(dest, fetch_files(downloads), accept_smplx_license, err)
    for v in result.verified:
        err.print(f"  [green]ok[/green] {v.path} ({v.checked}{': ' + v.sha256[:12] + '…' if v.sha256 else ''})",
                  highlight=False)  # fmt: skip
    for line in result.failed:
        err.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
    if result.not_accepted:
        err.print(f"[yellow]{licence_notice(result.not_accepted)}[/yellow]", highlight=False, soft_wrap=True)
    if not result.ok:
        raise typer.Exit(EXIT_MISSING_WEIGHTS)
    err.print(f"[green]{len(result.fetched)} file(s) fetched, {len(result.verified)} verified[/green] in {dest}")


def weights_verify_command(
    weights: Path | None = typer.Option(None, help="Folder of released checkpoints (default: the usual resolution)."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:  # fmt: skip
    """Where each checkpoint is found (--weights, $UP2YOU_WEIGHTS, ./weights, the HF cache) and whether it verifies."""
    from orchestrator.weightfiles import resolve, verify_checkpoint, weights_record
    from stages.spec import EXIT_MISSING_WEIGHTS

    res = resolve(weights)
    checks = {k: verify_checkpoint(k, res.root, hash_unknown=True) for k in res.found}
    if json_out:
        print(json.dumps(weights_record(res, checks), indent=1))
    else:
        for key, found in res.found.items():
            bad = [v.problem for v in checks[key] if not v.ok]
            mark = "[red]FIX[/red]" if bad else "[green]ok[/green]"
            err.print(f"{mark} {key:18s} {found.location.label}: {found.path}", highlight=False)
            for line in bad:
                err.print(f"    {line}", highlight=False, soft_wrap=True)
        for key in res.missing:
            err.print(f"[red]missing[/red] {key:14s} get it with `up2you-budget weights fetch --only {key}`",
                      highlight=False)  # fmt: skip
    if res.missing or any(not v.ok for vs in checks.values() for v in vs):
        raise typer.Exit(EXIT_MISSING_WEIGHTS)


def doctor_command(
    out: Path = typer.Option(Path("."), help="Where outputs will go (checked for free disk)."),
    weights: Path | None = typer.Option(None, help="Folder of released checkpoints (default: the usual resolution)."),
    json_out: bool = typer.Option(False, "--json", help="Print the checks as JSON on stdout."),
) -> None:  # fmt: skip
    """One row per check (GPU, driver, torch CUDA, nvdiffrast, weights, disk, RAM, ffmpeg); exit 0 only when ready."""
    from orchestrator import doctor

    if not json_out:
        err.print("checking (the first check of real weights hashes them: up to a minute) ...")
    rows = doctor.run_checks(out, weights)
    ok = doctor.ready(rows)
    if json_out:
        print(json.dumps({"ready": ok, "checks": [r.to_dict() for r in rows],
                          "tiny_skips": [doctor.SKIPPED_BY_TINY, doctor.SKIPPED_BY_TINY_CPU]}, indent=1))  # fmt: skip
    else:
        Console().print(doctor.table(rows))
        Console().print(doctor.summary(rows), highlight=False, soft_wrap=True)
    if not ok:
        raise typer.Exit(doctor.EXIT_NOT_READY)


def demo_command(
    out: Path = typer.Option(Path("up2you_demo"), help="Folder for the synthetic photos and every output."),
    device: str = typer.Option("auto", help="auto (a usable CUDA GPU, else cpu), cpu or cuda."),
) -> None:  # fmt: skip
    """Run the whole chain on synthetic photos with tiny random weights: no photos, weights or GPU needed."""
    from orchestrator.demo import NEXT_STEPS, run_demo

    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"{device!r}: expected auto, cpu or cuda", param_hint="--device")
    report = run_demo(out, device, err)
    if not report.ok:
        err.print(f"[red]error:[/red] {report.message}\n  report: {report.out_dir / 'run.json'}")
        raise typer.Exit(report.exit_code)
    err.print(f"[green]done in {report.wall_s:.0f} s[/green] -> {report.out_dir}", soft_wrap=True)
    for d in report.deliverables:  # soft_wrap: a long path stays one line a script can read
        err.print(f"  {report.out_dir / d}", highlight=False, soft_wrap=True)
    err.print(f"[bold yellow]{NEXT_STEPS}[/bold yellow]", highlight=False, soft_wrap=True)


def setup_command() -> None:
    """One-time machine set-up: compile the bytecode the stage processes import (when it is missing) and build
    nvdiffrast's CUDA plugin, so that no job pays for either (seconds per stage process; ~28 s once)."""
    import subprocess

    from orchestrator import bytecode

    packages = bytecode.survey()
    missing = sum(p.missing for p in packages if p.writable)
    if missing:
        names = ", ".join(p.name for p in packages if p.missing)
        err.print(f"compiling bytecode for {missing} modules ({names}) ...")
        done = bytecode.compile_bytecode(packages)
        if done.returncode != 0:  # a module that does not compile is imported from source, as before
            err.print(f"[yellow]compileall exit {done.returncode}: some modules stay without bytecode[/yellow]")
    ok, detail, fix = bytecode.summary(bytecode.survey())
    err.print(f"[green]{detail}[/green]" if ok else f"[yellow]{detail}; {fix}[/yellow]", soft_wrap=True)
    err.print("building nvdiffrast (once per machine; about 30 s) ...")
    proc = subprocess.run([sys.executable, "-m", "up2you.render.nvdiffrast_backend"], capture_output=True, text=True)
    if proc.returncode != 0:  # the child says why in one line (no CUDA, no nvcc, a compiler error)
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise JobError(tail, EXIT_NO_DEVICE if proc.returncode == EXIT_NO_DEVICE else 1)
    err.print(f"[green]{proc.stdout.strip()}[/green]")


# Subcommands, selected by argv[1]; a word in SUBCOMMAND_VERBS also takes a verb from argv[2].
SUBCOMMANDS: dict[str, Callable[..., None]] = {"gpus": gpus_command, "plan": plan_command,
                                               "calibrate": calibrate_command, "doctor": doctor_command,
                                               "demo": demo_command, "ray-worker": ray_worker_command,
                                               "setup": setup_command}  # fmt: skip
SUBCOMMAND_VERBS: dict[str, dict[str, Callable[..., None]]] = {
    "weights": {"fetch": weights_fetch_command, "verify": weights_verify_command, "where": weights_verify_command},
}


def _app(command: Callable[..., None], name: str) -> typer.Typer:
    no_args_help = command not in (gpus_command, doctor_command, demo_command, weights_fetch_command,
                                   weights_verify_command, setup_command)  # fmt: skip
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=no_args_help)
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
    elif args and args[0] in SUBCOMMAND_VERBS:
        verbs = SUBCOMMAND_VERBS[args[0]]
        if len(args) < 2 or args[1] not in verbs:
            err.print(f"usage: up2you-budget {args[0]} {'|'.join(verbs)} [OPTIONS] (--help for each)")
            return EXIT_USAGE
        name, command = f"up2you-budget {args[0]} {args[1]}", verbs[args[1]]
        args = args[2:]
    click_cmd = typer.main.get_command(_app(command, name))
    try:
        code = click_cmd.main(args=args, prog_name=name, standalone_mode=False)
        return code if isinstance(code, int) else 0
    except JobError as exc:
        err.print(f"[red]error:[/red] {escape(shown(str(exc)))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted")
        return EXIT_INTERRUPTED
    except OSError as exc:
        if exc.errno not in _UNWRITABLE:
            raise
        # the orchestrator's own writes (run.json, a request) failed; every finished stage is kept (atomic writes)
        where = f" {exc.filename}" if exc.filename else ""
        err.print(f"error: cannot write{where}: {os.strerror(exc.errno or 0)}; free space (or pass --out on another "
                  "disk) and rerun: finished stages are kept", highlight=False, soft_wrap=True, markup=False)  # fmt: skip
        return EXIT_DISK_FULL
    except Exception as exc:
        # click's usage errors (click itself, or the copy newer typer vendors): one line, like ours
        fmt, code = getattr(exc, "format_message", None), getattr(exc, "exit_code", None)
        if callable(fmt) and isinstance(code, int):
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()  # type: ignore[attr-defined]
                return code or EXIT_USAGE
            text = " ".join(str(fmt()).split())
            err.print(f"error: {text} (see {name} --help)", highlight=False, soft_wrap=True, markup=False)
            return code or EXIT_USAGE
        raise


_UNWRITABLE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


if __name__ == "__main__":
    sys.exit(main())
