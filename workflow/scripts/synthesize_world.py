from fgvlm import logs, stages

logs.setup(snakemake.log, threads=snakemake.threads)  # noqa: F821
stages.synthesize_world(snakemake.params.world, snakemake.output[0])  # noqa: F821
