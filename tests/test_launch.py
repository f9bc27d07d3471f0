"""Launching a training stage: the allocation read from SLURM, the exact launcher commands, the
worker round trip, a real 2-process gloo run through the multi-node launch path, and the SLURM
profile's resources as the executor plugin turns them into sbatch arguments."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fgvlm import stages
from fgvlm.training import launch
from fgvlm.training.launch import LaunchPlan

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
WORKER = ["fgvlm.training.launch", "--args-json", "/runs/r/pretrain.state.launch.json"]


def no_scontrol(cmd: list[str]) -> None:
    """No SLURM client here: host lists fall back to the parser; job queries must not happen."""
    assert cmd[:3] != ["scontrol", "show", "job"], f"the environment was complete: {cmd}"
    return None


# --- host lists -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("gpu[01-04]", ["gpu01", "gpu02", "gpu03", "gpu04"]),
        ("a[1,3],b2", ["a1", "a3", "b2"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("r[1-2]-g[09-10],x", ["r1-g09", "r1-g10", "r2-g09", "r2-g10", "x"]),
        ("c[1,3-4]-ib", ["c1-ib", "c3-ib", "c4-ib"]),
    ],
)
def test_expand_hostlist(nodelist, hosts):
    assert launch.expand_hostlist(nodelist) == hosts


def test_expand_hostlist_rejects_malformed_lists():
    with pytest.raises(ValueError, match="unbalanced"):
        launch.expand_hostlist("gpu[01-04")
    with pytest.raises(ValueError, match="bad range"):
        launch.expand_hostlist("gpu[04-01]")


def test_hostnames_prefers_scontrol_and_falls_back_to_the_parser():
    calls = []

    def scontrol(cmd):
        calls.append(cmd)
        return "alpha\nbeta\n"

    assert launch.hostnames("weird[x]", scontrol) == ["alpha", "beta"]
    assert calls == [["scontrol", "show", "hostnames", "weird[x]"]]
    assert launch.hostnames("gpu[1-2]", lambda cmd: None) == ["gpu1", "gpu2"]


# --- plans from the environment ---------------------------------------------------------------


def slurm_env(nodes: int, nodelist: str, gpus: int | None, **extra: str) -> dict[str, str]:
    env = {
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NTASKS": str(nodes),
        "SLURM_CPUS_PER_TASK": "32",
        **extra,
    }
    if gpus is not None:
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
    return env


def test_one_node_cpu_trains_in_process():
    env = slurm_env(1, "node1", None, SLURM_CPUS_PER_TASK="4")
    plan = launch.plan_from_env(env, device="cpu", run=no_scontrol, cuda_count=lambda: 8)
    assert (plan.nodes, plan.launchers, plan.gpus_per_node, plan.processes) == (1, 1, 0, 1)
    assert plan.hosts == ("node1",)
    assert launch.launch_command(plan, WORKER) is None


def test_one_node_four_gpus_runs_torchrun_standalone():
    plan = launch.plan_from_env(slurm_env(1, "gpu07", 4), device="cuda", run=no_scontrol)
    assert (plan.nodes, plan.launchers, plan.gpus_per_node, plan.processes) == (1, 1, 4, 4)
    assert launch.launch_command(plan, WORKER, python="py") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
        "-m", *WORKER,
    ]  # fmt: skip


def test_four_nodes_by_four_gpus_run_one_torchrun_per_node_with_c10d():
    plan = launch.plan_from_env(slurm_env(4, "gpu[01-04]", 4), device="cuda", run=no_scontrol)
    assert plan == LaunchPlan(
        nodes=4,
        launchers=4,
        gpus_per_node=4,
        hosts=("gpu01", "gpu02", "gpu03", "gpu04"),
        port=29500 + 123456 % 10000,
        rdzv_id="123456",
        cpus_per_task=32,
    )
    assert plan.processes == 16 and plan.head_node == "gpu01"
    assert launch.launch_command(plan, WORKER, python="py") == [
        "srun", "--nodes", "4", "--ntasks", "4", "--ntasks-per-node", "1",
        "--cpus-per-task", "32", "--gres", "gpu:4", "--kill-on-bad-exit=1",
        "py", "-m", "torch.distributed.run", "--nnodes", "4", "--nproc-per-node", "4",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu01:32956", "--rdzv-id", "123456",
        "-m", *WORKER,
    ]  # fmt: skip


def test_accelerate_config_switches_the_launcher_to_accelerate_launch():
    plan = launch.plan_from_env(slurm_env(4, "gpu[01-04]", 4), device="cuda", run=no_scontrol)
    cmd = launch.launch_command(plan, WORKER, accelerate_config="cfg.yaml", python="py")
    assert cmd[cmd.index("py") :] == [
        "py", "-m", "accelerate.commands.launch", "--config_file", "cfg.yaml",
        "--num_machines", "4", "--num_processes", "16", "--machine_rank", "0",
        "--main_process_ip", "gpu01", "--main_process_port", "32956", "--rdzv_backend", "c10d",
        "-m", *WORKER,
    ]  # fmt: skip
    single = launch.plan_from_env(slurm_env(1, "gpu07", 2), device="cuda", run=no_scontrol)
    assert launch.launch_command(single, WORKER, accelerate_config="cfg.yaml", python="py") == [
        "py", "-m", "accelerate.commands.launch", "--config_file", "cfg.yaml",
        "--num_machines", "1", "--num_processes", "2", "--main_process_port", "0",
        "-m", *WORKER,
    ]  # fmt: skip


def test_stripped_jobstep_environment_is_read_back_from_scontrol():
    """The slurm-jobstep executor keeps only SLURM_JOB_ID: scontrol supplies the rest."""
    line = (
        "JobId=987 JobName=rule_pretrain UserId=u(1) NumNodes=4-4 NumCPUs=128 NumTasks=4 "
        "CPUs/Task=32 ReqNodeList=(null) ExcNodeList=(null) NodeList=gpu[11-14] "
        "BatchHost=gpu11 TRES=cpu=128,node=4,gres/gpu=16 Comment=rule pretrain wildcards"
    )
    calls = []

    def scontrol(cmd):
        calls.append(cmd)
        return line if cmd[:3] == ["scontrol", "show", "job"] else None

    env = {"SLURM_JOB_ID": "987", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    plan = launch.plan_from_env(env, device="cuda", run=scontrol)
    assert plan.hosts == ("gpu11", "gpu12", "gpu13", "gpu14")
    assert (plan.nodes, plan.launchers, plan.gpus_per_node, plan.cpus_per_task) == (4, 4, 4, 32)
    assert plan.rdzv_id == "987" and plan.port == 29500 + 987
    assert calls[0] == ["scontrol", "show", "job", "-o", "987"]


def test_two_tasks_on_one_host_emulate_two_nodes():
    """The single-node test cluster: 2 launcher tasks on localhost, gloo, one process each."""
    env = slurm_env(1, "localhost", None, SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="1")
    plan = launch.plan_from_env(env, device="cpu", run=no_scontrol)
    assert (plan.nodes, plan.launchers, plan.processes) == (1, 2, 2)
    cmd = launch.launch_command(plan, WORKER, python="py")
    assert cmd[:10] == [
        "srun", "--nodes", "1", "--ntasks", "2", "--ntasks-per-node", "2",
        "--cpus-per-task", "1", "--kill-on-bad-exit=1",
    ]  # fmt: skip
    assert "--gres" not in cmd and "--nnodes" in cmd
    # with GPUs, launchers sharing a host get their own share of its GPUs
    gpu_env = slurm_env(1, "localhost", 4, SLURM_NTASKS="2")
    gpu_plan = launch.plan_from_env(gpu_env, device="cuda", run=no_scontrol)
    assert (gpu_plan.gpus_per_node, gpu_plan.processes) == (2, 4)
    gpu_cmd = launch.launch_command(gpu_plan, WORKER, python="py")
    assert gpu_cmd[gpu_cmd.index("--gpus-per-task") + 1] == "2"


def test_outside_slurm_the_visible_gpus_decide():
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    plan = launch.plan_from_env(env, device="cuda", run=no_scontrol)
    assert (plan.nodes, plan.gpus_per_node, plan.processes) == (1, 2, 2)
    assert launch.plan_from_env(env, device="cpu", run=no_scontrol).processes == 1
    assert (
        launch.plan_from_env({}, device="cuda", run=no_scontrol, cuda_count=lambda: 3).processes
        == 3
    )
    assert launch.plan_from_env({"CUDA_VISIBLE_DEVICES": ""}, device="cuda").processes == 1
    assert launch.visible_gpus({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}) == 0


def test_inconsistent_or_missing_node_list_is_an_error():
    with pytest.raises(ValueError, match="not 4 nodes"):
        launch.plan_from_env(slurm_env(4, "gpu[01-03]", 4), device="cuda", run=no_scontrol)
    env = {"SLURM_JOB_ID": "5", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"}
    with pytest.raises(ValueError, match="rendezvous host is unknown"):
        launch.plan_from_env(env, device="cuda", run=lambda cmd: None)


def test_already_distributed():
    assert launch.already_distributed({"RANK": "0", "WORLD_SIZE": "2"})
    assert not launch.already_distributed({"SLURM_JOB_ID": "1"})


# --- the accelerate config files --------------------------------------------------------------


@pytest.mark.parametrize("name", ["fsdp_4x4.yaml", "deepspeed_zero3_4x4.yaml"])
def test_accelerate_configs_parse_with_accelerates_own_launcher(name):
    """accelerate's launcher reads each file and the command's overrides as intended."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    port = free_port()
    plan = LaunchPlan(4, 4, 4, ("gpu01", "gpu02", "gpu03", "gpu04"), port, "1", 32)
    config = ROOT / "config" / "accelerate" / name
    assert yaml.safe_load(config.read_text())["num_processes"] == 16  # 4 machines x 4
    cmd = launch.launch_command(plan, WORKER, accelerate_config=config, python="py")
    args = launch_command_parser().parse_args(cmd[cmd.index("accelerate.commands.launch") + 1 :])
    _validate_launch_command(args)
    assert (args.num_machines, args.num_processes, args.mixed_precision) == (4, 16, "bf16")
    assert (args.module, args.training_script, args.training_script_args) == (
        True,
        "fgvlm.training.launch",
        WORKER[1:],
    )
    if args.use_fsdp:
        env = prepare_multi_gpu_env(args)
        assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
        assert env["FSDP_USE_ORIG_PARAMS"] == "true"
        assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
        assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "true"
    else:
        assert args.use_deepspeed
        args.deepspeed_fields_from_accelerate_config = ""
        _, env = prepare_deepspeed_cmd_env(args)
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
        assert args.deepspeed_multinode_launcher == "standard"  # torchrun, not pdsh/ssh
    # the trainer's accumulation must not be overridden by the launcher
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert (args.rdzv_endpoint, args.nnodes, args.nproc_per_node) == (f"gpu01:{port}", "4", "4")


