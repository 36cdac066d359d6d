"""Profiling a captured graph: per-op forward, backward and optimizer-update times per device
kind (:mod:`graphs.profile.profiler`), timed in situ or in isolation, cached on disk."""
