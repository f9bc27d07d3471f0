# Benchmarks: synthetic worlds, downloads and normalized manifests.


rule synthesize_world:
    output:
        directory(paths.WORLD),
    log:
        "logs/synthesize_world/{world}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("synthesize")
    resources:
        **rule_resources("synthesize"),
    params:
        world=lambda wc: fc.canonical(config["synthetic_worlds"][wc.world]),
    script:
        "../workflow/scripts/synthesize_world.py"


rule build_manifest:
    input:
        unpack(job_inputs(paths.manifest_inputs, "benchmark")),
    output:
        **paths.manifest_outputs("{benchmark}"),
    log:
        "logs/build_manifest/{benchmark}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("download")
    resources:
        **rule_resources("download"),
    params:
        spec=lambda wc: fc.canonical(fc.benchmark_spec(config, wc.benchmark)),
        raw_dir=lambda wc: paths.RAW.format(benchmark=wc.benchmark),
    script:
        "../workflow/scripts/build_manifest.py"


rule vqa_benchmark:
    output:
        paths.VQA_TSV,
    log:
        "logs/vqa_benchmark/{vqa}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("download")
    resources:
        **rule_resources("download"),
    params:
        source=lambda wc: fc.canonical(config["vqa_benchmarks"][wc.vqa]["source"]),
    script:
        "../workflow/scripts/vqa_benchmark.py"


rule all_manifests:
    input:
        expand(paths.MANIFEST, benchmark=BENCHMARKS),
        expand(paths.VQA_TSV, vqa=VQA_BENCHMARKS),
