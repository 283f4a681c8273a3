"""DeepSpeed ZeRO: the strategy, the sparse engine's backend over ZeRO's partitions, the partitioned start-up."""
