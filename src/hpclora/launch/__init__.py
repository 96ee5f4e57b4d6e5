"""Launching runs: render job scripts, submit them (sbatch, submitit or in-process), and watch them.

Nothing here imports torch, transformers or peft at module level: these commands run on login nodes.
"""
