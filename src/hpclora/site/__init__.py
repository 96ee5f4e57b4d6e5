"""Knowing the cluster from its login node: doctor, probe, Slurm's partitions, storage, staging the hub cache.
Nothing here imports torch at module level or anything of job/."""
