"""Simulated environments for data generation and closed-loop evaluation."""
