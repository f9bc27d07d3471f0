from fgvlm import logs, stages
from fgvlm.config import device_of

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.mine(
    sm.input.manifest,
    sm.input.classes,
    sm.input.negatives,
    sm.input.clip,
    sm.params.miner,
    sm.output[0],
    benchmark=sm.wildcards.benchmark,
    batch_size=sm.params.batch_size,
    device=device_of({"device": sm.params.device}),
)
