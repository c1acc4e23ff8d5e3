"""The maintainers' tools behind upload_to_hub.py (not shipped to the Hub)."""
