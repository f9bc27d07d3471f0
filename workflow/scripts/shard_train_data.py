from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.shard_train_data(
    sm.params.source,
    sm.output[0],
    **dict(sm.input.items()),
    raw_dir=sm.params.raw_dir,
    samples_per_shard=sm.params.samples_per_shard,
)