# --- the worker round trip --------------------------------------------------------------------


def test_run_or_launch_in_process_and_worker_main_round_trip(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(stages, "train_stage", lambda **kw: seen.append(kw) or {"ok": 1})
    kwargs = {
        "spec": {"recipe": {"stage": "pretrain"}, "seed": 3},
        "out_dir": tmp_path / "out",
        "state_dir": tmp_path / "state",
        "data_dir": "shards/train/x",
        "clip_dir": None,
        "device": "cpu",
        "checkpoint_every": 7,
    }
    direct = []
    code = launch.run_or_launch(
        kwargs,
        state_dir=tmp_path / "state",
        plan=LaunchPlan(),
        train_in_process=lambda **kw: direct.append(kw),
        env={},
    )
    assert code == 0 and direct == [kwargs]
    args_json = tmp_path / "state.launch.json"  # beside the state folder the trainer may wipe
    assert launch.launch_args_path(tmp_path / "state") == args_json
    payload = json.loads(args_json.read_text())
    assert payload["entry"] == "fgvlm.stages:train_stage"
    assert payload["plan"]["launchers"] == 1
    assert launch.worker_main(args_json) == {"ok": 1}
    expected = {**kwargs, "out_dir": str(tmp_path / "out"), "state_dir": str(tmp_path / "state")}
    assert seen == [expected]


def test_worker_refuses_entries_outside_fgvlm(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"entry": "os:system", "kwargs": {"command": "true"}}))
    with pytest.raises(ValueError, match="fgvlm"):
        launch.worker_main(path)


