"""The `abq` command line: thin adapters from flags to the producers, workers and local broker."""
