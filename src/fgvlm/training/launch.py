"""Start a training stage on what the job was given: one CPU process, 1 node x N GPUs, or N x G.

A Snakemake job calls ``run_or_launch``. It reads the allocation (``plan_from_env``) and either
trains in this process (one CPU or one GPU), or starts one process per GPU:

- one node, G > 1 GPUs: ``torchrun --standalone --nproc-per-node G`` here;
- several nodes: ``srun`` starts one launcher per node (``--ntasks-per-node 1``) and the
  launchers meet through a c10d rendezvous on the first node (``--rdzv-endpoint HEAD:PORT``).

The launcher is torchrun (``python -m torch.distributed.run``), or ``accelerate launch`` when an
accelerate config file (FSDP, DeepSpeed; ``config/accelerate/``) is given: accelerate turns the
file into the ``ACCELERATE_*``/``FSDP_*`` variables that ``Accelerator()`` reads in each worker.
Every worker runs ``python -m fgvlm.training.launch --args-json PATH``: the stage's arguments, written
as JSON next to the state folder, go to ``fgvlm.stages.train_stage``; accelerate's ``PartialState``
then picks up RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR from the launcher.

Under the SLURM executor the training rules set ``mpi`` so the job's command runs in the batch
step on the first node, where ``srun`` may start a step on every node. The jobstep executor
clears the ``SLURM_*`` variables but ``SLURM_JOB_ID``, so the allocation is read back with
``scontrol show job`` when the variables are missing.

Sharded training and frozen weights: FSDP with ``use_orig_params`` follows ``requires_grad``
changes made after wrapping; DDP and DeepSpeed ZeRO-3 register the trainable parameters once,
at ``prepare``, so with them every weight that ever learns must require grad from the start.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fgvlm import io

log = logging.getLogger(__name__)

TRAIN_ENTRY = "fgvlm.stages:train_stage"
ARGS_SUFFIX = ".launch.json"  # runs/<run>/pretrain.state -> runs/<run>/pretrain.state.launch.json
BASE_PORT = 29500
PORT_SPAN = 10000  # rendezvous ports 29500..39499, one per job id

Runner = Callable[[list[str]], str | None]  # runs a command, returns stdout or None on failure


@dataclass(frozen=True)
class LaunchPlan:
    """Where a stage's processes run.

    ``nodes``: machines in the allocation; ``launchers``: torchrun/accelerate agents (one per
    node on a real cluster; a single-node test cluster may run several on one host);
    ``gpus_per_node``: GPUs each launcher drives (0: CPU, one process per launcher);
    ``hosts``: the allocation's host names, the first is the rendezvous host.
    """

    nodes: int = 1
    launchers: int = 1
    gpus_per_node: int = 0
    hosts: tuple[str, ...] = ()
    port: int = BASE_PORT
    rdzv_id: str = "local"
    cpus_per_task: int | None = None

    @property
    def procs_per_node(self) -> int:
        """Processes each launcher starts: one per GPU, or one on CPU."""
        return max(1, self.gpus_per_node)

    @property
    def processes(self) -> int:
        """The world size."""
        return self.launchers * self.procs_per_node

    @property
    def head_node(self) -> str:
        return self.hosts[0] if self.hosts else "localhost"


# --- reading the allocation --------------------------------------------------------------------


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list to names: ``"gpu[01-03],cpu7"`` -> gpu01, gpu02, gpu03, cpu7.

    Handles comma lists of names with any number of bracket groups (``rack[1-2]-n[08-09]``),
    ranges keeping their zero padding, and comma lists inside brackets (``a[1,3-4]``).
    """
    hosts: list[str] = []
    for item in _split_outside_brackets(hostlist.strip()):
        hosts.extend(_expand_one(item))
    return hosts


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ValueError(f"host list {text!r}: unbalanced brackets")
    parts.append("".join(current))
    return [p for p in parts if p]


def _expand_one(item: str) -> list[str]:
    match = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", item)
    if not match:
        return [item]
    prefix, ranges, rest = match.groups()
    names = []
    for part in ranges.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"host list item {item!r}: bad range {part!r}")
            names += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            names.append(f"{prefix}{part}")
    return [name + tail for name in names for tail in _expand_one(rest)]


