"""UP2You re-implemented for memory-budgeted inference: models, pipelines, schedulers, rendering.

Plain library code: no command line, no job folder. Stages call into it.
"""
