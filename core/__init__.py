"""Core pieces every other package depends on: boundary data types, the configuration
schema and loader, model-checkpoint loading, and the ``specfleet`` CLI."""
