"""The fleet: many subjects over every GPU of the host (local backend) or of a Ray cluster (ray backend).

It sits one level above a job (orchestrator.job): subjects -> jobs, which GPU, how many side by side,
one progress view, a summary. It starts jobs and reads their run.json; it never reaches into stages.
Ray is imported only by orchestrator/fleet/ray_backend.py, and only when --backend ray is asked for.
"""
