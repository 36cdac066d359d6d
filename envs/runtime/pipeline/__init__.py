"""Pipelined placements run on ``torch.distributed.pipelining`` (stages, schedules) and DDP."""
