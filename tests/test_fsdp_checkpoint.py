"""Checkpoints under FSDP: two gloo processes shard the real tiny VLM as the paper's accelerate
config does (FULL_SHARD, use_orig_params, decoder-layer wrapping, activation checkpointing).

One run is stopped by SIGTERM on rank 1 only (rank 0 learns it through the trainer), its rerun
is SIGKILLed inside a checkpoint save, a third run finishes: weights and optimizer state end
identical to an uninterrupted 2-process run. The first stop falls in the connector-only phase
(the LLM's optimizer state still empty), the kill in the phase where both learn.

accelerate turns FSDP on only for GPU-like devices (``AcceleratorState`` keeps MULTI_CPU, and its
FSDP plugin's ``sync_module_states`` asks for a CUDA device), so the driver promotes a CPU
accelerator to FSDP with the config's settings; everything else is the real ``train_stage``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from _tiny import FakeVLM, training_assets
from safetensors.torch import load_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from fgvlm.training.checkpoint import latest_checkpoint

SPEC = {
    "run": "fsdp_test",
    "arch": "llava",
    "data": "instructions",
    "template": "vicuna_v1",
    "image_aspect": "pad",
    "seed": 3,
    "recipe": {
        "stage": "pretrain",
        "updating": "full",
        "connector_lr": 1e-3,
        "llm_lr": 1e-3,
        "connector_only_fraction": 0.25,  # 9 steps: the LLM learns from step round(2.25) = 2 on
        "global_batch": 8,
        "per_device_batch": 2,
        "epochs": 1,
        "warmup_ratio": 0.1,
    },
}
TOTAL_STEPS = 9  # 72 samples over 2 ranks: 18 micro-batches of 2 each, accumulation 2

DRIVER = """
import json, os, shutil, signal, sys
import torch
torch.set_num_threads(1)
import accelerate
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FullyShardedDataParallel

class CpuFsdpAccelerator(accelerate.Accelerator):
    # config/accelerate/fsdp_4x4.yaml's settings, on CPU
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=1,
            sharding_strategy="FULL_SHARD",
            auto_wrap_policy="transformer_based_wrap",
            use_orig_params=True,
            sync_module_states=False,
            activation_checkpointing=True,
            state_dict_type="SHARDED_STATE_DICT",
        )
        for state in (PartialState._shared_state, self.state.__dict__):
            state["distributed_type"] = DistributedType.FSDP
            state["device"] = torch.device("cpu")  # FSDP wants "cpu", not accelerate's "cpu:0"
        self.state.fsdp_plugin = plugin

accelerate.Accelerator = CpuFsdpAccelerator
from fgvlm import logs, stages
from fgvlm.training import loop
logs.setup()
args = json.loads(sys.argv[1])
hooks = args.pop("hooks")
rank = int(os.environ["RANK"])
real_save = loop.save_checkpoint

def save_checkpoint(state_dir, step, model, *rest, **kw):
    if not isinstance(model, FullyShardedDataParallel):
        raise TypeError(f"not sharded: {type(model).__name__}")
    marker = hooks["marker"] + f".rank{rank}.json"
    if not os.path.exists(marker):
        local = sum(p.numel() for p in model.parameters() if p.requires_grad)
        with open(marker, "w") as f:
            json.dump({"trainable_local_numel": local}, f)
    if step == hooks.get("kill_in_save"):
        real_dcp_save = dcp.save
        def save_then_die(*a, **k):
            real_dcp_save(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)  # this rank's shards written, no rename yet
        dcp.save = save_then_die
    target = real_save(state_dir, step, model, *rest, **kw)
    if step == hooks.get("sigterm_after") and rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    if step == hooks.get("keep") and rank == 0:
        shutil.copytree(target, hooks["keep_to"])  # the last checkpoint, deleted at the end
    return target

loop.save_checkpoint = save_checkpoint
stages.train_stage(**args)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return training_assets(tmp_path_factory.mktemp("fsdp"), llm_layers=2, samples_per_shard=8)


def run_two_ranks(assets: dict, out: Path, **hooks) -> tuple[list[int], list[str]]:
    """One training job on 2 gloo processes -> (exit codes, stderr texts) by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = {
        "spec": SPEC,
        "out_dir": str(out),
        "state_dir": f"{out}.state",
        "checkpoint_every": 1,
        "device": "cpu",
        "hooks": {"marker": str(out), **hooks},
        **assets,
    }
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps(args)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        errs = [proc.communicate(timeout=240)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [proc.returncode for proc in procs], errs


def full_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, unsharded, read in this one process."""
    metadata = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    assert all(isinstance(m, TensorStorageMetadata) for m in metadata.values())  # no pickles
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    return state


def meta(out: Path) -> dict:
    return json.loads((out / "fgvlm_vlm.json").read_text())["training"]


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "model"
    codes, errs = run_two_ranks(assets, out, keep=TOTAL_STEPS, keep_to=f"{out}.final")
    assert codes == [0, 0], errs[0][-3000:]
    assert meta(out)["result"]["resumed_from"] == 0
    return out


@pytest.fixture(scope="module")
def interrupted(assets, tmp_path_factory) -> dict:
    """SIGTERM on rank 1 -> rerun -> SIGKILL inside a save -> rerun to the end."""
    out = tmp_path_factory.mktemp("interrupted") / "model"
    state = Path(f"{out}.state")
    seen: dict = {}
    codes, errs = run_two_ranks(assets, out, sigterm_after=1)
    assert all(code != 0 for code in codes)
    assert all("Preempted" in err for err in errs), errs[0][-3000:]  # both ranks checkpointed
    seen["after_sigterm"] = sorted(p.name for p in state.iterdir() if p.name.startswith("step"))
    seen["phase1"] = full_checkpoint(state / "step-00000002" / "weights")
    codes, errs = run_two_ranks(assets, out, kill_in_save=6)
    assert all(code != 0 for code in codes), errs[0][-3000:]
    seen["after_kill"] = sorted(p.name for p in state.iterdir() if "step" in p.name)
    seen["latest_after_kill"] = latest_checkpoint(state).name
    seen["out_after_kill"] = out.exists()
    codes, errs = run_two_ranks(assets, out, keep=TOTAL_STEPS, keep_to=f"{out}.final")
    assert codes == [0, 0], errs[0][-3000:]
    seen["out"] = out
    return seen


