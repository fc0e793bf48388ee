"""What the Prefect flows (flows/) use to drive dvc: the DAG, params updates, processes, the run report."""
