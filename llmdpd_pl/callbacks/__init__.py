"""Lightning callbacks: actor EMA and rollout evaluation."""
