"""Checkpoints of a training run, so a killed job resumes where it stopped with the same weights.

Every ``checkpoint_every`` steps ``state_dir/step-NNNNNNNN/`` appears by one rename once every
rank has written its part:

  weights/            torch.distributed.checkpoint (DCP): trainable weights ("model.*") and
                      AdamW state ("optimizer.*"). Under FSDP every rank writes its own shards
                      (nothing is gathered); replicated tensors (one process, DDP) are written
                      once, tensors only (no pickles to load back).
  deepspeed/          under DeepSpeed ZeRO-3 instead: the engine's own partitioned checkpoint
  param_groups.json   the optimizer's hyper-parameters (learning rates, parameter names)
  scheduler.pt        the LR scheduler (plain numbers; loaded with weights_only)
  position.json       step, epoch and micro-batch within the epoch
  rng-rank{r}.*       each rank's torch (and CUDA) RNG in safetensors, Python's in JSON
  manifest.json       size and sha256 of every other file, written last

A resume takes the newest checkpoint whose files match its manifest (``resumable_checkpoint``),
checked before anything in it is read, so a damaged newest checkpoint falls back to an older
one. DCP's ``.metadata`` is a pickle: it is read by an unpickler that admits only DCP's metadata
classes, and every entry loaded must be a tensor (read with ``weights_only``), so a weights/
checkpoint runs no code. A DeepSpeed checkpoint is the engine's own pickles: the manifest
catches damage, not tampering; its state folder is trusted like the code.

The final model is gathered on rank 0 and saved there (``save_model``); ``record_final`` keeps
a hashed copy in the state folder, from which ``reemit_final`` restores a lost output.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pickle
import random
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fgvlm import io

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"

WEIGHTS_DIR = "weights"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
MANIFEST = "manifest.json"
FINAL_DIR = "final"
FINAL_RECORD = "final.json"
_MANIFEST_PART = ".manifest-rank"  # each rank's share of the hashes, merged into the manifest


def is_deepspeed(accelerator: Any) -> bool:
    if accelerator is None:
        return False
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _is_sharded(accelerator: Any) -> bool:
    """FSDP or DeepSpeed: each rank holds only a shard of the weights."""
    if accelerator is None:
        return False
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of ``optimizer`` (AdamW) its state now: zeros and step 0, exactly
    what AdamW creates at a parameter's first step, so training is unchanged.

    Checkpoints need it. FSDP's optimizer state dict refuses a flat parameter whose trainable
    weights hold state only in part (the LLM before its start step, beside the connector), and
    torch's ``get_state_dict`` would otherwise initialize a rank that holds no state yet with a
    real step. The optimizer's own code makes the state: one step with zero gradients at lr 0
    (the weights do not move), then the step counts go back to 0.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if optimizer.state or not params:
        return
    if any(p.grad is not None for p in params):
        raise ValueError("init_optimizer_state: call it before the first backward pass")
    for param in params:
        param.grad = torch.zeros_like(param)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    for state in optimizer.state.values():
        if "step" in state:
            step = state["step"]
            state["step"] = torch.zeros_like(step) if torch.is_tensor(step) else 0


def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen weights (the tower; the LLM in connector-only recipes) come back from their files
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _no_dist() -> bool:
    """DCP without a process group (one process)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextmanager
def _quiet_checkpointing() -> Iterator[None]:
    """Silence two expected messages: DCP's warning on every single-process save and load (even
    when asked for one), and FSDP's line per frozen weight left out of a checkpoint on purpose."""
    fsdp_log = logging.getLogger("torch.distributed.fsdp._state_dict_utils")
    level = fsdp_log.level
    fsdp_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    finally:
        fsdp_log.setLevel(level)


