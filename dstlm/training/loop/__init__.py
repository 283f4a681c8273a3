"""What Lightning runs: the LightningModule, the data module, and the callbacks."""
