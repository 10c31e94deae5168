"""Stored blocks: how encoded keys and values are held (packed groups, codebook groups, raw, rotated,
composites), bit packing and sparse outliers. Quantizers decide what to store; these classes hold it."""