def _run(cmd: list[str]) -> str | None:
    """Run a SLURM client command; None when it is missing or fails (then the env must do)."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def hostnames(nodelist: str, run: Runner = _run) -> list[str]:
    """Host names of a SLURM node list: ``scontrol show hostnames``, else the Python parser."""
    if "[" not in nodelist:
        return [name for name in nodelist.split(",") if name]
    out = run(["scontrol", "show", "hostnames", nodelist])
    names = out.split() if out else []
    return names or expand_hostlist(nodelist)


def parse_scontrol_job(text: str) -> dict[str, str]:
    """The fields we need from ``scontrol show job -o`` (one ``Key=Value`` line per job)."""
    fields = {}
    for key in ("NumNodes", "NumTasks", "CPUs/Task", "NodeList", "BatchHost"):
        match = re.search(rf"(?:^|\s){re.escape(key)}=(\S+)", text)
        if match:
            fields[key] = match.group(1)
    return fields


def _first_int(value: str | None) -> int | None:
    """``"4"`` -> 4, ``"4-4"`` (scontrol's node range) -> 4, ``"N/A"``/None -> None."""
    match = re.match(r"^(\d+)", value or "")
    return int(match.group(1)) if match else None


def visible_gpus(env: Mapping[str, str], cuda_count: Callable[[], int] | None = None) -> int:
    """GPUs this node's job may use: SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES, or CUDA's count."""
    on_node = _first_int(env.get("SLURM_GPUS_ON_NODE"))
    if on_node is not None:
        return on_node
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # SLURM writes NoDevFiles when the job has the gres but the node lists no device files
        return len([d for d in visible.split(",") if d.strip() and d != "NoDevFiles"])
    if cuda_count is None:
        return _cuda_device_count()
    return cuda_count()


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def rendezvous_port(job_id: str) -> int:
    """A port derived from the job id, so two jobs sharing a head node do not collide."""
    digits = re.sub(r"\D", "", job_id)
    return BASE_PORT + (int(digits) % PORT_SPAN if digits else 0)


def plan_from_env(
    env: Mapping[str, str] | None = None,
    *,
    device: str = "cuda",
    run: Runner = _run,
    cuda_count: Callable[[], int] | None = None,
) -> LaunchPlan:
    """The launch plan of this job, from SLURM's variables (or ``scontrol``) and the GPUs seen.

    Outside SLURM: one node. ``device="cpu"`` means no GPUs whatever the machine has.
    ``run`` executes ``scontrol`` (tests pass a fake); ``cuda_count`` replaces torch's count.
    """
    env = os.environ if env is None else env
    gpus = 0 if device == "cpu" else visible_gpus(env, cuda_count)
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return LaunchPlan(gpus_per_node=gpus, hosts=("localhost",))

    nodes = _first_int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES"))
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    tasks = _first_int(env.get("SLURM_NTASKS"))
    cpus = _first_int(env.get("SLURM_CPUS_PER_TASK"))
    if None in (nodes, nodelist, tasks, cpus):
        # the jobstep executor keeps only SLURM_JOB_ID: ask the controller
        info = parse_scontrol_job(run(["scontrol", "show", "job", "-o", job_id]) or "")
        nodes = nodes or _first_int(info.get("NumNodes"))
        nodelist = nodelist or info.get("NodeList")
        tasks = tasks or _first_int(info.get("NumTasks"))
        cpus = cpus or _first_int(info.get("CPUs/Task"))
    nodes = nodes or 1
    hosts = tuple(hostnames(nodelist, run)) if nodelist else ()
    if hosts and len(hosts) != nodes:
        raise ValueError(f"SLURM job {job_id}: node list {nodelist!r} is not {nodes} nodes")
    if nodes > 1 and not hosts:
        raise ValueError(
            f"SLURM job {job_id}: {nodes} nodes but no node list (SLURM_JOB_NODELIST is unset "
            "and `scontrol show job` gave none): the rendezvous host is unknown"
        )
    launchers = max(nodes, tasks or nodes)
    if launchers > nodes and gpus:
        gpus //= launchers // nodes  # several launchers per host share its GPUs
    return LaunchPlan(
        nodes=nodes,
        launchers=launchers,
        gpus_per_node=gpus,
        hosts=hosts,
        port=rendezvous_port(job_id),
        rdzv_id=job_id,
        cpus_per_task=cpus,
    )


def already_distributed(env: Mapping[str, str] | None = None) -> bool:
    """True inside a process started by torchrun/accelerate (RANK and WORLD_SIZE are set)."""
    env = os.environ if env is None else env
    return "RANK" in env and "WORLD_SIZE" in env


# --- the command -------------------------------------------------------------------------------


def launch_command(
    plan: LaunchPlan,
    module_args: list[str],
    *,
    accelerate_config: str | Path | None = None,
    python: str | None = None,
) -> list[str] | None:
    """The command that runs ``python -m <module_args>`` on every process of ``plan``.

    None when one process is enough (train in this process). ``accelerate_config`` switches the
    launcher from torchrun to ``accelerate launch --config_file`` (GPU plans only: accelerate
    launches CPU processes through MPI, torchrun through gloo).
    """
    if plan.processes <= 1:
        return None
    python = python or sys.executable
    multi_node = plan.launchers > 1
    if accelerate_config and plan.gpus_per_node:
        launcher = [python, "-m", "accelerate.commands.launch", "--config_file"]
        launcher += [str(accelerate_config), "--num_machines", str(plan.launchers)]
        launcher += ["--num_processes", str(plan.processes)]
        if multi_node:
            launcher += ["--machine_rank", "0"]  # ignored by the c10d rendezvous
            launcher += ["--main_process_ip", plan.head_node]
            launcher += ["--main_process_port", str(plan.port), "--rdzv_backend", "c10d"]
        else:
            launcher += ["--main_process_port", "0"]  # a free port
    else:
        launcher = [python, "-m", "torch.distributed.run"]
        if multi_node:
            launcher += ["--nnodes", str(plan.launchers)]
            launcher += ["--nproc-per-node", str(plan.procs_per_node)]
            launcher += ["--rdzv-backend", "c10d"]
            launcher += ["--rdzv-endpoint", f"{plan.head_node}:{plan.port}"]
            launcher += ["--rdzv-id", plan.rdzv_id]
        else:
            launcher += ["--standalone", "--nproc-per-node", str(plan.procs_per_node)]
    launcher += ["-m", *module_args]
    if not multi_node:
        return launcher
    per_node = plan.launchers // plan.nodes
    srun = ["srun", "--nodes", str(plan.nodes), "--ntasks", str(plan.launchers)]
    srun += ["--ntasks-per-node", str(per_node)]
    if plan.cpus_per_task:
        # srun (SLURM >= 22.05) no longer inherits --cpus-per-task from the batch job
        srun += ["--cpus-per-task", str(plan.cpus_per_task)]
    if plan.gpus_per_node and per_node == 1:
        srun += ["--gres", f"gpu:{plan.gpus_per_node}"]  # the job's own per-node request
    elif plan.gpus_per_node:
        srun += ["--gpus-per-task", str(plan.gpus_per_node)]  # launchers sharing a host split it
    srun += ["--kill-on-bad-exit=1"]  # one dead launcher ends the step, never a hang
    return srun + launcher


# --- running -----------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Paths become strings; the rest must already be JSON."""
    return json.loads(json.dumps(value, default=str))


def _resolve(entry: str) -> Callable[..., Any]:
    """``"fgvlm.module:function"`` -> the function (only fgvlm's own entry points)."""
    module, _, name = entry.partition(":")
    if not module.startswith("fgvlm.") or not name:
        raise ValueError(f"launch entry {entry!r}: expected 'fgvlm.<module>:<function>'")
    return getattr(importlib.import_module(module), name)


def launch_args_path(state_dir: str | Path) -> Path:
    """Where a stage's launch arguments go: beside its state folder, which the trainer may wipe."""
    state_dir = Path(state_dir).resolve()
    return state_dir.with_name(state_dir.name + ARGS_SUFFIX)


def write_launch_args(
    kwargs: dict[str, Any], state_dir: str | Path, *, entry: str = TRAIN_ENTRY, plan=None
) -> Path:
    """Write {"entry", "kwargs", "plan"} to ``launch_args_path(state_dir)``; return that path."""
    path = launch_args_path(state_dir)
    payload = {"entry": entry, "kwargs": _jsonable(kwargs)}
    if plan is not None:
        payload["plan"] = asdict(plan)
    io.write_json(payload, path)
    return path


def worker_main(args_json: str | Path) -> Any:
    """Load a launch-args file and call its entry (``fgvlm.stages.train_stage``) with its kwargs."""
    payload = io.read_json(args_json)
    if "kwargs" not in payload:
        raise ValueError(f"{args_json}: no 'kwargs' key")
    return _resolve(payload.get("entry", TRAIN_ENTRY))(**payload["kwargs"])


def run_or_launch(
    kwargs: dict[str, Any],
    *,
    state_dir: str | Path,
    plan: LaunchPlan | None = None,
    accelerate_config: str | Path | None = None,
    entry: str = TRAIN_ENTRY,
    train_in_process: Callable[..., Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run ``entry(**kwargs)`` in this process or on every process of the allocation.

    ``kwargs`` are the stage's arguments (``fgvlm.stages.train_stage``'s, ``device`` included);
    they are written to ``launch_args_path(state_dir)`` either way. ``plan`` defaults to
    ``plan_from_env(device=kwargs["device"])``. Returns the exit code: 0 after an in-process
    run (errors raise), the launcher's code otherwise (the caller exits with it).
    """
    env = os.environ if env is None else env
    if plan is None:
        plan = plan_from_env(env, device=kwargs.get("device", "cpu"))
    args_json = write_launch_args(kwargs, state_dir, entry=entry, plan=plan)
    cmd = None
    if not already_distributed(env):
        module_args = ["fgvlm.training.launch", "--args-json", str(args_json)]
        cmd = launch_command(plan, module_args, accelerate_config=accelerate_config)
    if cmd is None:
        log.info("training in this process (%s)", plan)
        (train_in_process or _resolve(entry))(**kwargs)
        return 0
    log.info("launching %d processes on %d node(s): %s", plan.processes, plan.nodes, cmd)
    return _run_forwarding_signals(cmd, _child_env(env, plan))


def _child_env(env: Mapping[str, str], plan: LaunchPlan) -> dict[str, str]:
    child = dict(env)
    child.setdefault("PYTHONUNBUFFERED", "1")
    if plan.cpus_per_task and "OMP_NUM_THREADS" not in child:
        # torchrun would set 1 thread per process; use the task's share of its CPUs instead
        child["OMP_NUM_THREADS"] = str(max(1, plan.cpus_per_task // plan.procs_per_node))
    return child


def _stream(handle) -> int | None:
    """A file descriptor for the child's output (the job's log when logs.setup redirected it)."""
    try:
        return handle.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd``; pass SIGTERM on (SLURM's warning before a kill: workers checkpoint)."""
    out = _stream(sys.stderr)
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)

    def forward(signum, frame) -> None:  # noqa: ARG001
        proc.send_signal(signum)

    if threading.current_thread() is not threading.main_thread():
        # signal.signal raises ValueError off the main thread (a Snakemake `run:` block, a
        # test's thread): run without forwarding; the launcher still gets SLURM's kill
        return proc.wait()
    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- a distributed smoke test ------------------------------------------------------------------


