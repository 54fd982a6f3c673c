"""Scenario sweeps over virtual populations: scenario designs, adaptive
treatment policies, toxicity, local and Dask execution with resumable storage."""