def fake_srun(tmp_path: Path, exit_code: int | None = None) -> dict[str, str]:
    """A ``srun`` on PATH that starts --ntasks copies of its command here (or exits with a code)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    body = (
        f"exit {exit_code}\n"
        if exit_code is not None
        else (
            'n=1\nwhile [ $# -gt 0 ]; do case "$1" in\n'
            "  --ntasks) n=$2; shift 2;;\n  --*=*) shift;;\n  --*) shift 2;;\n"
            "  *) break;;\nesac; done\n"
            'pids=""\nfor i in $(seq 0 $((n-1))); do SLURM_PROCID=$i "$@" & pids="$pids $!"; done\n'
            # like --kill-on-bad-exit: the first failure ends the other tasks, never a hang
            "rc=0\nfor _ in $pids; do wait -n; s=$?\n"
            "  if [ $s -ne 0 ] && [ $rc -eq 0 ]; then rc=$s; kill $pids 2>/dev/null; fi\n"
            "done\nexit $rc\n"
        )
    )
    srun = bindir / "srun"
    srun.write_text("#!/bin/bash\n" + body)
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_launchers_join_one_gloo_group_through_the_srun_path(tmp_path):
    """The multi-node path for real: srun (faked: 2 tasks here) starts 2 torchrun agents that
    meet at a c10d rendezvous; each worker joins via accelerate's PartialState and all-reduces."""
    env = fake_srun(tmp_path)
    plan = LaunchPlan(1, 2, 0, ("localhost",), free_port(), "test", 1)
    out = tmp_path / "probe.json"
    started = time.perf_counter()
    code = launch.run_or_launch(
        {"out_json": str(out), "device": "cpu"},
        state_dir=tmp_path / "state",
        plan=plan,
        entry="fgvlm.training.launch:probe_distributed",
        env=env,
    )
    elapsed = time.perf_counter() - started
    assert code == 0
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["ranks"] == [0, 1]
    assert result["sum"] == result["expected_sum"] == 3.0
    assert result["backend"] == "gloo"
    assert elapsed < 60, f"the 2-process run took {elapsed:.0f} s"


