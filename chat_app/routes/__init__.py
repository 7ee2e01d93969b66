"""One module per resource; each has register(app, ctx)."""
