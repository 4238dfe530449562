"""fedcare: privacy-preserving federated learning for hospitals.

The installed package maps the repository's top-level folders into one namespace:
``fedcare.shared`` (shared/), ``fedcare.client`` (client/), ``fedcare.server`` (server/)
and ``fedcare.simulation`` (simulation/).
"""

__version__ = "0.1.0"
