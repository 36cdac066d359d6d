"""What a run shows: comparison tables, result files, plots, Gantt charts and graph summaries."""
