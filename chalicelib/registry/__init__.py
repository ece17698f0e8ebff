"""The allow-list registry: which devices may be provisioned, and what became of each."""
