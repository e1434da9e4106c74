"""Requeueing this SLURM job, after a stop that Lightning's auto-requeue signal asked for.

Lightning's own handler of that signal (``--signal=SIGUSR1@90`` in the batch script) saves a checkpoint from inside
the signal handler, wherever the signal lands (half-way through a forward pass: a checkpoint that does not resume
exactly), closes the logger under the callbacks still writing to it, and under DDP meets the other processes in a
collective from there: a 2-process run crashed. This project stops as on SIGTERM instead (``GracefulStop``: at a
batch boundary, every process at the same one, with ``last.ckpt``), and only then requeues the job, as Lightning does:
``scontrol requeue JOB``. The requeued job resumes with ``--ckpt_path auto``.
"""

import os
import re
import subprocess


def job_id() -> str | None:
    """This job's id as scontrol names it (an array task: ``JOB_TASK``), or None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def requeue(resumes: bool = True) -> str:
    """Requeue this job; what happened, as a sentence for the user (``resumes``: a fit, whose last.ckpt the requeued job
    resumes from)."""
    job = job_id()
    if job is None:
        return "No SLURM job id in the environment: nothing was requeued."
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"Requeueing job {job} failed ({err}): requeue it yourself (scontrol requeue {job})."
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"status {done.returncode}"]
        return f"Requeueing job {job} failed ({reason[0]}): requeue it yourself (scontrol requeue {job})."
    resume = "; with --ckpt_path auto it resumes from last.ckpt" if resumes else ""
    return f"Job {job} requeued (scontrol requeue {job}){resume}."
