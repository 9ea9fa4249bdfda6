"""What an administrator runs a mount with: systemd readiness, logs, stats and metrics, the cache tool."""
