"""The training worker: one process per running job (see protocol.py for why and how)."""
