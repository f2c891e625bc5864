"""Apache Beam pipeline definitions (corpus sharding, data screening), importable as `emojax.pipelines`.

Each pipeline is runnable on any Beam runner (DirectRunner locally; Flink, Spark or Dataflow on a cluster).
"""
