from fgvlm import logs, stages

logs.setup(snakemake.log)  # noqa: F821
stages.fetch_clip(snakemake.params.source, snakemake.output[0])  # noqa: F821
