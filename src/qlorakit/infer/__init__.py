"""Generation and chat on a 4-bit base with an adapter."""
