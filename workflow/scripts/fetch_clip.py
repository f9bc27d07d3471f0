from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.fetch_clip(sm.params.source, sm.output[0], **dict(sm.input.items()))
