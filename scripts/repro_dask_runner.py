"""Minimal reproduction: Beam's DaskRunner (apache-beam 2.77, dask/distributed 2026.8) gets a ParDo with tagged
outputs and a pipeline with two sinks wrong, both of which the corpus stage uses (pipelines/corpus.py: Validate,
UniqueIds, Dedupe and Tokenize have a 'rejected' or 'truncated' output; rejected.jsonl and manifest.json are two
sinks).

    python scripts/repro_dask_runner.py [--scheduler tcp://127.0.0.1:8786]

Splits 1, 2, 3, 4 into even (main output) and odd (tagged output) and writes each list to its own file. The
DirectRunner writes even [2, 4] and odd [1, 3]. The DaskRunner
  1. gives the tagged output every element, main and tagged (DaskBagVisitor keys bags by the producing transform,
     not by the output PCollection: the consumer of `parts.odd` reads the ParDo's whole bag), so odd is [1, 2, 3, 4];
  2. never runs the first sink (run_pipeline computes only the bag of the last transform applied), so even is not
     written, and the pipeline reports DONE.
Prints both runners' results as one JSON line and exits 1 while they differ. Without --scheduler it starts a
dask.distributed LocalCluster of 2 worker processes on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"  # not registered under a short name


def split(x: int):
    yield x if x % 2 == 0 else beam.pvalue.TaggedOutput("odd", x)


def save(values: list[int], path: str) -> None:
    Path(path).write_text(json.dumps(sorted(values)))


def run(beam_args: list[str]) -> dict[str, list[int] | None]:
    """The pipeline on the runner `beam_args` name: each output's elements as written, None when not written."""
    out = Path(tempfile.mkdtemp(prefix="repro-dask-"))
    p = beam.Pipeline(options=PipelineOptions(beam_args))
    parts = p | beam.Create([1, 2, 3, 4]) | beam.FlatMap(split).with_outputs("odd", main="even")
    _ = parts.even | "ListEven" >> beam.combiners.ToList() | "SaveEven" >> beam.Map(save, str(out / "even"))
    _ = parts.odd | "ListOdd" >> beam.combiners.ToList() | "SaveOdd" >> beam.Map(save, str(out / "odd"))
    result = p.run()
    result.wait_until_finish()
    client = getattr(result, "client", None)  # the DaskRunner's, which it never closes itself
    if client is not None:
        client.close()
    return {name: json.loads((out / name).read_text()) if (out / name).exists() else None
            for name in ("even", "odd")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheduler", help="a dask.distributed scheduler address (default: a LocalCluster)")
    args = parser.parse_args(argv)
    direct = run(["--runner=DirectRunner"])
    if args.scheduler:
        dask = run([f"--runner={DASK_RUNNER}", f"--dask_client_address={args.scheduler}"])
    else:
        from distributed import LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster:
            dask = run([f"--runner={DASK_RUNNER}", f"--dask_client_address={cluster.scheduler_address}"])
    print(json.dumps({"DirectRunner": direct, "DaskRunner": dask}))
    return 0 if dask == direct else 1


if __name__ == "__main__":
    sys.exit(main())
