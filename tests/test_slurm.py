"""The workflow on a real SLURM cluster: a single-node cluster on localhost (tests/slurm/cluster.sh:
slurmctld, slurmd with 4 fake GPUs, slurmdbd accounting), driven by Snakemake's SLURM executor
with the paper's profile (profiles/slurm) or a variant derived from it
(tests/slurm/local_profile.py).

Where the cluster cannot start (not root, no apt, no Debian mirror) these tests are skipped with
the reason; under CI (CI=true, set by .ci/run, which starts the cluster first) that is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
CANNOT_START = 77  # cluster.sh's "cannot start here" exit code
PY = sys.executable
SNAKEMAKE = [PY, "-m", "snakemake"]


def _load_local_profile():
    spec = importlib.util.spec_from_file_location(
        "fgvlm_local_profile", ROOT / "tests" / "slurm" / "local_profile.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lp = _load_local_profile()


# --- the cluster ------------------------------------------------------------------------------


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm_cluster():
    """The running test cluster: started here unless it already runs (then left running)."""
    already = subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True)
    started = time.perf_counter()
    proc = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    if proc.returncode == CANNOT_START:
        reason = (proc.stderr or proc.stdout).strip().splitlines()[-1]
        if in_ci():
            pytest.fail(f"CI=true but the SLURM test cluster cannot start: {reason}")
        pytest.skip(f"SLURM test cluster not available: {reason}")
    assert proc.returncode == 0, f"cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}"
    print(f"\nSLURM test cluster ready in {seconds:.1f} s: {proc.stdout.strip()}")
    yield {"start_seconds": seconds}
    if already.returncode != 0:  # this session started it: leave the machine as found
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120)


def node_size() -> tuple[int, int]:
    """CPUs and MB of the test cluster's node, as slurmctld reports them."""
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-n", "localhost", "-o", "%c %m"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def local_profile_dir(tmp: Path, *, launchers: int = 1) -> Path:
    cpus, mem_mb = node_size()
    profile = lp.local_profile(lp.load_paper(), cpus=cpus, mem_mb=mem_mb, launchers=launchers)
    return lp.write_profile(profile, tmp / f"profile-local-{launchers}")


def run_env() -> dict[str, str]:
    # one torch thread everywhere: SLURM and local runs compute the same floats
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def start_snakemake(
    workdir: Path, *args: str, snakefile: Path = ROOT / "Snakefile"
) -> subprocess.Popen:
    cmd = [*SNAKEMAKE, "--snakefile", str(snakefile), "--directory", str(workdir), *args]
    return subprocess.Popen(
        cmd, cwd=workdir, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 900) -> subprocess.CompletedProcess:
    """Wait for a Snakemake run; one past ``timeout`` is interrupted (Snakemake then cancels its
    SLURM jobs) and the test fails: a hang is a failure, never a wait forever."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # Snakemake cancels its SLURM jobs on SIGINT
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{proc.args[3:]} still ran after {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def snakemake(
    workdir: Path,
    *args: str,
    snakefile: Path = ROOT / "Snakefile",
    timeout: float = 900,
    on_start: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess:
    """Run Snakemake in ``workdir`` (``finish``); ``on_start`` runs once it has started."""
    proc = start_snakemake(workdir, *args, snakefile=snakefile)
    if on_start is not None:
        on_start()
    return finish(proc, timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"{proc.args[3:]} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


def newest_log(workdir: Path) -> str:
    """Snakemake's own log of the latest run in ``workdir`` (.snakemake/log/*.snakemake.log)."""
    logs = sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))
    assert logs, f"no Snakemake log in {workdir}"
    return logs[-1].read_text()


def sbatch_calls(log: str) -> dict[str, list[list[str]]]:
    """Rule -> the sbatch arguments of each submission, from the plugin's 'sbatch call:' lines
    (logged at debug level: run with --verbose). The job command after --wrap is left out."""
    calls: dict[str, list[list[str]]] = {}
    for line in log.splitlines():
        if not line.startswith("sbatch call: "):
            continue
        head = line[len("sbatch call: ") :].split(' --wrap="', 1)[0]
        args = shlex.split(head)
        comment = args[args.index("--comment") + 1]
        rule = re.match(r"rule_(\w+?)(?:_wildcards_.*)?$", comment).group(1)
        calls.setdefault(rule, []).append(args)
    return calls


