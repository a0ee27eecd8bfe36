"""Evaluation: metrics, multi-scale/flip/sliding prediction, reports and export."""
