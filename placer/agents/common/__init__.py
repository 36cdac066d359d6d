"""Pieces every agent shares: rollout env, observation, best-so-far tracking, callbacks, imitation."""
