from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.synthesize_world(sm.params.world, sm.output[0])
