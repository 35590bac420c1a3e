"""tolaria_sidecar: the rollback/emergency sidecar (shared-memory slots, durable checkpoints).

Runs beside the trainer and never imports torch: it moves bytes and verifies checksums.
"""
