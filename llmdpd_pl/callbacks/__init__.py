"""Lightning callbacks: actor EMA, rollout evaluation and provenance."""