def failed_job_logs(workdir: Path) -> str:
    """The tails of the SLURM logs the plugin kept in ``workdir`` (it removes successful jobs')."""
    logs = sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in logs) or "(none kept)"


def run_uuid(log: str) -> str:
    return re.search(r"SLURM run ID: (\S+)", log).group(1)


def accounting(uuid: str) -> list[dict[str, str]]:
    """sacct's record of every job of one Snakemake run (job name = the run's uuid)."""
    fields = ["JobID", "Comment", "State", "AllocTRES", "Elapsed"]
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-S", "now-6hours", "--name", uuid, "-o", ",".join(fields)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line]


def wait_for_accounting(uuid: str, n: int, timeout: float = 30) -> list[dict[str, str]]:
    """The run's jobs once sacct has all ``n`` in a final state (slurmdbd records lag a little)."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = accounting(uuid)
        final = [j for j in jobs if j["State"].split()[0] not in ("PENDING", "RUNNING")]
        if len(final) >= n or time.monotonic() > deadline:
            return jobs
        time.sleep(0.5)


# --- the derived profiles (no cluster needed) ---------------------------------------------------


def changed_paths(before, after, prefix=()) -> set[tuple]:
    """Key paths whose values differ between two nested dicts (added and removed keys too)."""
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return set() if before == after else {prefix}
    paths = set()
    for key in set(before) | set(after):
        if key not in before or key not in after:
            paths.add((*prefix, key))
        else:
            paths |= changed_paths(before[key], after[key], (*prefix, key))
    return paths


def test_derived_profiles_change_only_what_the_test_cluster_needs():
    paper = lp.load_paper()
    site = lp.site_profile(paper)
    assert changed_paths(paper, site) == {
        ("default-resources", "slurm_partition"),
        ("default-resources", "slurm_account"),
        ("slurm-init-seconds-before-status-checks",),
    }
    local = lp.local_profile(paper, cpus=2, mem_mb=3000)
    training = {
        ("set-resources", rule, key)
        for rule in ("pretrain", "finetune")
        for key in ("nodes", "tasks", "mpi", "cpus_per_task")
    }
    status = set() if site.get("slurm-status-command") == "squeue" else {("slurm-status-command",)}
    caps = {("default-resources", "mem_mb"), ("default-resources", "cpus_per_task")}
    assert changed_paths(site, local) == training | status | caps
    for rule in ("pretrain", "finetune"):
        res = local["set-resources"][rule]
        assert res["nodes"] == 1 and "mpi" not in res and res["cpus_per_task"] == 1  # half
        assert res["gres"] == paper["set-resources"][rule]["gres"]  # the node's 4 GPUs
    two = lp.local_profile(paper, cpus=2, mem_mb=3000, launchers=2)["set-resources"]["pretrain"]
    assert (two["nodes"], two["tasks"], two["mpi"], two["cpus_per_task"]) == (1, 2, "srun", 1)
    assert local["default-resources"]["mem_mb"] == 3000
    big = lp.local_profile(paper, cpus=16, mem_mb=3000, launchers=2)["set-resources"]["finetune"]
    assert (big["tasks"], big["cpus_per_task"]) == (2, 4)  # 2 tasks x 4 CPUs: half the node
    with pytest.raises(ValueError, match="launchers=3"):
        lp.local_profile(paper, cpus=2, mem_mb=3000, launchers=3)


# --- a demo cut to two ablation rows ----------------------------------------------------------

ROWS = ("p8_llama_nopt", "p8_llama_short")  # no pretraining, and pretraining + finetuning


def cut_demo_config(tmp: Path) -> Path:
    """config/demo.yaml cut to CI size: two ablation rows, one synthetic world and its benchmark,
    one synthetic VQA benchmark, fewer images, one epoch, short model pretraining; training
    shards small enough that two ranks each hold whole shards. Same schema, same rules."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from test_workflow import demo_config  # model-config paths made absolute
    finally:
        sys.path.remove(str(ROOT / "tests"))
    cfg = yaml.safe_load(demo_config(tmp).read_text())
    world = next(iter(cfg["synthetic_worlds"]))
    cfg["synthetic_worlds"] = {world: cfg["synthetic_worlds"][world]}
    cfg["synthetic_worlds"][world].update(train_per_class=8, test_per_class=3)
    cfg["benchmarks"] = {
        name: b for name, b in cfg["benchmarks"].items() if b["source"].get("world", world) == world
    }
    vqa = list(cfg["vqa_benchmarks"])[-1]
    cfg["vqa_benchmarks"] = {vqa: cfg["vqa_benchmarks"][vqa]}
    if "n_questions" in cfg["vqa_benchmarks"][vqa]["source"]:
        cfg["vqa_benchmarks"][vqa]["source"]["n_questions"] = 20
    _keep_worlds(cfg, {world})
    for model in cfg["clip_models"].values():
        if "steps" in (model["source"].get("pretrain") or {}):
            model["source"]["pretrain"]["steps"] = 20
    for llm in cfg["llms"].values():
        if "text_pretrain_steps" in llm["source"]:
            llm["source"]["text_pretrain_steps"] = 30
    for recipe in cfg["recipes"].values():
        recipe["epochs"] = 1
    cfg["ablations"] = [row for row in cfg["ablations"] if row["name"] in ROWS]
    assert [row["name"] for row in cfg["ablations"]] == list(ROWS)
    cfg["report"]["table1"] = [e for e in cfg["report"]["table1"] if e.get("run") in ROWS]
    cfg.setdefault("training", {})["samples_per_shard"] = 48  # >= 2 shards per training set
    out = tmp / "demo-cut.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def _keep_worlds(node, keep: set[str]) -> None:
    """Every ``worlds:`` list in the config keeps only the worlds in ``keep``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "worlds" and isinstance(value, list):
                node[key] = [w for w in value if w in keep]
            else:
                _keep_worlds(value, keep)
    elif isinstance(node, list):
        for item in node:
            _keep_worlds(item, keep)


@pytest.fixture(scope="module")
def demo_runs(slurm_cluster, tmp_path_factory):
    """The cut demo's all_ablations twice, at the same time: locally (profiles/demo) and through
    SLURM (the SLURM run leaves the CPUs idle between status checks: together they take less
    time than one after the other, and both use one torch thread per job either way)."""
    base = tmp_path_factory.mktemp("slurm-demo")
    local, cluster = base / "local", base / "slurm"
    local.mkdir()
    cluster.mkdir()
    config = cut_demo_config(base)
    common = ["all_ablations", "--configfile", str(config)]
    started = time.perf_counter()
    local_run = start_snakemake(local, *common, "--profile", str(ROOT / "profiles" / "demo"))
    slurm_run = start_snakemake(
        cluster, *common, "--profile", str(local_profile_dir(base)), "--verbose"
    )
    ok(finish(slurm_run))
    slurm_seconds = time.perf_counter() - started
    ok(finish(local_run))
    print(
        f"\ncut demo all_ablations, run side by side: SLURM {slurm_seconds:.0f} s, "
        f"both {time.perf_counter() - started:.0f} s"
    )
    return {"local": local, "slurm": cluster, "config": config}


# --- (a) the paper profile's resource mapping is what gets submitted ---------------------------


def dry_run_jobs(workdir: Path, profile: Path, target: str) -> dict[str, list[dict]]:
    """Rule -> [{"output", "input"}] of the paper study's dry-run (no data needed)."""
    proc = ok(snakemake(workdir, "-n", "--profile", str(profile), target))
    jobs: dict[str, list[dict]] = {}
    for block in proc.stdout.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0]
        fields = dict(re.findall(r"^\s+(input|output): (.*)$", block, flags=re.MULTILINE))
        if "output" not in fields:
            continue  # a target rule
        jobs.setdefault(rule, []).append(
            {
                "output": fields["output"].split(", "),
                "input": fields.get("input", "").split(", ") if fields.get("input") else [],
            }
        )
    return jobs


