"""Sample class-conditional images from a trained DiT (the full sampler arrives with issue 3)."""

raise SystemExit("sampling is not implemented yet (issue 3)")
