"""Training: data pipeline (Grain), embedded corpus, train state, step and loop."""
