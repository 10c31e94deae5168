"""The benchmark of KV-cache methods side by side: plan, measure, render (and the kernel benchmark)."""
