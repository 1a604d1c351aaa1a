"""Auto Deploy controller: spec loading, policies, drivers, store, reconcile loop, CLI."""
