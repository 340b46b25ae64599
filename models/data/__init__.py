"""Datasets: the JSONL manifest format (``manifest``) and the synthetic benchmark generator (``synthetic``).

Nothing is re-exported here on purpose: importing ``models.data.manifest`` should not pull in the generator.
"""
