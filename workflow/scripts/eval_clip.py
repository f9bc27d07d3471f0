from fgvlm import logs, stages
from fgvlm.config import device_of

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.eval_clip(
    sm.input.shards,
    sm.input.classes,
    sm.input.clip,
    sm.params.spec["templates"],
    sm.output.predictions,
    sm.output.metrics,
    metric=sm.params.metric,
    batch_size=sm.params.batch_size,
    device=device_of({"device": sm.params.device}),
)
