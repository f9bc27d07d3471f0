# Training images (paper Appendix C): one job per image archive (checked, extracted once) and
# per URL list (fetched in resumable parts: Snakemake deletes only the report before a rerun).


wildcard_constraints:
    archive=train_download_names(paths.train_archives),
    urls=train_download_names(paths.train_url_lists),


rule fetch_train_archive:
    output:
        directory(paths.TRAIN_ARCHIVE),
    log:
        "logs/fetch_train_archive/{data}/{archive}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("download")
    resources:
        **rule_resources("download"),
    params:
        spec=lambda wc: fc.canonical(
            config["train_data"][wc.data]["source"]["archives"][wc.archive]
        ),
        download_dir=lambda wc: paths.TRAIN_DOWNLOADS.format(data=wc.data),
    script:
        "../workflow/scripts/fetch_train_archive.py"


rule fetch_train_urls:
    output:
        report(
            paths.TRAIN_URLS,
            category="Training data",
            caption="../workflow/report/fetch.rst",
        ),
    log:
        "logs/fetch_train_urls/{data}/{urls}.log",
    conda:
        "../envs/fgvlm.yaml"
    threads: rule_threads("download")
    resources:
        **rule_resources("download"),
    params:
        source=lambda wc: fc.canonical(config["train_data"][wc.data]["source"]),
        raw_dir=lambda wc: paths.TRAIN_RAW.format(data=wc.data),
    script:
        "../workflow/scripts/fetch_train_urls.py"
