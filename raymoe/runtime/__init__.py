"""Everything that imports Ray: worker actors, the worker group, torch.distributed bootstrap, the driver."""
