"""Per-layer-type rules for every morph, in one registry (see ``registry``)."""
