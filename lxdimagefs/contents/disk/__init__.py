"""Readers of a VM image's disk (qcow2 container, GPT table) for contents/: own code, read-only."""