def test_stops_leave_complete_checkpoints_only(interrupted):
    # SIGTERM reached rank 1 after step 1; both ranks checkpointed step 2 and stopped
    assert interrupted["after_sigterm"] == ["step-00000001", "step-00000002"]
    # the kill inside step 6's save left its temp folder; steps 4 and 5 are the newest two
    assert interrupted["after_kill"] == [".step-00000006.tmp", "step-00000004", "step-00000005"]
    assert interrupted["latest_after_kill"] == "step-00000005"
    assert not interrupted["out_after_kill"]
    assert meta(interrupted["out"])["result"]["resumed_from"] == 5


def test_connector_only_checkpoint_holds_untouched_llm_state(interrupted):
    # step 2 is the last connector-only step: AdamW state exists for the LLM, at step 0 and zero
    state = interrupted["phase1"]
    llm_steps = [
        v for k, v in state.items() if k.startswith("optimizer.llm.") and k.endswith("step")
    ]
    assert llm_steps and all(float(v) == 0 for v in llm_steps)
    assert float(state["optimizer.connector.0.weight.step"]) == 2
    assert not state["optimizer.llm.model.layers.0.mlp.up_proj.weight.exp_avg"].any()


def test_resumed_run_ends_identical_to_uninterrupted(reference, interrupted):
    out = interrupted["out"]
    expected, got = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    ref_state = full_checkpoint(Path(f"{reference}.final") / "weights")
    run_state = full_checkpoint(Path(f"{out}.final") / "weights")
    assert ref_state.keys() == run_state.keys()
    assert any(k.endswith("exp_avg_sq") for k in ref_state)
    for name, tensor in ref_state.items():
        assert torch.equal(tensor, run_state[name]), name
    groups = [
        json.loads((Path(f"{o}.final") / "param_groups.json").read_text()) for o in (reference, out)
    ]
    assert groups[0] == groups[1]
    assert [g["name"] for g in groups[0]] == ["connector", "llm"]


def test_checkpoint_is_sharded_full_and_matches_the_saved_model(reference):
    saved = load_file(reference / "model.safetensors")  # gathered on rank 0 at the end
    state = full_checkpoint(Path(f"{reference}.final") / "weights")  # written shard by shard
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    assert not any(k.startswith("vision.") for k in weights)  # the frozen tower is left out
    assert weights.keys() == saved.keys()
    for name, tensor in saved.items():
        assert weights[name].shape == tensor.shape and torch.equal(weights[name], tensor), name
    # each rank held a part of the trainable weights, together all of them
    local = [
        json.loads(Path(f"{reference}.rank{rank}.json").read_text())["trainable_local_numel"]
        for rank in range(2)
    ]
    total = sum(t.numel() for t in saved.values())
    assert sum(local) == total and max(local) < total
    shards = sorted(p.name for p in (Path(f"{reference}.final") / "weights").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    # the saved model loads as a VLM
    from fgvlm.models.vlm import load_vlm

    model = load_vlm(reference)
    assert torch.equal(model.connector[0].weight, saved["connector.0.weight"])


# --- one process: the same checkpoint code without a process group ------------------------------


def tiny_run(state_dir: Path, stop_at: int | None = None):
    from fgvlm.training.loop import train
    from fgvlm.training.recipe import Recipe, make_plan

    recipe = Recipe.from_config(
        dict(
            stage="pretrain",
            updating="full",
            connector_lr=1e-2,
            llm_lr=1e-2,
            connector_only_fraction=0.3,
            global_batch=2,
            per_device_batch=2,
            max_steps=10,
        )
    )
    plan = make_plan(recipe, 1, n_samples=20)
    gen = torch.Generator().manual_seed(1)
    data = [
        {"inputs": torch.randn(2, 4, generator=gen), "targets": torch.randn(2, generator=gen)}
        for _ in range(10)
    ]
    for batch in data:
        batch["attention_mask"] = torch.ones(2, 3, dtype=torch.long)

    def observe(step, model):
        if step == stop_at:
            raise KeyboardInterrupt  # killed right after this step

    model = FakeVLM()
    finished = {}
    train(
        model,
        lambda epoch, skip: iter(data[skip:]),
        recipe,
        plan,
        state_dir,
        seed=0,
        checkpoint_every=2,
        on_step=observe,
        finish=lambda prepared, result: finished.update(result=result, model=prepared),
    )
    return model, finished["result"]


def test_single_process_resume_inside_the_connector_only_phase(tmp_path):
    full, _ = tiny_run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path / "b", stop_at=3)  # the LLM starts at step 3: checkpoint 2 precedes
    checkpoint = latest_checkpoint(tmp_path / "b")
    assert checkpoint.name == "step-00000002"
    state = full_checkpoint(checkpoint / "weights")
    assert not state["optimizer.llm.weight.exp_avg"].any()
    assert float(state["optimizer.llm.weight.step"]) == 0  # as if AdamW had never seen it
    assert not any(k.startswith(("model.vision", "optimizer.vision")) for k in state)
    resumed, result = tiny_run(tmp_path / "b")
    assert result.resumed_from == 2
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
