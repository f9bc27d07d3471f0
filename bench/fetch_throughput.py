"""Images/s fetched from a URL list and written as WebDataset tars: our fetcher vs img2dataset.

A loopback HTTP server (127.0.0.1, this process; the tests' ``tests/_loopback.py``) serves
``--images`` JPEGs with ``--latency`` seconds added to every request, as real hosts have, and a
fraction of dead URLs (404). Both tools run as subprocesses (interpreter start-up included) with
the same processes x threads, alternating, ``--rounds`` times; medians are printed as Markdown:

    python bench/fetch_throughput.py --img2dataset /tmp/i2d-venv/bin/img2dataset

img2dataset runs from its own environment (its pins conflict with ours): ``--resize_mode no``
and ``--disable_all_reencoding`` keep the bytes as served, as our fetcher does.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _loopback import Route, image_bytes, serve  # noqa: E402

OURS = """
import sys
from fgvlm.data.fetch import fetch_url_list
urls = open(sys.argv[1]).read().split()
items = [(f"{i:08d}", u) for i, u in enumerate(urls)]
fetch_url_list(items, sys.argv[2], processes=int(sys.argv[3]), threads=int(sys.argv[4]),
               part_size=250, timeout=10, retries=0)
"""


def run_ours(urls: Path, out: Path, processes: int, threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TQDM_DISABLE": "1"}
    command = [sys.executable, "-c", OURS, str(urls), str(out), str(processes), str(threads)]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def run_img2dataset(binary: str, urls: Path, out: Path, processes: int, threads: int) -> float:
    command = [
        binary,
        f"--url_list={urls}",
        "--input_format=txt",
        "--output_format=webdataset",
        f"--output_folder={out}",
        f"--processes_count={processes}",
        f"--thread_count={threads}",
        "--number_sample_per_shard=250",
        "--resize_mode=no",
        "--disable_all_reencoding=True",
        "--retries=0",
        "--timeout=10",
        "--enable_wandb=False",
    ]
    start = time.perf_counter()
    subprocess.run(
        command, check=True, capture_output=True, env={**os.environ, "WANDB_MODE": "disabled"}
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--dead", type=float, default=0.1, help="fraction of 404 URLs")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--img2dataset", help="the img2dataset binary of its own environment")
    args = parser.parse_args()

    n_dead = int(args.images * args.dead)
    routes = {f"{i}.jpg": Route(image_bytes(i, size=128)) for i in range(args.images - n_dead)}
    with serve(routes, latency=args.latency) as server, tempfile.TemporaryDirectory() as tmp:
        urls = Path(tmp) / "urls.txt"
        urls.write_text("\n".join(server.url(f"{i}.jpg") for i in range(args.images)) + "\n")
        times: dict[str, list[float]] = {"ours": [], "img2dataset": []}
        for _ in range(args.rounds):
            out = Path(tmp) / "out"
            times["ours"].append(run_ours(urls, out, args.processes, args.threads))
            shutil.rmtree(out)
            if args.img2dataset:
                times["img2dataset"].append(
                    run_img2dataset(args.img2dataset, urls, out, args.processes, args.threads)
                )
                shutil.rmtree(out)
        requests = sum(server.requests.values())
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs; {args.images} URLs ({n_dead} dead), "
        f"{args.latency * 1000:.0f} ms latency, {args.processes} processes x {args.threads} "
        f"threads, {args.rounds} rounds, {requests} requests served"
    )
    print("| tool | median wall | images/s (URLs tried) |\n| --- | --- | --- |")
    for tool, values in times.items():
        if values:
            median = statistics.median(values)
            print(f"| {tool} | {median:.2f} s | {args.images / median:.0f} |")


if __name__ == "__main__":
    main()
