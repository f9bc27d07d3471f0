from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.fetch_train_archive(sm.params.spec, sm.output[0], download_dir=sm.params.download_dir)
