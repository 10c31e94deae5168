"""The lab: registry and config groups, tasks, benchmarks, reports and sweeps over the engine (:mod:`streamkv.kv`)."""
