"""Optional integrations with other serving systems.

Nothing here is imported by ``import promptcache``: each submodule imports its peer system (vLLM,
...) only when the submodule itself is imported, so the peer stays an optional extra.
"""
