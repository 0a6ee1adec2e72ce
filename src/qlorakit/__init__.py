"""qlorakit."""
