"""The chat service's web layer: a Bottle app built by chat_app.app.create_app()."""
