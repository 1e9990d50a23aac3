"""Training: the LightningModule, its loss, metrics and schedules, callbacks, loggers and resuming."""