def test_paper_profile_submits_training_as_4_nodes_by_4_gpus(slurm_cluster, tmp_path):
    """The paper's profile (placeholders filled, nothing else) submits a pretraining and a
    finetuning job of the paper's study to the live slurmctld; Snakemake's log holds the sbatch
    arguments: 4 nodes, 1 launcher task per node, 4 GPUs per node, 32 CPUs per task, the study
    config's memory and runtime. The one-node cluster refuses them at submission (nothing pends
    forever) and Snakemake reports the failure."""
    profile = lp.write_profile(lp.site_profile(lp.load_paper()), tmp_path / "profile-paper")
    jobs = dry_run_jobs(tmp_path, profile, "all_training")
    finetune = jobs["finetune"][0]
    pretrain = next(j for j in jobs["pretrain"] if j["output"][0] not in finetune["input"])
    for path in {*finetune["input"], *pretrain["input"]}:
        (tmp_path / path).mkdir(parents=True, exist_ok=True)  # stand-ins: only training runs
    started = time.perf_counter()
    proc = snakemake(
        tmp_path, "--profile", str(profile), "--verbose", *finetune["output"], *pretrain["output"]
    )
    seconds = time.perf_counter() - started
    assert proc.returncode != 0
    calls = sbatch_calls(newest_log(tmp_path))
    study = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["resources"]
    for rule in ("pretrain", "finetune"):
        assert len(calls[rule]) == 2, calls.get(rule)  # the profile's retries: 1 resubmits
        args = calls[rule][0]
        assert {"--nodes=4", "--ntasks=4", "--gres=gpu:4", "--cpus-per-task=32"} <= set(args)
        assert not any(a.startswith(("--gpus", "--ntasks-per-gpu")) for a in args), args
        assert "--signal=TERM@300" in args
        assert args[args.index("--mem") + 1] == str(study[rule]["mem_mb"])  # per node
        assert args[args.index("-t") + 1] == str(study[rule]["runtime"])
        assert args[args.index("-p") + 1] == "debug" and args[args.index("-A") + 1] == "root"
    # slurmctld itself saw 4 x 32 CPUs and refused them: a real scheduler read these arguments
    assert "More processors requested than permitted" in proc.stderr + proc.stdout
    assert seconds < 120, f"a refused submission took {seconds:.0f} s"


