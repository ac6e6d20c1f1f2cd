"""Workers: batch-consume a variant's topic, run the batch through an engine, publish, then commit."""
