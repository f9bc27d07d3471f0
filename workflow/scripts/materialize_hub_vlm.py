from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.materialize_hub_vlm(sm.params.vlm, sm.output[0], **dict(sm.input.items()))