# --- (b) the demo through SLURM equals the local run -------------------------------------------


def test_slurm_demo_table_equals_the_local_run(demo_runs):
    """all_ablations through SLURM gives the local run's tables, byte for byte: same code, same
    seeds, one torch thread per job in both runs (OMP_NUM_THREADS=1 and the rules' threads)."""
    tables = sorted(p.name for p in (demo_runs["local"] / "results" / "tables").glob("*.csv"))
    assert "ablations.csv" in tables
    for name in tables:
        local = demo_runs["local"] / "results" / "tables" / name
        cluster = demo_runs["slurm"] / "results" / "tables" / name
        assert cluster.read_bytes() == local.read_bytes(), name
    table = pl.read_csv(demo_runs["slurm"] / "results" / "tables" / "ablations.csv")
    assert table["run"].to_list() == list(ROWS)


def test_slurm_demo_jobs_ran_as_slurm_jobs_with_the_profiles_resources(demo_runs):
    """Every job of the SLURM run is in slurmdbd's accounting, COMPLETED, with the profile's
    resources: training has the node's 4 GPUs, evaluation 1, data jobs none."""
    log = newest_log(demo_runs["slurm"])
    calls = sbatch_calls(log)
    jobs = wait_for_accounting(run_uuid(log), sum(len(c) for c in calls.values()))
    assert len(jobs) == sum(len(c) for c in calls.values()) > 10
    assert {j["State"] for j in jobs} == {"COMPLETED"}, jobs
    by_rule: dict[str, set[str]] = {}
    for job in jobs:
        rule = re.match(r"rule_(\w+?)(?:_wildcards_.*)?$", job["Comment"]).group(1)
        gpus = re.search(r"gres/gpu=(\d+)", job["AllocTRES"])
        by_rule.setdefault(rule, set()).add(gpus.group(1) if gpus else "0")
    assert by_rule["pretrain"] == by_rule["finetune"] == {"4"}
    assert by_rule["eval_vlm"] == by_rule["mine_questions"] == {"1"}
    assert by_rule["build_manifest"] == by_rule["aggregate_ablations"] == {"0"}
    for rule in ("pretrain", "finetune"):
        args = calls[rule][0]
        assert {"--nodes=1", "--gres=gpu:4"} <= set(args), args  # the paper's 4 nodes -> 1


# --- (c) multi-node launch: 2 launchers on localhost -------------------------------------------

PROBE_SNAKEFILE = """
rule pretrain:  # the name picks the profile's training resources (nodes, tasks, mpi, gres)
    output:
        "probe.json",
    log:
        "probe.log",
    resources:
        runtime=15,  # > 5 min: the profile's --signal=TERM@300 warns 5 min before the limit
        mem_mb=2000,
    script:
        "probe.py"
"""

