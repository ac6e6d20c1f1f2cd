"""Autoscaling for operators: KEDA's Kafka scaler arithmetic, live lag plans, and a fleet simulator."""