def _save_sharded_state(directory: Path, model: Any, optimizer: Any) -> list[dict]:
    """Write trainable weights and optimizer state with DCP; return the param groups.

    A collective: every rank calls it with the model and optimizer ``accelerator.prepare`` gave.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(
        model, torch_optimizer(optimizer), options=_state_dict_options()
    )
    for fqn, state in optim["state"].items():
        for name, value in state.items():
            if not torch.is_tensor(value):
                # DCP would pickle it, and loading it would unpickle
                raise ValueError(f"optimizer state {fqn}.{name} is a {type(value).__name__}")
    with _quiet_checkpointing():
        dcp.save(
            {"model": weights, "optimizer": optim["state"]},
            checkpoint_id=directory,
            no_dist=_no_dist(),
        )
    return optim["param_groups"]


def _load_sharded_state(path: Path, model: Any, optimizer: Any) -> None:
    """Restore what ``_save_sharded_state`` wrote into the prepared model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = path / WEIGHTS_DIR
    inner = torch_optimizer(optimizer)
    # this run's tensors (shards under FSDP; state from init_optimizer_state) to fill in place
    weights, optim = get_state_dict(model, inner, options=_state_dict_options())
    state = optim["state"]
    reader = _safe_reader(directory)
    stored = reader.read_metadata().state_dict_metadata
    wanted = [f"model.{name}" for name in weights]
    wanted += [f"optimizer.{fqn}.{key}" for fqn, entry in state.items() for key in entry]
    missing = [key for key in wanted if key not in stored]
    if missing:
        raise ValueError(f"{directory}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    not_tensors = [key for key in wanted if not isinstance(stored[key], TensorStorageMetadata)]
    if not_tensors:
        # DCP unpickles non-tensor entries (weights_only=False)
        raise ValueError(f"{directory}: {not_tensors[0]} is not a tensor; refusing to unpickle it")
    groups = _read_param_groups(path / "param_groups.json")
    with _quiet_checkpointing():
        dcp.load(
            {"model": weights, "optimizer": state},
            checkpoint_id=directory,
            storage_reader=reader,
            no_dist=_no_dist(),
        )
        set_state_dict(
            model,
            inner,
            model_state_dict=weights,
            optim_state_dict={"state": state, "param_groups": groups},
            options=_state_dict_options(),
        )


# what DCP's .metadata pickle may name besides the classes of torch.distributed.checkpoint.metadata
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: no other class is imported or called."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in _METADATA_GLOBALS:
            found = super().find_class(module, name)
            if isinstance(found, type) or (module, name) in _METADATA_GLOBALS:
                return found
        raise pickle.UnpicklingError(f"checkpoint metadata names {module}.{name}: not allowed")


def _safe_reader(directory: Path):
    """DCP's file reader with the ``.metadata`` pickle read by ``_MetadataUnpickler``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):  # noqa: ARG002
            with open(Path(self.path) / ".metadata", "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(directory))


def _write_param_groups(groups: list[dict], path: Path) -> None:
    for group in groups:
        for key, value in group.items():
            if torch.is_tensor(value):
                raise ValueError(f"optimizer param group {group.get('name')}: {key} is a tensor")
    path.write_text(json.dumps(groups, indent=1))


def _read_param_groups(path: Path) -> list[dict]:
    """JSON gives lists for tuples (AdamW's betas); ``params`` (parameter names) is a list."""
    groups = json.loads(path.read_text())
    return [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in groups
    ]


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    return tensors, {"python": random.getstate()}


def _set_rng_state(tensors: dict[str, torch.Tensor], other: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = other["python"]
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(
    state_dir: Path, step: int, model: Any, optimizer, scheduler, position: dict, accelerator=None
) -> Path:
    """Write ``state_dir/step-NNNNNNNN/`` atomically; keep only the newest two checkpoints.

    ``model`` and ``optimizer`` are what ``accelerator.prepare`` returned (FSDP / DeepSpeed
    wrapped, or the plain ones). A collective: every rank must call it at the same step. Every
    rank writes its RNG state and its shard of weights and optimizer into one temporary folder,
    then hashes its share of the files; rank 0 writes the rest, the manifest last, and renames
    the folder into place, so a save killed half-way leaves only a temporary folder, which
    ``latest_checkpoint`` never matches.
    """
    rank = accelerator.process_index if accelerator is not None else 0
    barrier = accelerator.wait_for_everyone if accelerator is not None else (lambda: None)
    target = state_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = state_dir / f".{target.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng_tensors, rng_other = _rng_state()
    save_file(rng_tensors, tmp / f"rng-rank{rank}.safetensors")
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(rng_other))
    if is_deepspeed(accelerator):
        # ZeRO-3 partitions live in the engine: its own (collective) sharded save
        model.save_checkpoint(
            str(tmp / DEEPSPEED_DIR),
            tag=DEEPSPEED_TAG,
            save_latest=False,
            exclude_frozen_parameters=True,
        )
        groups = None
    else:
        groups = _save_sharded_state(tmp / WEIGHTS_DIR, model, optimizer)
    barrier()
    # the ranks share the hashing of what they wrote (the folder is on a shared filesystem)
    world = accelerator.num_processes if accelerator is not None else 1
    share = _digests(tmp, _listing(tmp)[rank::world])
    (tmp / f"{_MANIFEST_PART}{rank}.json").write_text(json.dumps(share))
    barrier()
    if rank == 0:
        if groups is not None:
            _write_param_groups(groups, tmp / "param_groups.json")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "position.json").write_text(json.dumps({**position, "step": step}))
        files: dict = {}
        for part in sorted(tmp.glob(f"{_MANIFEST_PART}*.json")):
            files.update(json.loads(part.read_text()))
            part.unlink()
        files.update(_digests(tmp, [name for name in _listing(tmp) if name not in files]))
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        for old in sorted(state_dir.glob(f"{CHECKPOINT_PREFIX}*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return target


def _checkpoints(state_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest first (temp folders of a killed save are never matched, nor
    folders without ``weights/`` or ``deepspeed/``)."""
    return sorted(
        p
        for p in state_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if (p / WEIGHTS_DIR).is_dir() or (p / DEEPSPEED_DIR).is_dir()
    )


def latest_checkpoint(state_dir: Path) -> Path | None:
    """The newest checkpoint folder, intact or not (see ``resumable_checkpoint``)."""
    found = _checkpoints(state_dir)
    return found[-1] if found else None


def resumable_checkpoint(state_dir: Path, accelerator: Any = None) -> Path | None:
    """The newest checkpoint whose files all match its manifest; None when none does.

    A collective: the ranks share the hashing and agree on the verdict before any rank reads a
    checkpoint. A damaged checkpoint is removed with a warning naming it and why.
    """
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    candidates = _checkpoints(state_dir)[::-1]
    for path in candidates:
        reason = verify_checkpoint(path, rank, world)
        if _on_every_rank(reason is None, accelerator):
            return path
        if reason is not None or rank == 0:
            log.warning(
                "damaged checkpoint %s: %s; removing it and trying an older one",
                path,
                reason or "a file another rank checked",
            )
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
    if candidates and rank == 0:
        log.warning("%s: no intact checkpoint; training starts afresh", state_dir)
    return None


def verify_checkpoint(path: Path, rank: int = 0, world: int = 1) -> str | None:
    """Why ``path`` cannot be resumed from (None: intact). Every rank checks the manifest, the
    file list and sizes; rank ``rank`` of ``world`` hashes its share of the files."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (its save never finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    return _check_files(path, files, rank, world)


def _on_every_rank(flag: bool, accelerator: Any) -> bool:
    """Whether ``flag`` holds on every rank."""
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=accelerator.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _listing(directory: Path, skip: tuple[str, ...] = (MANIFEST,)) -> list[str]:
    """Every file under ``directory`` (relative, sorted) but ``skip`` and the manifest's parts."""
    names = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(n for n in names if n not in skip and not n.startswith(_MANIFEST_PART))


def _digests(directory: Path, names: list[str]) -> dict[str, dict]:
    return {
        name: {
            "bytes": (directory / name).stat().st_size,
            "sha256": io.file_digest(directory / name),
        }
        for name in names
    }


def _check_files(
    directory: Path, files: dict, rank: int = 0, world: int = 1, skip: tuple[str, ...] = (MANIFEST,)
) -> str | None:
    """Why the files under ``directory`` do not match ``files`` (``_digests``'s form), or None.
    Names are compared with the folder's listing before any is opened."""
    try:
        present = set(_listing(directory, skip))
        for name in sorted(files):
            if name not in present:
                return f"{name} is missing"
            size = (directory / name).stat().st_size
            if size != files[name]["bytes"]:
                return f"{name} has {size} bytes, its manifest says {files[name]['bytes']}"
        extra = sorted(present - set(files))
        if extra:
            return f"{extra[0]} is not in the manifest"
        for name in sorted(files)[rank::world]:
            if io.file_digest(directory / name) != files[name]["sha256"]:
                return f"{name} does not match its sha256"
    except (OSError, KeyError, TypeError) as err:
        return f"unreadable ({err})"
    return None


def load_checkpoint(
    path: Path, model: Any, optimizer, scheduler, rank: int = 0, accelerator=None
) -> dict:
    """Restore weights, optimizer, scheduler and RNG from ``path``; return the data position.

    ``model`` and ``optimizer`` as for ``save_checkpoint``; a collective as well. ``path`` comes
    from ``resumable_checkpoint``: its files were checked against its manifest.
    """
    if (path / DEEPSPEED_DIR).is_dir():
        if not is_deepspeed(accelerator):
            raise ValueError(f"{path}: a DeepSpeed checkpoint, but this run is not DeepSpeed")
        # the engine's own loader: partitions, fp32 master weights and optimizer state
        loaded, _ = model.load_checkpoint(
            str(path / DEEPSPEED_DIR),
            tag=DEEPSPEED_TAG,
            load_module_strict=False,  # frozen weights were not saved
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if loaded is None:
            raise ValueError(f"{path / DEEPSPEED_DIR}: DeepSpeed found no checkpoint")
    elif (path / WEIGHTS_DIR).is_dir():
        if is_deepspeed(accelerator):
            raise ValueError(f"{path}: not a DeepSpeed checkpoint, but this run is DeepSpeed")
        _load_sharded_state(path, model, optimizer)
    else:
        raise ValueError(f"{path}: neither {WEIGHTS_DIR}/ nor {DEEPSPEED_DIR}/ inside")
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rank_file = path / f"rng-rank{rank}.safetensors"
    if rank_file.exists():
        _set_rng_state(
            load_file(rank_file), json.loads((path / f"rng-rank{rank}.json").read_text())
        )
    return json.loads((path / "position.json").read_text())


def truncate_log(log_path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` from a JSON-lines log: a resumed run trains
    them again and logs them anew."""
    if not log_path.exists():
        return
    lines = log_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        with io.atomic_path(log_path) as tmp:
            tmp.write_text("".join(kept))


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(source, target)


def record_final(out_dir: Path, state_dir: Path, fingerprint: str, summary: dict) -> None:
    """Keep the finished output in ``state_dir/final/`` (hard links where possible) with
    ``final.json`` (the job's fingerprint, every file's size and sha256, the run's summary),
    so that a rerun whose output was lost re-emits it (``reemit_final``). Rank 0 only."""
    files = _digests(out_dir, _listing(out_dir, skip=()))
    with io.atomic_path(state_dir / FINAL_DIR, is_dir=True) as tmp:
        for name in files:
            _link_or_copy(out_dir / name, tmp / name)
        record = {"fingerprint": fingerprint, "files": files, "summary": summary}
        (tmp / FINAL_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))


def reemit_final(state_dir: Path, out_dir: Path, fingerprint: str) -> dict | None:
    """Write ``out_dir`` again from an intact final record of this very job and return the
    run's summary; None (and no record left) when there is none, or it is stale or damaged.
    Rank 0 only."""
    folder = state_dir / FINAL_DIR
    if not folder.exists():
        return None
    try:
        record = json.loads((folder / FINAL_RECORD).read_text())
        stale = record["fingerprint"] != fingerprint
        reason = None if stale else _check_files(folder, record["files"], skip=(FINAL_RECORD,))
    except (OSError, ValueError, KeyError, TypeError) as err:
        stale, reason = False, f"{FINAL_RECORD} is unreadable ({err})"
    if stale or reason:
        if reason:
            log.warning("damaged final record %s: %s; training again", folder, reason)
        shutil.rmtree(folder)
        return None
    with io.atomic_path(out_dir, is_dir=True) as tmp:
        for name in record["files"]:
            _link_or_copy(folder / name, tmp / name)
    log.info("%s: re-emitted from %s, trained before; no step trained now", out_dir, folder)
    return record["summary"]


def save_model(accelerator: Any, model: Any, out_dir: Path, extra_meta: dict) -> None:
    """Save the trained model (as ``accelerator.prepare`` returned it) to ``out_dir`` from rank 0.

    Under FSDP / ZeRO-3 each rank holds a shard: ``accelerator.get_state_dict`` gathers the full
    weights on rank 0 (a collective, called on every rank); the model's ``save`` writes them.
    """
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        _save_with_state(accelerator.unwrap_model(model), out_dir, extra_meta, state)
    accelerator.wait_for_everyone()


def _save_with_state(model: Any, out_dir: Path, extra_meta: dict, state: dict) -> None:
    """``model.save`` with the gathered ``state`` (models whose save takes none: their own)."""
    if "state_dict" in inspect.signature(model.save).parameters:
        model.save(out_dir, extra_meta=extra_meta, state_dict=state)
    else:
        model.save(out_dir, extra_meta)


def check_saveable(model: Any, accelerator: Any) -> None:
    """Fail before training when the final save could not take gathered (sharded) weights."""
    takes_state = "state_dict" in inspect.signature(model.save).parameters
    if _is_sharded(accelerator) and not takes_state:
        raise ValueError(
            f"{type(model).__name__}.save() takes no state_dict: the gathered weights of "
            "FSDP / DeepSpeed training could not be saved"
        )


def prepare_state_dir(state_dir: Path, identity: dict) -> None:
    """Resume only a run of the same job (``identity``: its spec and inputs): state left by
    another is discarded."""
    marker = state_dir / "spec.json"
    wanted = json.dumps(identity, sort_keys=True)
    if state_dir.exists() and (not marker.exists() or marker.read_text() != wanted):
        log.warning("%s: state of a different spec; starting afresh", state_dir)
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        with io.atomic_path(marker) as tmp:
            tmp.write_text(wanted)
