from fgvlm import logs, stages
from fgvlm.config import device_of

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.mine_questions(
    sm.params.miner,
    **dict(sm.input.items()),
    out=sm.output[0],
    benchmark=sm.wildcards.benchmark,
    batch_size=sm.config["miner"]["batch_size"],  # operational: the questions do not change
    device=device_of({"device": sm.params.device}),
)