def probe_distributed(out_json: str, device: str = "cpu") -> dict:
    """Join the process group the way the trainer does and all-reduce each rank's number.

    Rank 0 writes {"world_size", "sum", "expected_sum", "ranks", "hosts", "backend"} to
    ``out_json``: proof that every rank joined. A launch entry, like ``train_stage``.
    """
    import socket

    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    value = torch.tensor([float(state.process_index + 1)], device=state.device)
    if state.num_processes > 1:
        dist.all_reduce(value)
    gathered = [None] * state.num_processes
    if state.num_processes > 1:
        dist.all_gather_object(gathered, (state.process_index, socket.gethostname()))
    else:
        gathered = [(0, socket.gethostname())]
    n = state.num_processes
    result = {
        "world_size": n,
        "sum": float(value.item()),
        "expected_sum": n * (n + 1) / 2,
        "ranks": sorted(rank for rank, _ in gathered),
        "hosts": sorted({host for _, host in gathered}),
        "backend": state.backend,
    }
    if state.is_main_process:
        io.write_json(result, out_json)
    state.wait_for_everyone()
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m fgvlm.training.launch --args-json PATH``: one worker of a launched stage."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from fgvlm import logs

    parser = argparse.ArgumentParser(
        prog="python -m fgvlm.training.launch", description=main.__doc__
    )
    parser.add_argument("--args-json", required=True, type=Path)
    args = parser.parse_args(argv)
    logs.setup()
    record(worker_main)(args.args_json)  # torchrun reports the failing rank's traceback
    close_process_group()
    return 0


def close_process_group() -> None:
    """Destroy the default process group, if the entry made one, before the worker exits.

    Left to interpreter shutdown, its gloo/store threads are torn down while still joinable:
    ``terminate called without an active exception`` and SIGABRT, now and then, after the
    stage's work is done, so torchrun reports a failed rank and the job fails.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
