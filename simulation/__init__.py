"""Researchers' tools: in-process federations, partitions, experiment runners."""
