"""privacy: differential privacy and encrypted aggregation, usable without fedrec."""
