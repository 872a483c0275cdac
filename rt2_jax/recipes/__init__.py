"""End-to-end jobs: data generation, training and evaluation in one command."""
