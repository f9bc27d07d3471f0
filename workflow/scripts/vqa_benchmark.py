from fgvlm import logs, stages

logs.setup(snakemake.log, threads=snakemake.threads)  # noqa: F821
stages.vqa_benchmark(snakemake.params.source, snakemake.output[0])  # noqa: F821
