from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.aggregate_models(sm.params.study, sm.params.files, sm.output[0])
