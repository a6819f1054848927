"""The ``accelerate`` and ``command`` retrain engines: a retrain run by another program, logged to a file in the
retrain's folder (the model folder's parent), checked, and summarised like the in-process one.

``accelerate``: the request (paths, recipe, engine options) is written to ``retrain_request.json`` and ``accelerate
launch`` starts N processes of :mod:`pairtrace.retrain.accelerate_worker` on it. Without an accelerate config file,
one process is started plainly and N > 1 processes through accelerate's torchrun launcher (``--multi_gpu``), which on
a CPU-only machine gives N gloo processes (``accelerate launch --cpu`` starts only one process unless mpirun is
installed). With ``accelerate_config`` the file decides the launcher (DeepSpeed, FSDP, ...).

``command``: a user command template with ``{placeholders}`` filled from the request (see
:data:`~pairtrace.retrain.engine_options.COMMAND_PLACEHOLDERS`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pairtrace.errors import ConfigError, PairtraceError
from pairtrace.processes import owned
from pairtrace.records import write_json_atomic
from pairtrace.retrain.engines import RetrainRequest, RetrainSummary, check_model_folder

logger = logging.getLogger(__name__)

REQUEST_FILE = "retrain_request.json"
LOG_FILE = "retrain.log"
SUMMARY_FILE = "retrain_summary.json"
WORK_DIR = "accelerate_work"


def retrain_dir_of(request: RetrainRequest) -> Path:
    """The retrain's folder: the model folder's parent (request, log and summary files live there)."""
    return Path(request.model_dir).resolve().parent


_EXCEPTION = re.compile(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception|Interrupt)\b.*:")


def last_lines(path: Path, n: int = 20) -> str:
    """The last ``n`` lines of a log file (empty when it does not exist), after the first exception line when that
    one is earlier (a launcher's own report often buries the worker's error)."""
    if not path.is_file():
        return ""
    first_error = None
    with path.open(encoding="utf-8", errors="replace") as handle:
        tail: deque[str] = deque(maxlen=n)
        for line in handle:
            if first_error is None and _EXCEPTION.match(line):
                first_error = line
            tail.append(line)
    text = "".join(tail).rstrip()
    if first_error is not None and first_error not in tail:
        text = f"first error: {first_error.rstrip()}\n...\n{text}"
    return text


def run_logged(args: list[str], log_path: Path, what: str, env: dict[str, str] | None = None) -> None:
    """Run a program with its stdout and stderr streamed to ``log_path``.

    Raises:
        PairtraceError: The program could not start or exited with a non-zero code (the message names the log file
            and quotes its last lines).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("%s: logging to %s", what, log_path)
    with log_path.open("w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(args) + "\n")
        log.flush()
        try:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        except OSError as exc:
            raise PairtraceError(f"{what}: could not start {args[0]!r}: {exc}") from None
        with owned(process):  # ends with this process (an orphaned launcher would hold its GPUs)
            code = process.wait()
    if code != 0:
        raise PairtraceError(f"{what} failed with exit code {code}; log: {log_path}; last lines:\n"
                             f"{last_lines(log_path)}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _default_processes() -> int:
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def accelerate_command(request_file: Path, options: Any, num_processes: int | None) -> list[str]:
    """The ``accelerate launch`` command line of an ``accelerate`` retrain.

    Args:
        request_file: The request JSON the workers read.
        options: The :class:`~pairtrace.retrain.engine_options.RetrainEngineOptions`.
        num_processes: Processes to start (None: the accelerate config file's).
    """
    args = [sys.executable, "-m", "accelerate.commands.launch"]
    extra = list(options.launcher_args)
    if options.accelerate_config:
        args += ["--config_file", str(options.accelerate_config)]
        if num_processes is not None:
            args += ["--num_processes", str(num_processes)]
    else:
        n = num_processes or 1
        args += ["--num_machines", "1", "--num_processes", str(n), "--mixed_precision", "no",
                 "--dynamo_backend", "no"]
        if n > 1:
            args.append("--multi_gpu")  # accelerate's torchrun launcher: N processes (gloo on a CPU-only machine)
    if (num_processes or 0) > 1 and "--main_process_port" not in extra:
        args += ["--main_process_port", str(_free_port())]  # concurrent retrains must not share a port
    return [*args, *extra, "-m", "pairtrace.retrain.accelerate_worker", str(request_file)]


def retrain_with_accelerate(request: RetrainRequest) -> RetrainSummary:
    """TRL's ``DPOTrainer`` under ``accelerate launch`` (see :mod:`pairtrace.retrain.accelerate_worker`).

    Raises:
        ConfigError: A hub M0 with a revision, a missing accelerate config file, or a batch that cannot be split.
        PairtraceError: The launch failed or left no model (the message names the log file).
    """
    from pairtrace.retrain.accelerate_worker import batch_split

    options = request.options
    if request.m0.revision is not None:
        raise ConfigError("the accelerate retrain engine trains from a local M0 folder; download the pinned revision "
                          f"of {request.m0.name_or_path!r} first and point models.m0 at it")
    if options.accelerate_config and not Path(options.accelerate_config).is_file():
        raise ConfigError(f"retrain accelerate_config: file not found: {options.accelerate_config}")
    num_processes = options.num_processes
    if num_processes is None and not options.accelerate_config:
        num_processes = _default_processes()
    if num_processes is not None:
        batch_split(request.recipe.batch_size, num_processes, options.per_device_batch_size)  # refuse early
    folder = retrain_dir_of(request)
    model_dir = Path(request.model_dir).resolve()
    shutil.rmtree(model_dir, ignore_errors=True)  # a stale folder must not pass for this retrain's model
    summary_file = folder / SUMMARY_FILE
    summary_file.unlink(missing_ok=True)
    work_dir = folder / WORK_DIR
    shutil.rmtree(work_dir, ignore_errors=True)
    request_file = write_json_atomic({
        "m0": str(Path(request.m0.name_or_path).resolve()),
        "train_file": str(Path(request.train_file).resolve()),
        "model_dir": str(model_dir),
        "recipe": asdict(request.recipe),
        "options": asdict(options),
        "ref_cache_dir": None if request.ref_cache_dir is None else str(Path(request.ref_cache_dir).resolve()),
        "progress": request.progress,
        "summary_file": str(summary_file),
        "work_dir": str(work_dir),
    }, folder / REQUEST_FILE)
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the workers import this pairtrace, installed or not
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    started = time.perf_counter()
    log_path = folder / LOG_FILE
    run_logged(accelerate_command(request_file, options, num_processes), log_path, "accelerate retrain", env=env)
    shutil.rmtree(work_dir, ignore_errors=True)
    check_model_folder(model_dir, "accelerate")
    if not summary_file.is_file():
        raise PairtraceError(f"accelerate retrain wrote no summary ({summary_file}); log: {log_path}; last lines:\n"
                             f"{last_lines(log_path)}")
    info = json.loads(summary_file.read_text())
    return RetrainSummary(n_pairs=info.get("n_pairs"), steps=info.get("steps"), train_loss=info.get("train_loss"),
                          seconds=round(time.perf_counter() - started, 2), engine="accelerate")


def _count_records(path: Path) -> int:
    with path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def command_values(request: RetrainRequest, train_dir: Path | None, mixer_list: Path | None) -> dict[str, str]:
    """The value of every command placeholder for a request (paths absolute)."""
    recipe, model_dir = request.recipe, Path(request.model_dir).resolve()
    m0 = request.m0.name_or_path
    values: dict[str, Any] = {
        "m0": str(Path(m0).resolve()) if Path(m0).exists() else m0,
        "train_file": Path(request.train_file).resolve(),
        "train_dir": train_dir or "",
        "mixer_list": mixer_list or "",
        "model_dir": model_dir,
        "summary_file": model_dir / "summary.json",
        "retrain_dir": retrain_dir_of(request),
        "num_processes": request.options.num_processes or 1,
        **{name: getattr(recipe, name) for name in ("seed", "beta", "learning_rate", "lr_scheduler_type",
                                                      "warmup_ratio", "batch_size", "epochs", "max_length",
                                                      "loss_type", "label_smoothing", "sft_weight", "ema_decay")},
    }
    return {name: str(value) for name, value in values.items()}


def command_line(template: str, values: dict[str, str], shell: bool) -> list[str]:
    """The program and its arguments: the template split like a shell line, each argument filled with the values
    (no shell); or, with ``shell``, ``/bin/sh -c`` on the template filled with shell-quoted values."""
    if shell:
        return ["/bin/sh", "-c", template.format(**{k: shlex.quote(v) for k, v in values.items()})]
    return [arg.format(**values) for arg in shlex.split(template)]


def retrain_with_command(request: RetrainRequest) -> RetrainSummary:
    """A user command (e.g. open-instruct's DPO script) with the request's placeholders filled.

    The command must leave a Hugging Face model folder in ``{model_dir}``; it may write ``{summary_file}``
    (``{"n_pairs", "steps", "train_loss"}``), else the pairs are counted here and steps and loss are unknown.

    Raises:
        PairtraceError: The command failed or left no model folder (the message names the log file).
    """
    from pairtrace.retrain.engine_options import command_placeholders

    options = request.options
    template = str(options.command)
    names = set(command_placeholders(template))
    folder = retrain_dir_of(request)
    train_dir = mixer_list = None
    if names & {"train_dir", "mixer_list"}:
        from pairtrace.intervene import write_open_instruct_export

        train_dir = folder / "train"
        train_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(request.train_file, train_dir / "train.jsonl")
        export = write_open_instruct_export(request.train_file, train_dir / "open_instruct")
        mixer_list = Path(export["jsonl"]).resolve()
    model_dir = Path(request.model_dir).resolve()
    shutil.rmtree(model_dir, ignore_errors=True)  # a stale folder must not pass for this retrain's model
    values = command_values(request, train_dir.resolve() if train_dir else None, mixer_list)
    log_path = folder / LOG_FILE
    started = time.perf_counter()
    run_logged(command_line(template, values, options.shell), log_path, "retrain command")
    try:
        check_model_folder(model_dir, "command")
    except PairtraceError as exc:
        raise PairtraceError(f"{exc}; log: {log_path}; last lines:\n{last_lines(log_path)}") from None
    summary_path = model_dir / "summary.json"
    info: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if not isinstance(info, dict):
        raise PairtraceError(f"{summary_path}: expected a JSON object (n_pairs, steps, train_loss)")
    n_pairs = info.get("n_pairs")
    return RetrainSummary(
        n_pairs=int(n_pairs) if n_pairs is not None else _count_records(Path(request.train_file)),
        steps=None if info.get("steps") is None else int(info["steps"]),
        train_loss=None if info.get("train_loss") is None else float(info["train_loss"]),
        seconds=round(time.perf_counter() - started, 2), engine="command",
    )
