"""Variant analysis: statistics, the report over responses and feedback, and its charts."""
