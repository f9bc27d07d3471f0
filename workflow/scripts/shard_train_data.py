from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.shard_train_data(
    sm.params.source,
    sm.output[0],
    raw_dir=f"data/raw/train/{sm.wildcards.data}",
    world_dirs=list(sm.input),
    samples_per_shard=sm.params.samples_per_shard,
)
