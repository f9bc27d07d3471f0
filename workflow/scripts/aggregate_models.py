from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log)
stages.aggregate_models(sm.params.study, sm.output[0])
