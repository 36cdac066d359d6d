"""The Gymnasium environments over a placement problem: observation features, rewards
(simulated, measured, hybrid), configuration checks and registration."""
