"""The coordinator side: ServerApp, round loop, reply validation, run folder, coordinator CLI."""