# workflow/scripts/train.py with the probe as the launch entry (a script runs in its own
# process: run_or_launch forwards SIGTERM, which a `run:` block's thread cannot)
PROBE_SCRIPT = """
import sys
from pathlib import Path

from fgvlm import logs
from fgvlm.training import launch

sm = snakemake  # noqa: F821
logs.setup(sm.log)
code = launch.run_or_launch(
    {"out_json": str(Path(sm.output[0]).resolve()), "device": "cpu"},
    state_dir="probe.state",
    entry="fgvlm.training.launch:probe_distributed",
)
sys.exit(code)
"""


def test_training_launch_path_joins_two_launchers_on_the_cluster(slurm_cluster, tmp_path):
    """The training rules' profile entry with 2 emulated nodes (nodes 1, tasks 2, mpi srun):
    sbatch -> the jobstep runs the job in the batch step -> run_or_launch reads the allocation
    back with scontrol -> srun starts 2 torchrun agents -> c10d rendezvous -> gloo all-reduce."""
    profile = local_profile_dir(tmp_path, launchers=2)
    (tmp_path / "Snakefile").write_text(PROBE_SNAKEFILE)
    (tmp_path / "probe.py").write_text(PROBE_SCRIPT)
    ok(
        snakemake(
            tmp_path, "--profile", str(profile), "--verbose", snakefile=tmp_path / "Snakefile"
        )
    )
    calls = sbatch_calls(newest_log(tmp_path))["pretrain"]
    # No retry is expected: a rank that aborted at exit (a process group left to interpreter
    # shutdown, see fgvlm.training.launch.close_process_group) used to fail 1 probe in 5 here.
    assert len(calls) == 1, f"the probe needed a retry:\n{failed_job_logs(tmp_path)}"
    args = calls[0]
    assert {"--nodes=1", "--ntasks=2", "--gres=gpu:4"} <= set(args), args
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["world_size"] == 2 and result["ranks"] == [0, 1]
    assert result["sum"] == result["expected_sum"] == 3.0 and result["backend"] == "gloo"
    plan = json.loads((tmp_path / "probe.state.launch.json").read_text())["plan"]
    assert plan["nodes"] == 1 and plan["launchers"] == 2 and plan["hosts"] == ["localhost"]
    assert plan["rdzv_id"].isdigit()  # the SLURM job id: from scontrol, the jobstep cleared env


def test_demo_pretraining_runs_on_two_ranks_through_the_cluster(demo_runs, tmp_path):
    """The real pretrain rule, rerun on the SLURM run's inputs with 2 launchers: the trainer's
    plan has world size 2 (the shards split between the ranks)."""
    workdir = demo_runs["slurm"]
    profile = local_profile_dir(tmp_path, launchers=2)
    target = next((workdir / "runs").glob("*/pretrain")).relative_to(workdir)
    ok(
        snakemake(
            workdir,
            str(target),
            "--forcerun",
            "pretrain",
            "--profile",
            str(profile),
            "--configfile",
            str(demo_runs["config"]),
        )
    )
    meta = json.loads((workdir / target / "fgvlm_vlm.json").read_text())
    assert meta["training"]["plan"]["world_size"] == 2
    log = (workdir / "logs" / "pretrain" / f"{target.parts[1]}.log").read_text()
    assert "launching 2 processes on 1 node(s)" in log


# --- (d) failures and retries ------------------------------------------------------------------


def test_a_failing_job_is_reported_and_does_not_hang(slurm_cluster, tmp_path):
    """A config value only a job's script reads (a CLIP model config that is not JSON) fails
    the job on the cluster, and Snakemake reports it with the job's log (no retry: --retries 0)."""
    config = yaml.safe_load(cut_demo_config(tmp_path).read_text())
    broken = tmp_path / "broken-model-config.json"
    broken.write_text("{this is not json")
    clip = config["encoders"][config["ablations"][0]["vision_encoder"]]["clip"]
    config["clip_models"][clip]["source"]["model_config"] = str(broken)
    config["clip_models"][clip]["source"].pop("pretrain", None)  # the model config alone
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    proc = snakemake(
        tmp_path,
        f"models/clip/{clip}",
        "--profile",
        str(local_profile_dir(tmp_path)),
        "--verbose",
        "--retries",
        "0",
        "--configfile",
        str(tmp_path / "broken.yaml"),
        timeout=300,
    )
    seconds = time.perf_counter() - started
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Error in rule fetch_clip" in out
    assert str(broken) in out  # the failed job's log, shown: it names the bad file
    log = newest_log(tmp_path)
    jobs = wait_for_accounting(run_uuid(log), 1)
    assert [j["State"] for j in jobs] == ["FAILED"], jobs
    assert seconds < 180


