"""Numerical equivalence of two models on seeded random inputs."""
