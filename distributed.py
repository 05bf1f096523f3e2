"""How the processes of a training run find each other: torchrun, srun (SLURM), or one plain process.

    device, rank, world_size, cpu_group = distributed.setup(args.device)

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; srun sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, read here as
torchrun's (as the official code does); with neither there is one process and no process group at all.
"""
import os
import subprocess

import torch
import torch.distributed as dist

import backbone
from cli import ConfigError


def setup(device=None):
    """(device, rank, world_size, cpu_group). torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; srun sets SLURM_* (read
    as torchrun's, slurm_environment); with neither: one process, no process group. cpu_group: a gloo group for
    small CPU messages that must not wait for the GPU."""
    device = backbone.default_device(device)
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        os.environ.update(slurm_environment(os.environ))
    if "RANK" not in os.environ:
        return device, 0, 1, None
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size(), dist.new_group(backend="gloo")


def slurm_environment(env):
    """torchrun's variables from srun's, as the official code reads them: RANK = SLURM_PROCID, WORLD_SIZE =
    SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID; MASTER_ADDR: the first node of the job (scontrol), unless set."""
    master = env.get("MASTER_ADDR")
    if not master:
        nodes = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        try:  # node[01-04] -> node01
            master = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                    check=True).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            if "[" in nodes:
                raise ConfigError(f"cannot find the first node of {nodes} (no scontrol): set MASTER_ADDR") from None
            master = nodes.split(",")[0]
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env["SLURM_LOCALID"],
            "MASTER_ADDR": master, "MASTER_PORT": env.get("MASTER_PORT", "29500")}