def squeue_running(comment: str) -> str | None:
    out = subprocess.run(
        ["squeue", "-h", "-t", "RUNNING", "-o", "%i %k"], capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        job_id, _, job_comment = line.partition(" ")
        if job_comment.strip() == comment:
            return job_id
    return None


def test_a_cancelled_job_is_resubmitted_and_the_workflow_completes(demo_runs, tmp_path):
    """scancel kills a running finetuning job; the profile's `retries: 1` resubmits it, the
    workflow completes, and the retrained weights equal the first run's (deterministic)."""
    workdir = demo_runs["slurm"]
    run = ROWS[0]
    target = Path("runs") / run / "finetune"
    before = (workdir / target / "model.safetensors").read_bytes()
    shutil.rmtree(workdir / f"{target}.state")  # else the forced rerun re-emits, untrained
    cancelled: list[str] = []

    def cancel_when_running() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            job_id = squeue_running(f"rule_finetune_wildcards_{run}")
            if job_id:
                subprocess.run(["scancel", job_id], check=True)
                cancelled.append(job_id)
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=cancel_when_running, daemon=True)
    proc = snakemake(
        workdir,
        str(target),
        "--forcerun",
        "finetune",
        "--profile",
        str(local_profile_dir(tmp_path)),
        "--verbose",
        "--configfile",
        str(demo_runs["config"]),
        timeout=600,
        on_start=watcher.start,
    )
    watcher.join(timeout=5)
    ok(proc)
    assert cancelled, "the finetuning job was never seen running"
    jobs = wait_for_accounting(run_uuid(newest_log(workdir)), 2)
    states = {j["JobID"]: j["State"].split()[0] for j in jobs}
    assert states[cancelled[0]] == "CANCELLED"
    assert sorted(states.values()) == ["CANCELLED", "COMPLETED"], states
    assert (workdir / target / "model.safetensors").read_bytes() == before


# --- (e) per-job overhead ----------------------------------------------------------------------

TRIVIAL_SNAKEFILE = """
N = int(config["trivial_jobs"])
CHAIN = bool(config.get("trivial_chain", 0))


localrules:
    all,


rule all:
    input:
        expand("t/{i}.txt", i=range(N)),


rule trivial:
    input:
        lambda wc: [f"t/{int(wc.i) - 1}.txt"] if CHAIN and int(wc.i) > 0 else [],
    output:
        "t/{i}.txt",
    resources:
        runtime=5,
        mem_mb=200,
        cpus_per_task=1,
    shell:
        "echo {wildcards.i} > {output}"
"""


def test_per_job_overhead_of_the_cluster(slurm_cluster, tmp_path):
    """Wall time of trivial jobs through SLURM minus local, per job: independent jobs (2 at a
    time on 2 CPUs) and a chain (each waits for the previous: the status-check latency)."""
    (tmp_path / "Snakefile").write_text(TRIVIAL_SNAKEFILE)
    profile = local_profile_dir(tmp_path)
    n, chain = 4, 2
    seconds = {}
    for mode, run_args in (("local", ["--cores", "2"]), ("slurm", ["--profile", str(profile)])):
        for kind, config in (
            ("independent", [f"trivial_jobs={n}"]),
            ("chain", [f"trivial_jobs={chain}", "trivial_chain=1"]),
        ):
            shutil.rmtree(tmp_path / "t", ignore_errors=True)
            started = time.perf_counter()
            ok(
                snakemake(
                    tmp_path, *run_args, "--config", *config, snakefile=tmp_path / "Snakefile"
                )
            )
            seconds[mode, kind] = time.perf_counter() - started
    per_job = (seconds["slurm", "independent"] - seconds["local", "independent"]) / n
    per_link = (seconds["slurm", "chain"] - seconds["local", "chain"]) / chain
    print(
        f"\nSLURM overhead: {per_job:.1f} s per job ({n} independent jobs: "
        f"{seconds['slurm', 'independent']:.1f} s vs {seconds['local', 'independent']:.1f} s "
        f"local); {per_link:.1f} s per job of a chain ({chain} jobs: "
        f"{seconds['slurm', 'chain']:.1f} s vs {seconds['local', 'chain']:.1f} s local)"
    )
    # the plugin's default 40 s before the first status check would make every chain link
    # >= 40 s; the profile's 2 s keeps it well under
    assert per_link < 35
