"""Training stages: one readable loop per method."""