def test_a_failing_launch_returns_its_exit_code(tmp_path):
    env = fake_srun(tmp_path, exit_code=3)
    plan = LaunchPlan(2, 2, 0, ("a", "b"), free_port(), "x", None)
    code = launch.run_or_launch(
        {"device": "cpu"}, state_dir=tmp_path / "state", plan=plan, env=env, train_in_process=None
    )
    assert code == 3


def test_worker_destroys_its_process_group_before_exiting(tmp_path, monkeypatch):
    """A worker leaves no process group to interpreter shutdown: torn down there, its gloo and
    store threads abort the process now and then (SIGABRT after the work is done: a failed rank,
    a failed job, a retry)."""
    import torch.distributed as dist

    from fgvlm import logs

    def entry_with_a_group(args_json) -> None:  # noqa: ARG001
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    monkeypatch.setattr(launch, "worker_main", entry_with_a_group)
    monkeypatch.setattr(logs, "setup", lambda *args, **kwargs: None)
    try:
        assert launch.main(["--args-json", str(tmp_path / "unused.json")]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_launch_off_the_main_thread_runs_without_forwarding_signals(tmp_path):
    """signal.signal only works in the main thread: a launch from another thread (a `run:`
    block) still runs the launcher and returns its code, and the main thread's SIGTERM
    handler is left alone."""
    import signal
    import threading

    env = fake_srun(tmp_path, exit_code=5)
    plan = LaunchPlan(2, 2, 0, ("a", "b"), free_port(), "x", None)
    before = signal.getsignal(signal.SIGTERM)
    codes: list[object] = []

    def launch_in_thread() -> None:
        try:
            codes.append(
                launch.run_or_launch(
                    {"device": "cpu"}, state_dir=tmp_path / "s", plan=plan, env=env
                )
            )
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            codes.append(exc)

    thread = threading.Thread(target=launch_in_thread)
    thread.start()
    thread.join(timeout=60)
    assert codes == [5]
    assert signal.getsignal(signal.SIGTERM) is before


def test_probe_runs_in_a_single_process(tmp_path):
    from accelerate.state import PartialState

    fresh = not PartialState._shared_state
    try:
        result = launch.probe_distributed(str(tmp_path / "p.json"))
    finally:
        if fresh:
            PartialState._reset_state()  # leave accelerate's singleton as other tests found it
    assert result["world_size"] == 1 and result["sum"] == 1.0
    assert json.loads((tmp_path / "p.json").read_text())["ranks"] == [0]


# --- the SLURM profile ------------------------------------------------------------------------

PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"


def test_profile_gives_training_four_nodes_by_four_gpus_one_task_per_node():
    profile = yaml.safe_load(PROFILE.read_text())
    assert profile["executor"] == "slurm"
    for rule in ("pretrain", "finetune"):
        res = profile["set-resources"][rule]
        assert res["nodes"] == 4 and res["tasks"] == res["nodes"]  # one launcher per node
        assert res["gres"] == "gpu:4" and res["gpu"] == 0  # per-node GPUs, no job-total --gpus
        assert res["tasks_per_gpu"] == 0 and res["mpi"] == "srun"
        assert res["cpus_per_task"] == 32
    for rule in ("mine_questions", "eval_clip", "eval_vlm"):
        assert profile["set-resources"][rule] == {"gpu": 1, "tasks_per_gpu": 0}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir)]
        + list(args),
        cwd=workdir,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def dry_run_resources(workdir: Path) -> dict[str, dict]:
    """Rule -> resources of its first job in the paper config's dry-run with the SLURM profile."""
    proc = snakemake(workdir, "--profile", str(PROFILE), "-n", "all_training", "all")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found: dict[str, dict] = {}
    for block in proc.stdout.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0]
        match = re.search(r"^\s+resources: (.*)$", block, flags=re.MULTILINE)
        if match and rule not in found:
            pairs = (item.split("=", 1) for item in match.group(1).split(", "))
            found[rule] = {k: int(v) if v.isdigit() else v for k, v in pairs}
    return found


