from fgvlm import logs, stages
from fgvlm.config import device_of

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.eval_clip(
    sm.params.spec,
    **dict(sm.input.items()),
    **dict(sm.output.items()),
    metric=sm.params.metric,
    batch_size=sm.config["clip_eval"]["batch_size"],  # operational: the scores do not change
    device=device_of({"device": sm.params.device}),
)
