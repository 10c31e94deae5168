"""Reports over finished runs: a sweep's table and plots, the long-context heatmaps, W&B Reports."""
