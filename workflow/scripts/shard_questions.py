from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.shard_questions(
    **dict(sm.input.items()), out=sm.output[0], samples_per_shard=sm.params.samples_per_shard
)
