from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.fetch_train_urls(
    sm.params.source,
    sm.wildcards.urls,
    sm.output[0],
    raw_dir=sm.params.raw_dir,
    processes=sm.threads,
)
