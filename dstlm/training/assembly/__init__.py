"""A run put together and started: the Trainer, data and module built from a RunConfig; fit; the summary."""
