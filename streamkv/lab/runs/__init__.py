"""Run plumbing: run and job directories, locks, signals, the network probe, results on disk, one job."""
