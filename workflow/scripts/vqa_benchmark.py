from fgvlm import logs, stages

sm = snakemake  # noqa: F821
logs.setup(sm.log, threads=sm.threads)
stages.vqa_benchmark(sm.params.source, sm.output[0])
