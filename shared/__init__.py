"""Code both the coordinator and the hospitals need: config, task registry, tasks."""
