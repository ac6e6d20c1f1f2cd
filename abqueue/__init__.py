"""abqueue's own machinery beside the user-facing `schemas`, `producers` and `workers` packages:
the `abq` command, the Kafka layer, the local broker, live configs and rollouts, analysis, scaling
and deployment. Kept under one name so that installing abqueue never shadows a user's own modules."""