class FakeJob:
    """What get_submit_command reads from a Snakemake job."""

    def __init__(self, resources: dict):
        self.resources = SimpleNamespace(**resources)
        self.resources.get = resources.get
        self.threads = 1


def sbatch_args(resources: dict) -> str:
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    job = FakeJob(resources)
    validate_slurm_extra(job)  # raises on options the plugin sets itself
    params = {
        "run_uuid": "u",
        "slurm_logfile": "log",
        "comment_str": "c",
        "account": "-A acct",
        "partition": "-p part",
        "workdir": ".",
    }
    return get_submit_command(job, params) + set_gres_string(job)


def test_plugin_turns_the_profile_into_the_intended_sbatch_arguments(tmp_path):
    """config resources + profile set-resources, as Snakemake merges them, through the plugin's
    own sbatch builder: training is 4 nodes x 4 GPUs, 1 task each; eval 1 GPU; downloads CPU."""
    res = dry_run_resources(tmp_path)
    assert {"pretrain", "finetune", "eval_clip", "build_manifest"} <= set(res)
    for rule in ("pretrain", "finetune"):
        args = sbatch_args(res[rule]).split()
        assert {"--nodes=4", "--ntasks=4", "--gres=gpu:4", "--cpus-per-task=32"} <= set(args)
        assert not any(a.startswith(("--gpus", "--ntasks-per-gpu")) for a in args), args
        assert "--signal=TERM@300" in args
    gpu_job = sbatch_args(res["eval_clip"]).split()
    assert "--gpus=1" in gpu_job and not any(a.startswith("--ntasks") for a in gpu_job)
    cpu_job = sbatch_args(res["build_manifest"]).split()
    assert "--ntasks=1" in cpu_job and not any("gpu" in a for a in cpu_job)


def test_profile_names_only_rules_that_exist(tmp_path):
    proc = snakemake(tmp_path, "--list-rules")
    assert proc.returncode == 0, proc.stderr
    rules = set(proc.stdout.split())
    profile = yaml.safe_load(PROFILE.read_text())
    assert set(profile["set-resources"]) <= rules
