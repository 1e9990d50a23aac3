"""Reading runs back: the results table, its statistics and figures, per-sample records and run reports."""
