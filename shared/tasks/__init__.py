"""One module per task; each registers itself with ``fedcare.shared.registry.register``."""
