from fgvlm import logs, stages
from fgvlm.config import device_of

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
evaluation = sm.config.get("evaluation") or {}  # batch and part sizes do not change answers
stages.eval_vlm(
    sm.params.spec,
    sm.input.model,
    sm.input.data,
    sm.output.predictions,
    sm.output.metrics,
    sm.output.details,
    parts_dir=sm.params.parts_dir,
    questions_path=sm.input.get("questions"),
    batch_size=evaluation.get("batch_size", 16),
    part_size=evaluation.get("part_size", 512),
    device=device_of({"device": sm.params.device}),
)
